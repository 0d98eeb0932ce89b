"""`make demo` end to end at a smaller size: every variant evaluated, ARC/MMLU picked up when local data exists."""

from __future__ import annotations

import json
import math

import pytest

from retrofit.tools import demo
from tests.helpers import REPO, write_arc_mmlu

VARIANTS = ["TC (checkpoint)", "EC", "EC fine-tuned", "block (32, guard 2)"]


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
    """The demo reads recipes/ from the working directory, as `make demo` runs it from the repository root."""
    monkeypatch.chdir(REPO)


@pytest.mark.slow
def test_demo_runs_every_variant_on_every_local_task(tmp_path):
    data = write_arc_mmlu(tmp_path / "data")
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--limit", "1", "--steps", "2", "--gen-length", "32", "--heldout-examples", "16",
               "--data-dir", str(data)])
    rows = json.loads((out / "demo.json").read_text())
    assert list(rows) == VARIANTS
    for row in rows.values():
        assert {"gsm8k", "arc_challenge", "arc_easy", "mmlu"} <= set(row["results"])
        assert math.isfinite(row["heldout_loss"]) and row["tokens_per_s"] > 0
        assert 0 < row["unique_experts_per_block"] <= row["unique_experts"] <= 8
    assert rows["block (32, guard 2)"]["router"].startswith("block") and rows["EC"]["router"].startswith("ec")
    headers = [column.header for column in demo.table(rows, demo.tasks_available(data)).columns]
    assert headers[1:5] == ["gsm8k", "arc-c", "arc-e", "mmlu"]


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/nonexistent"], "no data directory at /nonexistent; pass --data-dir DIR holding gsm8k/train"),
    (["--data-dir", "/"], "no GSM8K train file at /gsm8k/train.jsonl; pass --data-dir"),
    (["--limit", "0"], "--limit: must be at least 1, got 0"),
    (["--gen-length", "40"], "--gen-length must be a multiple of 32"),
])
def test_demo_bad_options_are_one_line_errors(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(tmp_path), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
