"""`small` (--src small): built into the cache by `make small`, refused in one line until then, packed with its
held-out record like tiny, and never written into through an output."""

from __future__ import annotations

import json
import shutil

import pytest

from retrofit.cli import app
from retrofit.sources import built_path, is_own_model, resolve_source
from retrofit.tools.embedded import pack
from tests.helpers import one_line_error, runner, shared_data_dir, tiny_snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_small_is_refused_until_built(cache):
    line = one_line_error(runner.invoke(app, ["convert", "--src", "small", "--router", "ec"]))
    assert "small LLaDA-MoE (64 experts, top-8) is not built" in line and "`make small`" in line
    assert "small" in " ".join(runner.invoke(app, ["eval", "--help"]).output.split())


def test_packed_small_is_found_and_never_linked(tmp_path, cache):
    trained = tiny_snapshot(tmp_path / "trained", seed=4, num_experts=16, num_experts_per_tok=4)
    record = pack(trained, shared_data_dir() / "gsm8k", built_path("small"), "small", heldout_examples=20)
    source = resolve_source("small")
    assert source.path == built_path("small") and not source.linkable and is_own_model(source.path)
    assert record["recipe"] == "recipes/small-pretrain.yaml"
    assert record["heldout_masked_token_loss"] > 0 and record["unigram_baseline_loss"] > 0
    card = (source.path / "README.md").read_text()
    assert "# retrofit small (64 experts, top-8)" in card and "`make small`" in card
    assert json.loads((source.path / "training.json").read_text()) == record
    out = tmp_path / "ec"
    assert runner.invoke(app, ["convert", "--src", "small", "--router", "ec", "--out", str(out)]).exit_code == 0
    shards = sorted(p.name for p in source.path.glob("*.safetensors"))
    assert shards and all((out / name).stat().st_ino != (source.path / name).stat().st_ino  # copies, not links:
                          for name in shards)  # writing into an output cannot damage small
    shutil.rmtree(out)
