"""Read a checkpoint directory laid out like a Hub snapshot, one shard at a time.

A directory holds ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json`` plus
the shards it names. Only safetensors are read (a pickle can run code); nothing here loads a whole model
unless asked, so peak memory stays near the largest shard.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from retrofit.errors import RetrofitError

CONFIG_NAME = "config.json"
SINGLE_SHARD = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RetrofitError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise RetrofitError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


class CheckpointDir:
    """A local checkpoint directory: its raw config, its shards and which shard holds which tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise RetrofitError(f"checkpoint directory not found: {self.path} (pass an existing --src PATH)")
        if not (self.path / CONFIG_NAME).is_file():
            raise RetrofitError(f"{self.path} has no config.json; is it a model directory?")
        if not (self.path / SINGLE_SHARD).is_file() and not (self.path / INDEX_NAME).is_file():
            pickles = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {', '.join(pickles)}: retrofit loads safetensors only)" if pickles else ""
            raise RetrofitError(f"{self.path} has no {SINGLE_SHARD} or {INDEX_NAME}{hint}")

    @cached_property
    def config(self) -> dict:
        return read_json(self.path / CONFIG_NAME)

    @property
    def is_sharded(self) -> bool:
        return (self.path / INDEX_NAME).is_file()

    @cached_property
    def index(self) -> dict:
        return read_json(self.path / INDEX_NAME) if self.is_sharded else {}

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name → shard file name, in the order the checkpoint lists them."""
        if not self.is_sharded:
            return {name: SINGLE_SHARD for name in self._shard_keys(SINGLE_SHARD)}
        index = self.index
        if not isinstance(index.get("weight_map"), dict):
            raise RetrofitError(f"{self.path / INDEX_NAME} has no weight_map")
        weight_map = index["weight_map"]
        for shard in set(weight_map.values()):
            if not (self.path / shard).is_file():
                raise RetrofitError(f"shard {shard} named in {INDEX_NAME} is missing from {self.path}")
        return weight_map

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def tensors_in(self, shard: str) -> list[str]:
        return [name for name, s in self.weight_map.items() if s == shard]

    def _open(self, shard: str):
        try:
            return safe_open(str(self.path / shard), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
            raise RetrofitError(f"cannot read shard {self.path / shard}: {exc}; the file is corrupt or "
                                "incomplete, download it again") from None

    def _shard_keys(self, shard: str) -> list[str]:
        with self._open(shard) as f:
            return list(f.keys())

    def read_shard(self, shard: str) -> dict[str, torch.Tensor]:
        """Every tensor of one shard (the unit of peak memory during convert)."""
        return self.read(self.tensors_in(shard))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, opening each shard once."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise RetrofitError(f"tensor {name} is not in the checkpoint at {self.path}")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            with self._open(shard) as f:
                present = set(f.keys())
                for name in shard_names:
                    if name not in present:
                        raise RetrofitError(f"shard {shard} lacks tensor {name} that the index promises")
                    try:
                        out[name] = f.get_tensor(name)
                    except Exception as exc:
                        raise RetrofitError(f"cannot read {name} from {self.path / shard}: {exc}") from None
        return out

    def tensor_info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of one tensor, read from the shard header without loading the data."""
        with self._open(self.weight_map[name]) as f:
            sl = f.get_slice(name)
            return sl.get_dtype(), tuple(sl.get_shape())

    def entries(self, names: list[str]):
        """Stored dtype, shape and byte range of each named tensor, from the shard headers alone."""
        from retrofit.io.safetensors_file import read_header

        out = {}
        for shard in dict.fromkeys(self.weight_map[n] for n in names):
            header = read_header(self.path / shard)
            out.update({n: header[n] for n in names if self.weight_map[n] == shard})
        return out

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D tensor (``[len(rows), d]``, the stored dtype), reading only those rows' bytes."""
        entry = self.entries([name])[name]
        width = entry.shape[1]
        row_bytes = width * entry.dtype.itemsize
        out = torch.empty(len(rows), width, dtype=entry.dtype)
        buffer = out.view(torch.uint8).numpy()
        with open(self.path / self.weight_map[name], "rb") as f:
            for i, row in enumerate(rows):
                if not 0 <= row < entry.shape[0]:
                    raise RetrofitError(f"row {row} is outside {name} ({entry.shape[0]} rows)")
                if i == 0 or rows[i - 1] + 1 != row:  # consecutive rows need no seek
                    f.seek(entry.start + row * row_bytes)
                f.readinto(memoryview(buffer[i]).cast("B"))
        return out

    def shard_metadata(self, shard: str) -> dict[str, str] | None:
        with self._open(shard) as f:
            return f.metadata()
