"""Write checkpoint directories atomically: everything goes into a hidden temporary directory next to the
destination and is renamed into place only when complete, so an interrupted or failed write never leaves a
directory that looks like a good checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import INDEX_NAME, SINGLE_SHARD


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise RetrofitError(f"output directory {out} already exists; pass --force to replace it or choose --out")
    if out.exists() and not out.is_dir():
        raise RetrofitError(f"output path {out} exists and is not a directory")


@contextmanager
def atomic_directory(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any failure it is deleted."""
    out = Path(out).expanduser().resolve()
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private 0700 directory and some writers make 0600 files; give the result the
    permissions a plain mkdir and open would have."""
    umask = _umask()
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses views that share storage; contiguous copies are cheap next to the disk write.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    path.chmod(0o666 & ~_umask())  # safetensors creates 0600 files; give them a plain file's permissions


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_SHARD]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_into_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, str]:
    """Write tensors as Hub-style shards (+ index when more than one); returns the weight map."""
    shards = split_into_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map = {}
    for name, shard in zip(names, shards):
        save_tensors(directory / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        write_index(directory, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
    return weight_map


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    write_json(directory / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
