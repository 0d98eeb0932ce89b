"""Shared fixtures: tiny models of the real architecture, built in tmp_path; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retrofit.tiny import build_tiny_model, write_hub_snapshot

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def _cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retrofit-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, _cache):
    # A test must never reach the Hub; make any attempt fail fast instead of hanging on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Generated models (tiny-random) go to a per-session cache, never the user's.
    monkeypatch.setenv("RETROFIT_CACHE", str(_cache))


@pytest.fixture
def tiny_model():
    return build_tiny_model(seed=0)


@pytest.fixture
def tiny_dir(tmp_path, tiny_model) -> Path:
    """A Hub-style snapshot of the tiny model, bf16, in several shards."""
    return write_hub_snapshot(tiny_model, tmp_path / "tiny-src", max_shard_bytes=64 * 1024)


def random_ids(model, batch=2, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=gen)
    ids[:, ::4] = model.config.mask_token_id
    return ids


def one_line_error(result) -> str:
    """A CLI result that failed the way a user mistake must: exit 1, one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def write_arc_mmlu(root: Path) -> Path:
    """Small ARC and MMLU files in their Hub schemas under ``root``, beside a link to the shared GSM8K."""
    for folder in ("ARC-Challenge", "ARC-Easy"):
        for split, n in (("train", 3), ("validation", 2), ("test", 4)):
            rows = [{"id": f"{split}{i}", "question": f"What is {i} plus one?",
                     "choices": {"text": [str(i + 1), str(i + 2), str(i)], "label": ["A", "B", "C"]},
                     "answerKey": "A"} for i in range(n)]
            path = root / "arc" / folder / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for subject in ("anatomy", "astronomy"):
        for split, n in (("dev", 5), ("test", 3)):
            rows = [{"question": f"{subject} {i}?", "subject": subject, "choices": ["w", "x", "y", "z"],
                     "answer": i % 4} for i in range(n)]
            path = root / "mmlu" / subject / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "gsm8k").symlink_to(SHARED_DATA / "gsm8k")
    return root


def pairwise_experts(experts, x: torch.Tensor, routing) -> torch.Tensor:
    """The experts' output one (token, expert, gate) triple at a time."""
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for token, expert, gate in zip(*routing.pairs()):
        h = x[token]
        h = torch.nn.functional.silu(experts.gate_proj[expert] @ h) * (experts.up_proj[expert] @ h)
        rows[token] = rows[token] + gate * (experts.down_proj[expert] @ h)
    return torch.stack(rows)
