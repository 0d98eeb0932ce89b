"""Read safetensors tensors straight into memory that is already allocated.

``safe_open(...).get_tensor`` returns a fresh tensor (or an mmap-backed one that keeps the file's pages in the
process), so loading a 14.7 GB model through it holds each tensor twice for a moment and maps whole shards.
Here the header is parsed once and each tensor's bytes are read with ``readinto`` directly into its place in
the model (or, when the dtype differs, into one tensor-sized buffer that is then cast), so the only large
allocation is the model itself. The format is simple: an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from retrofit.errors import RetrofitError

# The format's dtype codes, for reading here and for writing (io/writer.py).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype, shape and byte range, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < size <= _MAX_HEADER:
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
            file_size = f.seek(0, 2)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RetrofitError(f"cannot read shard {path}: {exc}; the file is corrupt or incomplete, download it "
                            "again") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise RetrofitError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        nbytes = math.prod(shape) * dtype.itemsize
        start = 8 + size + begin
        if end - begin != nbytes or start + nbytes > file_size:
            raise RetrofitError(f"cannot read shard {path}: tensor {name} lies outside the file or has the wrong "
                                "size; the file is corrupt or incomplete, download it again")
        entries[name] = TensorEntry(dtype, shape, start, nbytes)
    return entries


def read_into(f, entry: TensorEntry, out: torch.Tensor, name: str = "tensor") -> None:
    """Fill ``out`` (contiguous, same number of elements, any float dtype) with the tensor at ``entry``."""
    if out.numel() != math.prod(entry.shape):
        raise RetrofitError(f"shape mismatch for {name}: checkpoint {entry.shape}, model expects {tuple(out.shape)}")
    target = out if out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu" else \
        torch.empty(entry.shape, dtype=entry.dtype)
    f.seek(entry.start)
    view = memoryview(target.view(torch.uint8).numpy()).cast("B") if entry.nbytes else b""
    if entry.nbytes and f.readinto(view) != entry.nbytes:
        raise RetrofitError(f"{name}: file ended early; the shard is incomplete")
    if target is not out:
        out.copy_(target.view(out.shape))  # casts to the model's dtype (bf16 → fp64 is exact)
