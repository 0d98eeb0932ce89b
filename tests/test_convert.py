"""`retrofit convert` on tiny multi-shard snapshots: what changes, what stays byte-identical, what is refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import retrofit  # noqa: F401  (registers the model with transformers' Auto classes)
from retrofit.convert import convert, plan_conversion
from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.sources import resolve_source
from retrofit.routers import router_settings
from retrofit.verify import probe_input, streamed_logits
from tests.helpers import random_ids, runner, tiny_snapshot


def _convert(src_dir, out, **router):
    plan = plan_conversion(resolve_source(str(src_dir)), router_settings(**router), out)
    return convert(plan, command="retrofit convert --test")


def test_tc_conversion_reproduces_source_logits_exactly(tiny_dir, tmp_path):
    report = _convert(tiny_dir, tmp_path / "tc", type="tc")
    assert report.logits_identical is True
    src, out = load_model(tiny_dir), load_model(tmp_path / "tc")
    ids = random_ids(src, batch=2, length=16)
    with torch.no_grad():
        assert torch.equal(src(ids).logits, out(ids).logits)


def test_ec_conversion_changes_routers_only(tiny_dir, tmp_path):
    out = tmp_path / "ec"
    report = _convert(tiny_dir, out, type="ec", capacity_factor=1.25)
    src, dst = CheckpointDir(tiny_dir), CheckpointDir(out)
    routers = {n for n in src.weight_map if n.endswith("mlp.gate.weight")}
    assert routers and report.tensors_checked == len(src.weight_map) - len(routers)
    # A router swap changes no tensor: every shard is a hard link to the source's file, nothing rewritten.
    assert report.shards.linked == src.shards and len(src.shards) > 1
    assert not (report.shards.copied or report.shards.patched or report.shards.rewritten)
    for shard in src.shards:
        assert (out / shard).stat().st_ino == (tiny_dir / shard).stat().st_ino
    for name in src.weight_map:
        a, b = src.read([name])[name], dst.read([name])[name]
        assert a.dtype == b.dtype and torch.equal(a, b), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llada_moe" and "auto_map" not in config
    assert config["router"]["type"] == "ec" and config["router"]["capacity_factor"] == 1.25
    assert config["mask_token_id"] == 257
    from safetensors.torch import load_file

    saved = load_file(str(out / "router.safetensors"))
    assert set(saved) == routers
    for name in routers:
        assert torch.equal(saved[name], src.read([name])[name])
    assert "retrofit convert --test" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    # The converted model really routes by expert choice, and its logits differ from TC's.
    model = transformers.AutoModel.from_pretrained(out)
    assert all(block.gate.kind == "ec" for block in model.moe_blocks())
    ids = probe_input(model.config)
    with torch.no_grad():
        assert torch.allclose(model.float()(ids).logits, streamed_logits(dst, ids), atol=1e-5)
    assert report.max_logit_diff > 0


def test_block_conversion_loads_with_automodel(tiny_dir, tmp_path):
    _convert(tiny_dir, tmp_path / "block", type="block", block_length=4, guard_size=2, core_threshold=0.5)
    model = transformers.AutoModel.from_pretrained(tmp_path / "block")
    assert {block.gate.kind for block in model.moe_blocks()} == {"block"}
    assert model.config.router_settings.block_length == 4


def test_streamed_logits_equal_whole_model_logits(tiny_dir):
    model = load_model(tiny_dir)
    ids = probe_input(model.config)
    with torch.no_grad():
        assert torch.equal(streamed_logits(CheckpointDir(tiny_dir), ids), model(ids).logits)


_PEAK_SCRIPT = """
import sys
import retrofit
from retrofit.convert import convert, plan_conversion
from retrofit.sources import resolve_source
from retrofit.routers import router_settings
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
plan = plan_conversion(resolve_source(sys.argv[1]), router_settings(type='ec'), sys.argv[2])
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = status('VmRSS')
convert(plan, verify=False)
print(base, status('VmHWM'))
"""


@pytest.mark.slow
def test_convert_peak_memory_stays_near_one_shard(tmp_path):
    """Convert in a fresh process and compare its peak RSS growth with the shard sizes."""
    import subprocess
    import sys

    src = tiny_snapshot(tmp_path / "src", max_shard_bytes=16 * 2**20, dtype=torch.float32, hidden_size=256,
                        expert_intermediate_size=512, num_hidden_layers=8, vocab_size=512)
    ckpt = CheckpointDir(src)
    sizes = [(src / s).stat().st_size for s in ckpt.shards]
    assert len(sizes) >= 6
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    base, peak = map(int, run.stdout.split())
    growth = peak - base
    assert growth < 3 * max(sizes), f"peak grew {growth / 2**20:.0f} MiB; largest shard {max(sizes) / 2**20:.0f} MiB"
    assert growth < sum(sizes) / 2, "conversion must not hold the whole model"


def test_existing_output_is_refused_without_force(tiny_dir, tmp_path):
    out = tmp_path / "ec"
    _convert(tiny_dir, out, type="ec")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RetrofitError, match="already exists.*--force"):
        _convert(tiny_dir, out, type="ec")
    assert sorted(p.name for p in out.iterdir()) == before
    plan = plan_conversion(resolve_source(str(tiny_dir)), router_settings(type="block", guard_size=2), out)
    convert(plan, force=True)
    assert json.loads((out / "config.json").read_text())["router"]["type"] == "block"


def test_failed_conversion_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import retrofit.convert as conv

    def broken(*args, **kwargs):
        raise RetrofitError("verification failed: simulated")

    monkeypatch.setattr(conv, "_verify", broken)
    with pytest.raises(RetrofitError, match="simulated"):
        _convert(tiny_dir, tmp_path / "ec", type="ec")
    assert not (tmp_path / "ec").exists()
    assert list(tmp_path.glob(".ec*")) == [], "no temporary directory may remain"


def test_across_file_systems_shards_are_copied_and_the_summary_says_so(tiny_dir, tmp_path, monkeypatch):
    from retrofit.cli import app

    result = runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "ec", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert f"shards: {len(CheckpointDir(tiny_dir).shards)} hard-linked, 0 copied" in result.output

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("retrofit.io.model_dir.os.link", no_links)
    result = runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "ec", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "0 hard-linked" in result.output and "another file system" in result.output
    for shard in CheckpointDir(tiny_dir).shards:
        assert (tmp_path / "b" / shard).stat().st_ino != (tiny_dir / shard).stat().st_ino
        assert (tmp_path / "b" / shard).read_bytes() == (tiny_dir / shard).read_bytes()
