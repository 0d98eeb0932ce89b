"""The end of a fine-tuning run: its output directory becomes a full model directory, like `convert` writes (the
trained tensors in the checkpoint's own dtype, their fp32 masters in router.safetensors, a peft adapter with
LoRA, a model card with the recipe), moved into place with config.json last."""

from __future__ import annotations

from pathlib import Path

import torch

from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.model_card import model_card
from retrofit.io.model_dir import write_model_directory
from retrofit.io.writer import atomic_entries
from retrofit.models import family_of
from retrofit.models.moe import hub_state_dict
from retrofit.sources import Source
from retrofit.training.checkpoints import checkpoint_dir
from retrofit.training.recipe import Recipe
from retrofit.training.sharding import whole, whole_trainable
from retrofit.training.trainable import router_parameter_names


def export_run(base: torch.nn.Module, trained: torch.nn.Module, ckpt: CheckpointDir, source: Source, recipe: Recipe,
               recipe_text: str, output_dir: Path, main: bool) -> None:
    """``base``: the native model; ``trained``: what trained (a peft model with LoRA). Every rank gathers the
    trained tensors (under FSDP each holds a slice); only the main rank writes."""
    routers = set(router_parameter_names(base))
    masters = {name: whole(p.detach()).float().cpu() for name, p in base.named_parameters() if name in routers}
    lora = whole_trainable(trained) if recipe.trainable.mode == "routers+lora" else None
    if not main:
        return
    tensors = hub_state_dict(base) if recipe.trainable.mode == "all" else masters
    # Stored in the checkpoint's own dtype (config.json's torch_dtype stays true); the fp32 masters of the
    # routers go to router.safetensors.
    stored = {name: entry.dtype for name, entry in ckpt.entries(list(tensors)).items()}
    changed = {name: t.detach().cpu().to(stored[name]) for name, t in tensors.items()}
    config = base.config
    converted = family_of(config).converted_config(ckpt.config, config.mask_token_id, config.router_settings)
    card = run_model_card(config, source, recipe, recipe_text, output_dir)
    kept = (f"the model was not exported, the training checkpoints in {checkpoint_dir(output_dir)} are kept: free "
            "space and run the same command with --resume to export it")
    with atomic_entries(output_dir, last="config.json", kept=kept) as partial:
        write_model_directory(ckpt, partial, changed, masters, converted, card, link=source.linkable)
        if lora is not None:  # peft keeps the adapters' tensors of this state dict
            trained.save_pretrained(str(partial / "adapter"), state_dict=lora)


def run_model_card(config, source: Source, recipe: Recipe, recipe_text: str, output_dir: Path) -> str:
    mode = recipe.trainable.mode
    body = (f"Router fine-tuning of `{source.origin}` by retrofit ({config.router_settings.describe()})."
            f" Trainable: {mode}. Only the router tensors differ from the source; they are also in "
            f"`router.safetensors`.{' LoRA adapters are in `adapter/`.' if mode != 'routers' else ''}\n\n"
            f"Recipe:\n\n```yaml\n{recipe_text}\n```\n")
    tags = [family_of(config).name, f"{config.router_settings.type}-routing"]
    return model_card(output_dir.name, body, base_model=source.origin, tags=tags)
