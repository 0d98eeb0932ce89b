"""Write atomically, and safetensors shards: everything goes into a hidden temporary file or directory next to
its destination and is renamed into place only when complete, so an interrupted or failed write never leaves a
file or directory that looks good (``atomic_directory`` for a new directory, ``atomic_entries`` for files added
to an existing one, ``atomic_file`` for one file)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from safetensors.torch import save_file

from retrofit.errors import RetrofitError, warn
from retrofit.io.checkpoint import INDEX_NAME, SINGLE_SHARD
from retrofit.io.safetensors_file import DTYPES


def check_writable(path: Path, what: str = "to") -> None:
    """Before long work starts: the nearest existing folder on ``path``'s way must accept new files (a read-only
    mount or a folder without permission fails here, in one line, not after the work)."""
    folder = Path(path).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RetrofitError(f"cannot write {what} {path}: {folder} is not writable (read-only or no permission); "
                            "choose another location")


def check_destination(out: Path, force: bool) -> None:
    check_writable(out.parent, "the output directory into")
    if out.exists() and not force:
        raise RetrofitError(f"output directory {out} already exists; pass --force to replace it or choose --out")
    if out.exists() and not out.is_dir():
        raise RetrofitError(f"output path {out} exists and is not a directory")


WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                   errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


@contextmanager
def write_failures_as_errors(what: Path, kept: str = "nothing was kept") -> Iterator[None]:
    """A full disk, a quota or a read-only file system met while writing ``what`` becomes one line, ending with
    ``kept`` (what is still there). Libraries with their own error types (safetensors, tokenizers) carry the OS
    message inside: those are recognised by it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_FAILURES:
            raise
        raise RetrofitError(f"writing {what} failed: {WRITE_FAILURES[exc.errno]}; {kept}") from None
    except Exception as exc:
        reason = next((text for code, text in WRITE_FAILURES.items() if os.strerror(code) in str(exc)), None)
        if reason is None:
            raise
        raise RetrofitError(f"writing {what} failed: {reason}; {kept}") from None


@contextmanager
def atomic_directory(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any failure it is deleted."""
    out = Path(out).expanduser().resolve()
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with write_failures_as_errors(out):
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


@contextmanager
def atomic_entries(directory: Path, last: str, kept: str = "nothing was kept") -> Iterator[Path]:
    """Yield a hidden folder inside the existing ``directory``; on success each of its entries replaces the
    entry of the same name in ``directory``, ``last`` moved last (a directory that is complete only once its
    ``last`` file exists, e.g. config.json, never looks complete early); on failure it is deleted."""
    partial = directory / f".{last}.entries-partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        with write_failures_as_errors(directory, kept):
            yield partial
        names = sorted(p.name for p in partial.iterdir())
        for name in [n for n in names if n != last] + [n for n in names if n == last]:
            dest = directory / name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                # rename() onto another hard link of the same file does nothing (POSIX): remove it first.
                dest.unlink()
            os.replace(partial / name, dest)
        partial.rmdir()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on failure it is
    removed (OSErrors pass through: callers say what the file was for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_partials(out: Path) -> None:
    """A run killed hard (kill -9, power loss) leaves its hidden temporary directory behind, as large as the
    model; the next write of the same output removes such leftovers (ours by name) and says so, counting only
    the bytes that removing them frees (a hard link to a source's shard frees nothing)."""
    for stale in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if stale.is_dir():
            files = [f.stat() for f in stale.rglob("*") if f.is_file()]
            freed = sum(st.st_size for st in files if st.st_nlink == 1)
            shutil.rmtree(stale, ignore_errors=True)
            warn(f"removed {stale.name}, {freed / 1e9:.2f} GB (of files no other directory links to) left by an "
                 f"interrupted earlier write of {out.name}")


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


_T = TypeVar("_T")


def _greedy_split(items: Iterable[_T], nbytes: Callable[[_T], int], max_shard_bytes: int) -> list[list[_T]]:
    """Greedy split in the given order; an item larger than the limit gets a shard of its own."""
    shards: list[list[_T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def split_into_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    groups = _greedy_split(tensors.items(), lambda item: item[1].numel() * item[1].element_size(), max_shard_bytes)
    return [dict(group) for group in groups]


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


# --- Streaming writes: one tensor (or one chunk of one) in memory at a time -----------------------------------

SAFETENSORS_DTYPES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, before it exists: enough to plan a safetensors header and the shards."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


TensorData = torch.Tensor | Iterable[torch.Tensor]


class StreamingShardWriter:
    """Write one safetensors file a tensor at a time, never holding the file's tensors together.

    The header is planned from the specs alone (8-byte little-endian header length, the JSON header padded
    with spaces to a multiple of 8, then the raw little-endian bytes). The data is laid out like safetensors
    itself lays it out, larger element types first (a stable sort, so a single-dtype file keeps the given
    order), so every tensor stays aligned to its element size; ``layout`` is that order, and :meth:`write`
    must be called in it. A tensor may be given whole or as an iterable of chunks whose row-major
    concatenation is the tensor. Use as a context manager; an error leaves a partial file for the caller's
    atomic directory to discard.
    """

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None,
                 on_bytes: Callable[[int], None] | None = None):
        if sys.byteorder != "little":
            raise RetrofitError("safetensors files are little-endian; this machine is not")
        specs = list(specs)
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen or spec.name == "__metadata__":
                raise ValueError(f"tensor name {spec.name!r} is duplicated or reserved")
            if spec.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors code")
            seen.add(spec.name)
        self.path = Path(path)
        self.layout: list[TensorSpec] = sorted(specs, key=lambda spec: -spec.dtype.itemsize)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self.layout:
            header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.header = len(encoded).to_bytes(8, "little") + encoded
        self.data_bytes = offset
        self.file_bytes = len(self.header) + offset
        self._on_bytes = on_bytes
        self._next = 0
        self._file = None

    def __enter__(self) -> "StreamingShardWriter":
        self._file = open(self.path, "wb")
        self._file.write(self.header)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        file.close()
        if exc_type is None:
            if self._next != len(self.layout):
                missing = [spec.name for spec in self.layout[self._next:]]
                raise ValueError(f"{self.path.name}: {len(missing)} tensor(s) never written, first {missing[0]}")
            self.path.chmod(0o666 & ~_umask())

    def write(self, name: str, data: TensorData) -> None:
        if self._file is None:
            raise ValueError("StreamingShardWriter.write outside its `with` block")
        if self._next >= len(self.layout):
            raise ValueError(f"{self.path.name}: {name} is not in the planned header (all tensors written)")
        spec = self.layout[self._next]
        if name != spec.name:
            raise ValueError(f"{self.path.name}: expected {spec.name} next, got {name}")
        if isinstance(data, torch.Tensor):
            if tuple(data.shape) != spec.shape:
                raise ValueError(f"{name}: shape {tuple(data.shape)}, planned {spec.shape}")
            data = (data,)
        written = 0
        for chunk in data:
            if chunk.dtype != spec.dtype:
                raise ValueError(f"{name}: dtype {chunk.dtype}, planned {spec.dtype}")
            raw = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            if written + raw.nbytes > spec.nbytes:
                raise ValueError(f"{name}: more data than the planned {spec.nbytes} bytes")
            self._file.write(memoryview(raw))
            written += raw.nbytes
            if self._on_bytes is not None:
                self._on_bytes(raw.nbytes)
        if written != spec.nbytes:
            raise ValueError(f"{name}: {written} bytes written, planned {spec.nbytes}")
        self._next += 1


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[tuple[str, list[TensorSpec]]]:
    """Greedy split of the specs, in their order, into named shards (the names ``write_sharded`` uses)."""
    groups = _greedy_split(specs, lambda spec: spec.nbytes, max_shard_bytes)
    return list(zip(shard_names(len(groups)), groups))


def write_streaming_sharded(directory: Path, specs: Sequence[TensorSpec], max_shard_bytes: int,
                            make: Callable[[TensorSpec], TensorData],
                            on_bytes: Callable[[int], None] | None = None) -> dict[str, str]:
    """Like :func:`write_sharded`, but each tensor is made by ``make(spec)`` just before it is written (whole
    or as chunks) and dropped right after, so memory stays at one tensor however large the checkpoint.
    Writes the index when there is more than one shard; returns the weight map (in the specs' order)."""
    weight_map: dict[str, str] = {}
    for shard, group in plan_shards(specs, max_shard_bytes):
        with StreamingShardWriter(directory / shard, group, on_bytes=on_bytes) as writer:
            for spec in writer.layout:
                writer.write(spec.name, make(spec))
        weight_map.update(dict.fromkeys((spec.name for spec in group), shard))
    if len(set(weight_map.values())) > 1:
        write_index(directory, weight_map, sum(spec.nbytes for spec in specs))
    return weight_map
