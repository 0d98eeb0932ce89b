"""Helpers the test modules share: plain functions and constants (the fixtures live in conftest.py), imported as
``from tests.helpers import ...`` so that no test module imports another."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from retrofit.tiny import build_tiny_model, write_hub_snapshot
from retrofit.training.recipe import load_recipe
from retrofit.training.trainer import Finetune

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "RETROFIT_SHARED_DATA"

# The one runner of every CLI test; wide, so that rich never wraps a message a test looks for. A test of another
# width passes its own: runner.invoke(..., env={"COLUMNS": "80"}).
runner = CliRunner(env={"COLUMNS": "200"})


# ------------------------------------------------------------------------------------------ benchmark data


def shared_data_dir() -> Path:
    """The benchmark data (GSM8K, ARC, MMLU): $RETROFIT_SHARED_DATA, else ../shared/data beside the checkout.
    Missing, it fails the test that asked, naming the variable: a skip would leave fine-tuning and evaluation
    untested without anyone noticing."""
    path = Path(os.environ.get(SHARED_DATA_ENV) or REPO.parent / "shared" / "data").absolute()
    if not path.is_dir():
        pytest.fail(f"no benchmark data at {path}: set {SHARED_DATA_ENV} to the directory holding gsm8k/, arc/ "
                    "and mmlu/ (default: ../shared/data beside the checkout)", pytrace=False)
    return path


def gsm8k_train() -> Path:
    return shared_data_dir() / "gsm8k" / "train.jsonl"


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
    (root / "gsm8k").symlink_to(shared_data_dir() / "gsm8k")
    return root


# ------------------------------------------------------------------------------------------ models


def tiny_snapshot(path: Path, model=None, *, max_shard_bytes: int = 96 * 1024, dtype: torch.dtype = torch.bfloat16,
                  **build) -> Path:
    """The one way a test writes a Hub-style snapshot (the layout `retrofit convert` meets on the Hub): of ``model``,
    or of a new tiny one built from ``build`` (seed, dims, family)."""
    if model is None:
        model = build_tiny_model(**build)
    elif build:
        raise TypeError(f"build arguments {sorted(build)} go with model=None only")
    return write_hub_snapshot(model, path, max_shard_bytes=max_shard_bytes, dtype=dtype)


def random_ids(model, batch=2, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=gen)
    ids[:, ::4] = model.config.mask_token_id
    return ids


def pairwise_experts(experts, x: torch.Tensor, routing) -> torch.Tensor:
    """The experts' output one (token, expert, gate) triple at a time."""
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for token, expert, gate in zip(*routing.pairs()):
        h = x[token]
        h = torch.nn.functional.silu(experts.gate_proj[expert] @ h) * (experts.up_proj[expert] @ h)
        rows[token] = rows[token] + gate * (experts.down_proj[expert] @ h)
    return torch.stack(rows)


def loop_shape(name: str, r: float, sigma: float = 0.22, threshold: float = 0.5) -> float:
    """s(r) written out from docs/algorithms.md §5, one number at a time."""
    gauss = math.exp(-((r - 0.5) ** 2) / (2 * sigma**2))
    edge = math.exp(-0.25 / (2 * sigma**2))
    gauss = (gauss - edge) / (1 - edge)
    return {
        "linear": r,
        "linear-reverse": 1 - r,
        "cosine": (1 - math.cos(math.pi * r)) / 2,
        "cosine-reverse": (1 + math.cos(math.pi * r)) / 2,
        "bell": max(0.0, 1 - 4 * (r - 0.5) ** 2),
        "gaussian": gauss,
        "gaussian-reverse": 1 - gauss,
        "step": 1.0 if r >= threshold else 0.0,
        "step-reverse": 0.0 if r >= threshold else 1.0,
    }[name]


# ------------------------------------------------------------------------------------------ commands


def one_line_error(result) -> str:
    """A CLI result that failed the way a user mistake must: exit 1, one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def write_recipe(tmp_path: Path, source: Path, **sections) -> Path:
    """A short EC fine-tuning recipe on the shared GSM8K; ``sections`` update its sections key by key."""
    recipe = {
        "model": {"source": str(source), "router": {"type": "ec"}},
        "data": {"path": str(gsm8k_train()), "objective": "pretrain", "text_field": "question", "seq_len": 64,
                 "max_examples": 200},
        "optim": {"lr": 0.05, "max_steps": 12, "batch_size": 4, "warmup_steps": 2, "seed": 0},
        "checkpoint": {"output_dir": str(tmp_path / "run"), "every": 4},
        "logging": {"every": 2},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def finetune(path: Path, *overrides: str, resume: bool = False, progress=None):
    recipe, recipe_dir = load_recipe(path, list(overrides))
    job = Finetune(recipe, recipe_dir, path.read_text(), progress=progress, resume=resume)
    return job, job.run()


class Request:
    """What lm-eval hands the adapter: only ``args`` is read."""

    def __init__(self, *args):
        self.args = args
