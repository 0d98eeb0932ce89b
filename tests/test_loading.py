"""The one loading path (meta build, tensors read straight into place), bf16 fine-tuning and evaluation, and
model directories that write only what changed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.models.moe import hub_state_dict
from retrofit.routers import router_settings, swap_routers
from retrofit.tiny import build_tiny_model
from tests.helpers import Request, finetune, random_ids, tiny_snapshot, write_recipe


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_every_tensor_lands_exactly_in_the_requested_dtype(tmp_path, stored, dtype):
    model = build_tiny_model(seed=1)
    src = tiny_snapshot(tmp_path / "m", model, max_shard_bytes=48 * 1024, dtype=stored)
    loaded = load_model(src, dtype=dtype)
    expected = {k: v.to(stored).to(dtype) for k, v in hub_state_dict(model).items()}  # what a plain cast gives
    got = hub_state_dict(loaded)
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == dtype and torch.equal(tensor, expected[name]), name
    # fp64 from an fp64 file is the fp64 file: nothing rounds through fp32 on the way.
    if stored == dtype == torch.float64:
        assert torch.equal(loaded.model.layers[0].mlp.experts.up_proj[3], model.model.layers[0].mlp.experts.up_proj[3]
                           .double())


def test_loaded_model_equals_the_built_one(tmp_path):
    model = build_tiny_model(seed=2).double()
    src = tiny_snapshot(tmp_path / "m", model, dtype=torch.float64)
    loaded = load_model(src, dtype=torch.float64)
    ids = random_ids(model, batch=2, length=16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_router_masters_stay_fp32_beside_bf16_weights(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.bfloat16, router_dtype=torch.float32)
    plain = load_model(tiny_dir, dtype=torch.bfloat16)
    assert {b.gate.weight.dtype for b in model.moe_blocks()} == {torch.float32}
    assert model.model.layers[0].mlp.experts.gate_proj.dtype == torch.bfloat16
    ids = random_ids(model, batch=2, length=16)
    with torch.no_grad():  # the master is the stored bf16 value exactly, so routing is unchanged
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    ckpt = CheckpointDir(tiny_dir)
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert ckpt.shards  # the fixture is sharded
    with pytest.raises(RetrofitError, match="missing.*model.layers.1.mlp.experts.up_proj"):
        load_model(tiny_dir)


def test_a_model_too_big_for_memory_is_refused_up_front(tiny_dir, monkeypatch):
    import retrofit.io.load as load

    monkeypatch.setattr(load, "_available_memory", lambda: 1000)
    with pytest.raises(RetrofitError, match=r"needs .* GiB in float32 .*\(try bfloat16"):
        load_model(tiny_dir)


_PEAK = """
import sys, torch, retrofit
from retrofit.io.load import load_model, model_bytes
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
load_model(sys.argv[2], dtype=torch.bfloat16)  # warm-up: the imports a first load triggers are not the model
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS')
model = load_model(sys.argv[1], dtype=torch.bfloat16)
print(base, status('VmHWM'), model_bytes(model))
"""


@pytest.mark.slow
def test_load_holds_nothing_twice(tmp_path):
    """Peak memory growth of a bf16 load is the model plus one tensor, not two models (fresh process)."""
    src = tiny_snapshot(tmp_path / "src", max_shard_bytes=32 * 2**20, dtype=torch.bfloat16, hidden_size=256,
                        expert_intermediate_size=512, num_hidden_layers=8, vocab_size=512)
    warm = tiny_snapshot(tmp_path / "warm-up")
    run = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(warm)], capture_output=True, text=True,
                         check=True)
    base, peak, weights = map(int, run.stdout.split())
    assert weights > 50 * 2**20
    assert peak - base < 1.15 * weights, f"grew {(peak - base) / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("router", [{"type": "tc"}, {"type": "ec"}, {"type": "block", "guard_size": 2,
                                                                       "block_length": 8}])
def test_autocast_forward_and_backward_run_for_every_router(tiny_model, router):
    # The crash this guards: index_add_() of bf16 expert outputs into the fp32 residual stream.
    swap_routers(tiny_model, router_settings(**router))
    ids = random_ids(tiny_model, batch=2, length=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny_model(ids).logits
    logits.float().sum().backward()
    assert torch.isfinite(logits).all()
    assert tiny_model.moe_blocks()[0].gate.weight.grad is not None


@pytest.mark.parametrize("router", ["tc", "ec", "block"])
def test_bf16_finetuning_step_and_export(tiny_dir, tmp_path, router):
    extra = {"guard_size": 2, "block_length": 8} if router == "block" else {}
    path = write_recipe(tmp_path, tiny_dir, model={"router": {"type": router, **extra}},
                        optim={"precision": "bf16", "max_steps": 2})
    job, result = finetune(path, "checkpoint.every=2", "optim.lr=0.1")
    assert all(b.gate.weight.dtype == torch.float32 for b in job.base.moe_blocks())
    assert job.base.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(result.losses)))
    out, src = CheckpointDir(result.output_dir), CheckpointDir(tiny_dir)
    routers = [n for n in src.weight_map if n.endswith("mlp.gate.weight")]
    stored = out.read(routers)
    masters = load_file(str(result.output_dir / "router.safetensors"))
    for name in routers:
        # In the shards: the checkpoint's own dtype; the fp32 masters beside them; trained, so changed.
        assert stored[name].dtype == torch.bfloat16 and masters[name].dtype == torch.float32
        assert torch.equal(stored[name], masters[name].to(torch.bfloat16))
        assert not torch.equal(stored[name], src.read([name])[name])
    assert json.loads((result.output_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(result.output_dir, dtype=torch.bfloat16).config.router_settings.type == router


def test_export_writes_only_shards_that_hold_a_router(tiny_dir, tmp_path):
    _, result = finetune(write_recipe(tmp_path, tiny_dir), "optim.max_steps=2")
    src = CheckpointDir(tiny_dir)
    with_router = {src.weight_map[n] for n in src.weight_map if n.endswith("mlp.gate.weight")}
    assert set(src.shards) - with_router, "the fixture must have a shard without a router"
    for shard in src.shards:
        same = (result.output_dir / shard).stat().st_ino == (tiny_dir / shard).stat().st_ino
        assert same == (shard not in with_router), shard
        if shard in with_router:  # patched in place: the same size and the same bytes outside the routers
            assert (result.output_dir / shard).stat().st_size == (tiny_dir / shard).stat().st_size
    assert (result.output_dir / "model.safetensors.index.json").read_bytes() == \
        (tiny_dir / "model.safetensors.index.json").read_bytes()


def test_resume_of_a_finished_run_exports_again(tiny_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_dir)
    finetune(path, "optim.max_steps=2", "checkpoint.every=2")
    _, result = finetune(path, "optim.max_steps=4", "checkpoint.every=2", resume=True)
    assert result.steps == 2
    assert not (result.output_dir / ".export-partial").exists()
    assert load_model(result.output_dir).config.router_settings.type == "ec"


def test_a_run_that_fails_before_any_checkpoint_leaves_no_directory(tiny_dir, tmp_path, monkeypatch):
    import retrofit.training.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash in the first step")

    monkeypatch.setattr(trainer.Finetune, "train_step", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        finetune(write_recipe(tmp_path, tiny_dir))
    assert not (tmp_path / "run").exists()


def test_bf16_eval_on_tiny_for_every_router(tiny_dir):
    from retrofit.eval.adapter import RetrofitLM

    for router in ("tc", "ec", "block"):
        lm = RetrofitLM(str(tiny_dir), dtype="bfloat16", router=router, guard_size=2 if router == "block" else None,
                        mc_num=4, batch_size=4, gen_length=8, steps=4, denoise_block=8, progress=False)
        assert next(lm.model.parameters()).dtype == torch.bfloat16
        (ll, _), (ll2, _) = lm.loglikelihood([Request("Hello", " world"), Request("Hell", "o")])
        assert ll < 0 and ll2 < 0
        assert isinstance(lm.generate_until([Request("2+2=", {"until": ["\n"]})])[0], str)


# ----------------------------------------------------------------------------------------- hashing


def test_weights_hash_is_cached_and_follows_the_bytes(tiny_dir, monkeypatch):
    import retrofit.eval.runner as runner

    first = runner.weights_hash(tiny_dir)
    reads = []
    real = runner._file_sha256
    monkeypatch.setattr(runner, "_file_sha256", lambda p: reads.append(p.name) or real(p))
    assert runner.weights_hash(tiny_dir) == first and reads == []
    shard = sorted(tiny_dir.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert runner.weights_hash(tiny_dir) != first and reads == [shard.name]


@pytest.mark.parametrize("name, dtype", [("auto", torch.float32), ("fp32", torch.float32), ("float32", torch.float32),
                                         ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_one_dtype_vocabulary_for_eval_and_recipes(tiny_dir, tmp_path, name, dtype):
    from retrofit.eval.adapter import RetrofitLM
    from retrofit.precision import resolve_dtype
    from tests.helpers import write_recipe

    assert resolve_dtype(name, "cpu") == dtype
    assert next(RetrofitLM(str(tiny_dir), dtype=name, progress=False).model.parameters()).dtype == dtype
    recipe = write_recipe(tmp_path, tiny_dir, optim={"precision": name})
    from retrofit.training.recipe import load_recipe

    assert load_recipe(recipe)[0].optim.precision == name


def test_an_unknown_dtype_names_both_spellings(tiny_dir):
    from retrofit.errors import RetrofitError
    from retrofit.precision import resolve_dtype

    with pytest.raises(RetrofitError, match=r"use auto, fp32 \(float32\) or bf16 \(bfloat16\)"):
        resolve_dtype("half", "cpu")
