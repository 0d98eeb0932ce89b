"""`retrofit create-tiny --preset llada-moe-7b`: the full-size plan (checked without writing 14.7 GB), the
streaming safetensors writer, the padded tokenizer, and the whole path at a shrunk scale."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from retrofit import tiny
from retrofit.cli import app
from retrofit.io.checkpoint import INDEX_NAME, CheckpointDir
from retrofit.io.load import load_model
from retrofit.io.tokenizer_files import mask_token_id
from retrofit.tiny.tokenizers import write_padded_byte_tokenizer
from retrofit.io.writer import StreamingShardWriter, TensorSpec, write_streaming_sharded
from retrofit.tiny import TINY_DIMS, create_preset, full_size_plan, preset_total_bytes
from tests.helpers import one_line_error, runner, tiny_snapshot

# The preset shrunk to tiny dims (vocab 320: byte tokens, then specials at the preset's offsets from 256).
SMALL = dict(dims=dict(TINY_DIMS), eos_token_id=300, mask_token_id=303)
SMALL_SHARD_BYTES = int(preset_total_bytes(**SMALL) * 0.4)  # three shards, like the Hub's


def test_full_size_plan_matches_the_hub_checkpoint():
    plan = full_size_plan("llada-moe-7b")
    assert sum(math.prod(t.shape) for t in plan) == 7_356_880_896
    assert {t.dtype for t in plan} == {torch.bfloat16}
    assert len({t.name for t in plan}) == len(plan) == 1 + 16 * (7 + 64 * 3 + 2) + 2
    sizes: dict[str, int] = {}
    for t in plan:
        sizes[t.shard] = sizes.get(t.shard, 0) + math.prod(t.shape) * 2
    assert list(sizes) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(size <= 5_000_000_000 for size in sizes.values())
    assert [round(size / 1e9, 2) for size in sizes.values()] == [5.00, 5.00, 4.72]  # the Hub's shard sizes
    by_name = {t.name: t for t in plan}
    for i in range(16):
        assert by_name[f"model.layers.{i}.mlp.gate.weight"].shape == (64, 2048)
        assert by_name[f"model.layers.{i}.mlp.experts.63.down_proj.weight"].shape == (2048, 1024)
        assert by_name[f"model.layers.{i}.self_attn.q_norm.weight"].shape == (128,)
    assert by_name["model.embed_tokens.weight"].shape == by_name["lm_head.weight"].shape == (157184, 2048)
    assert plan[0].name == "model.embed_tokens.weight" and plan[-1].name == "lm_head.weight"


def test_streaming_writer_round_trips_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {  # odd-sized bf16 first: the writer must still keep the fp64/int64 data aligned
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.fp32": torch.randn(7, generator=g),
        "c.fp64": torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
        "d.int64": torch.randint(-2 ** 62, 2 ** 62, (9,), generator=g),
        "e.bf16.chunked": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "f.scalar": torch.tensor(3.5, dtype=torch.float32),
        "g.empty": torch.zeros(0, 3, dtype=torch.bfloat16),
    }
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    written = []
    path = tmp_path / "x.safetensors"
    with StreamingShardWriter(path, specs, on_bytes=written.append) as writer:
        for spec in writer.layout:
            t = tensors[spec.name]
            writer.write(spec.name, t.reshape(-1).split(7) if spec.name.endswith("chunked") else t)
    assert path.stat().st_size == writer.file_bytes and sum(written) == writer.data_bytes
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("c.fp64"), tensors["c.fp64"])
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0


def test_streaming_writer_refuses_what_the_header_did_not_plan(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2, 2)), TensorSpec("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected a next"):
        with StreamingShardWriter(tmp_path / "1.safetensors", specs) as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        with StreamingShardWriter(tmp_path / "2.safetensors", specs) as w:
            w.write("a", torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):
        with StreamingShardWriter(tmp_path / "3.safetensors", specs) as w:
            w.write("a", torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="never written"):
        with StreamingShardWriter(tmp_path / "4.safetensors", specs) as w:
            w.write("a", torch.zeros(2, 2))


def test_streaming_sharded_write_is_read_by_checkpoint_dir(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.bfloat16, (16, 8)) for i in range(5)]
    weight_map = write_streaming_sharded(tmp_path, specs, 2 * 16 * 8 * 2,
                                         lambda s: torch.full(s.shape, float(s.name[1:]), dtype=s.dtype))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index == {"metadata": {"total_size": 5 * 256}, "weight_map": weight_map}
    (tmp_path / "config.json").write_text("{}")
    ckpt = CheckpointDir(tmp_path)
    assert ckpt.weight_map == weight_map
    assert ckpt.shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name, shard in weight_map.items():
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert torch.equal(f.get_tensor(name), torch.full((16, 8), float(name[1:]), dtype=torch.bfloat16))


def test_padded_tokenizer_has_the_real_vocabulary_size(tmp_path):
    ids = write_padded_byte_tokenizer(tmp_path, 157184, 156892, 156895)
    assert ids == {"<|endoftext|>": 156892, "<|mask|>": 156895}
    assert mask_token_id(tmp_path) == 156895
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert len(tok) == 157184
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) == (156895, 156892, 156892)
    encoded = tok("Question: 2+2?")["input_ids"]
    assert encoded and max(encoded) < 256
    assert tok.decode(encoded) == "Question: 2+2?"
    assert tok("a<|mask|>b")["input_ids"][1] == 156895
    with pytest.raises(ValueError):
        write_padded_byte_tokenizer(tmp_path, 300, 300, 301)


def test_shrunk_preset_matches_write_hub_snapshot(tmp_path):
    out = create_preset(tmp_path / "p", seed=1, max_shard_bytes=SMALL_SHARD_BYTES, **SMALL)
    reference = tiny_snapshot(tmp_path / "ref", **TINY_DIMS)
    ckpt, ref = CheckpointDir(out), CheckpointDir(reference)
    assert set(ckpt.weight_map) == set(ref.weight_map)
    assert len(ckpt.shards) == 3
    assert ckpt.weight_map == {t.name: t.shard for t in full_size_plan(max_shard_bytes=SMALL_SHARD_BYTES, **SMALL)}
    config = ckpt.config
    assert (config["model_type"], config["torch_dtype"], config["eos_token_id"]) == ("llada", "bfloat16", 300)
    assert {k: config[k] for k in TINY_DIMS} == TINY_DIMS
    assert mask_token_id(out) == 303
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 300, "pad_token_id": 300}
    tensors = {}
    for shard in ckpt.shards:
        tensors.update(load_file(out / shard))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    load_model(out)  # strict: every name and shape the model expects, nothing else
    gate, expert = tensors["model.layers.1.mlp.gate.weight"], tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert 0.35 < gate.float().std() < 0.65 and 0.015 < expert.float().std() < 0.025
    assert torch.all((tensors["model.norm.weight"] >= 0.5) & (tensors["model.norm.weight"] <= 1.5))
    again = create_preset(tmp_path / "q", seed=1, max_shard_bytes=10 ** 9, **SMALL)  # one shard, same tensors
    assert all(torch.equal(t, load_file(again / "model.safetensors")[n]) for n, t in tensors.items())


def test_cli_preset_writes_with_progress(tmp_path, monkeypatch):
    small = tiny.get_preset("llada-moe-7b", max_shard_bytes=SMALL_SHARD_BYTES, **SMALL)
    monkeypatch.setitem(tiny.PRESETS, "llada-moe-7b", lambda: small)
    result = runner.invoke(app, ["create-tiny", "--preset", "llada-moe-7b", "--seed", "3", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "llada-moe-7b, 3 shard(s)" in result.output
    assert len(CheckpointDir(tmp_path / "m").shards) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left behind
    result = runner.invoke(app, ["create-tiny", "--preset", "llada-moe-7b", str(tmp_path / "m")])
    assert "already exists" in one_line_error(result)


def test_cli_preset_refuses_shape_flags_and_unknown_names(tmp_path):
    line = one_line_error(runner.invoke(app, ["create-tiny", "--preset", "llada-moe-7b", "--layers", "3",
                                              "--shard-kb", "96", str(tmp_path / "x")]))
    assert "--layers" in line and "--shard-kb" in line
    assert "unknown preset" in one_line_error(runner.invoke(app, ["create-tiny", "--preset", "nope",
                                                                   str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()
    help_text = runner.invoke(app, ["create-tiny", "--help"]).output
    assert "llada-moe-7b" in help_text and "14.7 GB" in help_text


def test_bench_7b_measures_a_process_from_outside():
    import sys

    from retrofit.tools.bench_7b import measure

    run = measure([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); time.sleep(0.4); print('ok')"],
                  "allocate 300 MiB")
    assert run.rc == 0 and "ok" in run.tail and run.wall_s >= 0.4
    assert run.peak_rss >= 300 * 2**20 and 250 * 2**20 <= run.peak_anon <= run.peak_rss


def test_bench_7b_targets_read_the_run():
    from retrofit.tools.bench_7b import GiB, markdown, targets

    def run(wall, rss, anon, rc=0):
        return {"command": "x", "rc": rc, "wall_s": wall, "peak_rss": rss, "peak_anon": anon, "tail": ""}

    result = {"machine": "test", "snapshot": "s", "checkpoint_bytes": 10 * GiB,
              "convert_ec": run(30, GiB, GiB), "convert_block": run(130, GiB, 3 * GiB),
              "forward": {**run(20, 11 * GiB, 11 * GiB), "load_peak_rss": 12 * GiB, "load_s": 9, "device": "cpu",
                          "forward_s": {"tc": 1.0}},
              "finetune": {**run(60, 15 * GiB, 15 * GiB), "step_s": [6.0]}, "eval": run(100, 11 * GiB, 11 * GiB, rc=1),
              "hash": {**run(20, GiB, GiB), "cold_s": 20, "cached_s": 0.0}}
    met = {name: ok for name, _, _, ok in targets(result)}
    assert met["convert --router ec: wall time"] and not met["convert --router block: wall time"]
    assert not met["convert --router block: anonymous memory"]
    assert met["eval load peak RSS / checkpoint bytes"] is False  # 12 GiB for 10 GiB of weights: 1.2x
    assert met["finetune peak RSS / eval (load + forward) peak"] is False  # 15/11 = 1.36x
    assert met["convert -> finetune -> eval --limit 1 completes"] is False  # eval failed
    assert "| NO |" in markdown(result)


def test_bench_7b_forward_worker_times_every_router(tmp_path):
    """The worker's per-router work (a forward, generation, a router-only step), here at its CPU shapes on tiny."""
    from retrofit.tiny import build_tiny_model
    from retrofit.tools.bench_7b import CPU_SHAPES, ROUTERS, forward_worker, router_markdown
    from tests.helpers import tiny_snapshot

    result = forward_worker(str(tiny_snapshot(tmp_path / "tiny", build_tiny_model(seed=0))), CPU_SHAPES)
    for figure in ("forward_s", "generate_tokens_per_s", "step_s"):
        assert set(result[figure]) == set(ROUTERS) and all(v > 0 for v in result[figure].values())
    assert result["device"] == "cpu" and "gpu_load_peak_bytes" not in result
    table = router_markdown(result)
    assert "| router | forward 1 x 128 tokens | generation, 1 prompts x 32 tokens (4 steps, blocks of 32)" in table[3]
    assert len(table) == 5 + len(ROUTERS)


def test_bench_7b_reads_the_gpus_memory_and_speed_on_a_gpu():
    from retrofit.tools.bench_7b import GiB, gpu_targets

    forward = {"gpu_load_peak_bytes": 15 * GiB, "gpu_forward_peak_bytes": {"tc": 16 * GiB},
               "gpu_step_peak_bytes": {"tc": 17 * GiB}, "generate_tokens_per_s": {"tc": 450.0, "ec": 900.0,
                                                                                "block": 300.0},
               "step_s": {"tc": 0.12}}
    met = {name: ok for name, _, _, ok in gpu_targets(forward, checkpoint_bytes=14 * GiB)}
    assert met == {"eval load GPU peak / checkpoint bytes": True,  # 15/14 = 1.07x
                   "TC router-only step GPU peak / forward peak (same tokens)": True,  # 17/16
                   "TC generation": True, "ec generation / TC": True, "block generation / TC": False,
                   "TC router-only step": False}
