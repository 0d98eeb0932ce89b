"""Load a checkpoint directory (Hub snapshot, converted or fine-tuned) into retrofit's native model."""

from __future__ import annotations

from pathlib import Path

import torch

from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.tokenizer_files import mask_token_id
from retrofit.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM, config_from_checkpoint, load_hub_tensors
from retrofit.routers import RouterSettings


def checkpoint_config(ckpt: CheckpointDir, router: RouterSettings | None = None) -> LLaDAMoEConfig:
    """The validated config of a checkpoint; the mask id comes from its tokenizer when config.json lacks it
    (the Hub's does), and ``router`` overrides the checkpoint's own router settings."""
    raw = dict(ckpt.config)
    if "mask_token_id" not in raw:
        found = mask_token_id(ckpt.path)
        if found is not None:
            raw["mask_token_id"] = found
    if router is not None:
        raw["router"] = router.model_dump()
    return config_from_checkpoint(raw)


def load_model(path: str | Path | CheckpointDir, router: RouterSettings | None = None,
               dtype: torch.dtype = torch.float32) -> LLaDAMoEModelLM:
    """Build the model from config.json and load every tensor strictly (a missing or extra tensor is an
    error). Weights are cast to ``dtype`` (fp32 by default: bf16 matmuls are ~3x slower on CPUs)."""
    ckpt = path if isinstance(path, CheckpointDir) else CheckpointDir(path)
    config = checkpoint_config(ckpt, router)
    model = LLaDAMoEModelLM(config)
    tensors = {}
    for shard in ckpt.shards:
        tensors.update({k: v.to(dtype) for k, v in ckpt.read_shard(shard).items()})
    load_hub_tensors(model, tensors)
    return model.to(dtype).eval()
