"""Write a complete model directory from a source checkpoint plus a few replaced tensors.

Shared by `convert` (new routers) and `finetune` (trained routers). Only what changed is written: shards that
hold no changed tensor are hard links to the source's files (copies across file systems, and always copies of a
model retrofit itself ships or generates, so that nothing done to an output can reach it); a shard holding a
changed tensor of the same dtype and shape (a trained router) is copied inside the kernel and those tensors'
bytes overwritten in place, so no shard passes through this process's memory and every other byte is the
source's.

A hard link is the source's file under a second name: writing *into* an output shard (truncate, an editor, a
script that patches bytes in place) changes the source too; replacing it (``rm``, ``mv``, a tool that writes a
new file and renames it) does not.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import INDEX_NAME, CheckpointDir
from retrofit.io.safetensors_file import read_header
from retrofit.io.tokenizer_files import copy_tokenizer_files
from retrofit.io.writer import WRITE_FAILURES, save_tensors, write_index, write_json

ROUTER_FILE = "router.safetensors"


@dataclass
class WrittenShards:
    linked: list[str]  # unchanged, hard-linked to the source (no bytes written)
    copied: list[str]  # unchanged, copied (another file system, or a source that is never linked)
    patched: list[str]  # copied, then the changed tensors' bytes overwritten in place
    rewritten: list[str]  # re-serialised (a changed tensor has a new dtype or shape)
    linking: bool = True  # False: the source is never linked (retrofit's own models)

    def summary(self) -> str:
        parts = [f"{len(self.linked)} hard-linked", f"{len(self.copied)} copied"]
        if self.copied:
            parts[-1] += (" (another file system: hard links impossible)" if self.linking else
                          " (retrofit's own model is never hard-linked)")
        if self.patched or self.rewritten:
            parts.append(f"{len(self.patched) + len(self.rewritten)} rewritten with changed tensors")
        return "shards: " + ", ".join(parts)


def _link_or_copy(src: Path, dest: Path) -> bool:
    """Hard-link ``src`` to ``dest`` (no bytes written), or copy it when linking is impossible; True if linked."""
    try:
        os.link(src, dest)
        return True
    except OSError:  # another file system, or links not allowed
        _copy_file(src, dest)
        return False


def _copy_file(src: Path, dest: Path) -> None:
    """A fresh copy (a new inode: safe to modify). copy_file_range shares blocks where the file system can
    (reflinks on XFS/Btrfs) and copies inside the kernel otherwise; no bytes pass through this process."""
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            remaining = os.fstat(fin.fileno()).st_size
            while remaining > 0:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
                if done == 0:
                    raise OSError("copy_file_range made no progress")
                remaining -= done
    except AttributeError:  # no copy_file_range on this platform
        shutil.copyfile(src, dest)
    except OSError as exc:
        if exc.errno in WRITE_FAILURES:
            raise  # a copy by other means would fail the same way, after as much work again
        shutil.copyfile(src, dest)  # the kernel copy is not supported here (e.g. EXDEV, EOPNOTSUPP)


def _patch(path: Path, changed: dict[str, torch.Tensor]) -> None:
    """Overwrite tensors of a safetensors file in place; each must keep its stored dtype and shape."""
    entries = read_header(path)
    with open(path, "r+b") as f:
        for name, tensor in changed.items():
            data = tensor.detach().to("cpu").contiguous()
            f.seek(entries[name].start)
            f.write(memoryview(data.view(torch.uint8).numpy()).cast("B"))


def _fits_in_place(src: CheckpointDir, shard: str, changed: dict[str, torch.Tensor]) -> bool:
    entries = read_header(src.path / shard)
    return all(entries[n].dtype == t.dtype and entries[n].shape == tuple(t.shape) for n, t in changed.items())


def write_model_directory(src: CheckpointDir, dest: Path, changed: dict[str, torch.Tensor],
                          routers: dict[str, torch.Tensor], config: dict, card: str,
                          step: Callable[[str], None] = lambda msg: None, link: bool = True) -> WrittenShards:
    """``dest`` becomes a complete model directory: the source's shards with ``changed`` tensors replaced,
    its index and tokenizer, ``router.safetensors`` (``routers``, e.g. fp32 originals of trained routers),
    the model card and config.json. Only shards holding a changed tensor are written; the others are hard links
    (copies with ``link=False``). A changed tensor keeping its stored dtype and shape is patched into a copy of
    its shard, byte for byte."""
    unknown = sorted(set(changed) - set(src.weight_map))
    if unknown:
        raise RetrofitError(f"cannot replace tensors the source does not have: {unknown[:5]}")
    written = WrittenShards([], [], [], [], linking=link)
    size_change = 0
    for shard in src.shards:
        mine = {n: t for n, t in changed.items() if src.weight_map[n] == shard}
        if not mine and not link:
            step(f"copy {shard}")
            _copy_file(src.path / shard, dest / shard)
            written.copied.append(shard)
        elif not mine:
            step(f"link {shard}")
            (written.linked if _link_or_copy(src.path / shard, dest / shard) else written.copied).append(shard)
        elif _fits_in_place(src, shard, mine):
            step(f"patch {shard}")
            _copy_file(src.path / shard, dest / shard)
            _patch(dest / shard, mine)
            written.patched.append(shard)
        else:
            step(f"rewrite {shard}")
            tensors = src.read_shard(shard)
            for name, tensor in mine.items():
                size_change += tensor.nbytes - tensors[name].nbytes
                tensors[name] = tensor
            save_tensors(dest / shard, tensors, src.shard_metadata(shard))
            del tensors
            written.rewritten.append(shard)
    if src.is_sharded:
        if size_change:
            index = src.index
            write_index(dest, src.weight_map, index.get("metadata", {}).get("total_size", 0) + size_change)
        else:
            shutil.copyfile(src.path / INDEX_NAME, dest / INDEX_NAME)
    copy_tokenizer_files(src.path, dest)
    save_tensors(dest / ROUTER_FILE, routers, {"format": "pt", "router": json.dumps(config["router"])})
    (dest / "README.md").write_text(card)
    write_json(dest / "config.json", config)
    return written
