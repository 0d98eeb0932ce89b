"""Write a complete model directory from a source checkpoint plus a few replaced tensors.

Shared by `convert` (new routers) and `finetune` (trained routers): shards that hold no replaced tensor are
copied byte for byte (or hard-linked), the others are read one at a time and rewritten under the same name,
so peak memory stays near one shard and everything that did not change is identical to the source.
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
from retrofit.io.tokenizer_files import tokenizer_files
from retrofit.io.writer import save_tensors, write_index, write_json
from retrofit.models.llada_moe import MODEL_TYPE, is_router_tensor
from retrofit.routers import RouterSettings

ROUTER_FILE = "router.safetensors"


@dataclass
class WrittenShards:
    rewritten: list[str]
    copied: list[str]


def converted_config(raw: dict, mask_token_id: int, router: RouterSettings) -> dict:
    """The source config.json, re-typed as retrofit's own model type, with the mask id and router section."""
    out = {k: v for k, v in raw.items() if k != "auto_map"}  # auto_map points at remote code: never carry it
    out.update(model_type=MODEL_TYPE, architectures=["LLaDAMoEModelLM"], mask_token_id=mask_token_id,
               router=router.model_dump())
    return out


def _copy(src: Path, dest: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:
            pass  # another file system, or links not allowed: fall back to a copy
    shutil.copyfile(src, dest)


def write_model_directory(src: CheckpointDir, dest: Path, replaced: dict[str, torch.Tensor], config: dict,
                          card: str, link: bool = False,
                          step: Callable[[str], None] = lambda msg: None) -> WrittenShards:
    unknown = sorted(set(replaced) - set(src.weight_map))
    if unknown:
        raise RetrofitError(f"cannot replace tensors the source does not have: {unknown[:5]}")
    rewrite = {src.weight_map[name] for name in replaced}
    size_change = 0
    for shard in src.shards:
        step(f"{'rewrite' if shard in rewrite else 'copy'} {shard}")
        if shard in rewrite:
            tensors = src.read_shard(shard)
            for name in tensors.keys() & replaced.keys():
                size_change += (replaced[name].element_size() - tensors[name].element_size()) * tensors[name].numel()
                tensors[name] = replaced[name]
            save_tensors(dest / shard, tensors, src.shard_metadata(shard))
            del tensors
        else:
            _copy(src.path / shard, dest / shard, link)
    if src.is_sharded:
        if size_change:
            index = src.index
            write_index(dest, src.weight_map, index.get("metadata", {}).get("total_size", 0) + size_change)
        else:
            shutil.copyfile(src.path / INDEX_NAME, dest / INDEX_NAME)
    for f in tokenizer_files(src.path):
        shutil.copyfile(f, dest / f.name)
    routers = {n: t for n, t in replaced.items() if is_router_tensor(n)}
    save_tensors(dest / ROUTER_FILE, routers, {"format": "pt", "router": json.dumps(config["router"])})
    (dest / "README.md").write_text(card)
    write_json(dest / "config.json", config)
    return WrittenShards(sorted(rewrite), [s for s in src.shards if s not in rewrite])
