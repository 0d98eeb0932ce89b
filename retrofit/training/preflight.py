"""What can be known about a fine-tuning run before any weight is read: the one list of checks that `retrofit
validate` runs and `retrofit finetune` runs first, so that validate says ok only where finetune would start.

Data files (present, not empty, UTF-8, one JSON document per jsonl line), the model source (resolved; a Hub id
only when it is already downloaded, for validate), its config.json against its ranges and its weights' shapes
(shard headers only), its tokenizer, the router settings against the model, ``data.seq_len`` against its
positions, LoRA target modules against its module names, and the output directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import check_weights_fit, checkpoint_config
from retrofit.io.paths import looks_like_path, resolve_path
from retrofit.io.text_data import DataSection, check_data_file
from retrofit.io.tokenizer_files import require_tokenizer
from retrofit.io.writer import check_writable
from retrofit.sources import Source, resolve_source
from retrofit.training.checkpoints import latest_checkpoint
from retrofit.training.recipe import Recipe, run_differences
from retrofit.training.trainable import check_lora_targets


@dataclass
class Preflight:
    source: Source | None  # None: a Hub id not downloaded yet (validate only; finetune downloads it)
    output_dir: Path
    resume_from: Path | None  # the newest checkpoint in output_dir


def check_recipe(recipe: Recipe, recipe_dir: Path, resume: bool = False, download: bool = True) -> Preflight:
    """Every check above, each failing as one line; ``download=False`` leaves a Hub id that is not in the local
    cache unchecked (``Preflight.source`` None) instead of fetching it."""
    output_dir = Path(recipe.checkpoint.output_dir).expanduser().resolve()
    check_writable(output_dir, "checkpoint.output_dir")
    resume_from = latest_checkpoint(output_dir)
    if resume and resume_from is None:
        raise RetrofitError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}")
    if not resume and resume_from is not None:
        raise RetrofitError(f"{output_dir} already holds checkpoints; pass --resume to continue, or choose another "
                            "checkpoint.output_dir")
    if resume:
        check_same_run(recipe, resume_from)
    check_data(recipe.data, recipe_dir, "data")
    if recipe.heldout is not None:
        check_data(recipe.heldout.data, recipe_dir, "heldout.data")
    source = model_source(recipe.model.source, recipe_dir, download)
    if source is not None:
        check_model(recipe, CheckpointDir(source.path))
    return Preflight(source, output_dir, resume_from)


def check_same_run(recipe: Recipe, checkpoint: Path) -> None:
    """``--resume`` continues the run that wrote ``checkpoint`` only with that run's recipe and overrides (less
    what a resumed run may change); anything else would silently continue or re-export another run."""
    saved = json.loads((checkpoint / "state.json").read_text()).get("recipe")
    differ = run_differences(saved, recipe) if saved is not None else []
    if differ:
        raise RetrofitError(f"--resume: {checkpoint} was written by another recipe ({'; '.join(differ[:3])}); "
                            "resume with the recipe and key=value overrides that started the run")


def check_data(section: DataSection, recipe_dir: Path, key: str) -> None:
    local = resolve_path(section.path, recipe_dir)
    if local is None and looks_like_path(section.path):
        raise RetrofitError(f"{key}.path not found: {section.path} (looked beside the recipe and in the working "
                            "directory)")
    if local is not None:
        check_data_file(local)


def model_source(source: str, recipe_dir: Path, download: bool = True) -> Source | None:
    """``model.source`` as a local directory (beside the recipe first), a registry name or a Hub id."""
    local = resolve_path(source, recipe_dir)
    if local is not None and local.is_dir():
        return resolve_source(str(local), flag="model.source")
    if looks_like_path(source):
        raise RetrofitError(f"model.source not found: {source} (a directory, looked beside the recipe and in the "
                            "working directory)")
    return resolve_source(source, flag="model.source", download=None if download else _cached_only)


def _cached_only(repo_id: str, flag: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache (or no huggingface_hub cache at all): nothing to check yet
        return None


def check_model(recipe: Recipe, ckpt: CheckpointDir) -> None:
    config = checkpoint_config(ckpt, recipe.model.router)  # ranges, mask id, the router against the model
    model = check_weights_fit(ckpt, config)  # on the meta device: no memory
    require_tokenizer(ckpt.path)
    if recipe.data.seq_len > config.max_position_embeddings:
        raise RetrofitError(f"data.seq_len {recipe.data.seq_len} exceeds the model's max_position_embeddings "
                            f"({config.max_position_embeddings}); set data.seq_len={config.max_position_embeddings}"
                            " or less")
    if recipe.trainable.mode == "routers+lora":
        check_lora_targets(model, recipe.trainable.lora.target_modules)
