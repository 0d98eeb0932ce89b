"""Training-state checkpoints: trainable weights, optimizer, scheduler and RNG state, written atomically.

Layout: ``<output_dir>/checkpoints/step-000050/{trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt,
state.json}``. Only the newest ``KEEP`` are kept. ``--resume`` continues from the newest one and ends with
the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from retrofit.errors import RetrofitError
from retrofit.io.writer import atomic_directory, save_tensors, write_json
from retrofit.training.sharding import copy_whole_into, shard_optimizer_state

KEEP = 2


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir(output_dir).glob("step-[0-9]*"))
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler, noise_gen: torch.Generator, state: dict) -> Path:
    """``trainable`` and ``optimizer_state`` whole (:mod:`retrofit.training.sharding`), as one process has them."""
    path = checkpoint_dir(output_dir) / f"step-{step:06d}"
    with atomic_directory(path, force=True) as tmp:
        save_tensors(tmp / "trainable.safetensors", trainable)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"noise": noise_gen.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, **state})
    for old in sorted(checkpoint_dir(output_dir).glob("step-[0-9]*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, noise_gen: torch.Generator) -> dict:
    """Restore everything saved by :func:`save_checkpoint` (into this rank's slices of sharded parameters and
    optimizer state under FSDP); returns its state.json."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(weights) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise RetrofitError(f"checkpoint {path} does not fit this recipe's trainable parameters (e.g. {missing[0]}); "
                            "resume with the recipe that wrote it")
    for name, tensor in weights.items():
        copy_whole_into(params[name], tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    noise_gen.set_state(rng["noise"])
    torch.set_rng_state(rng["torch"])
    return json.loads((path / "state.json").read_text())
