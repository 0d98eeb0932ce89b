"""Running one fine-tuning of a study: the study's recipe plus the run's overrides, into the run's folder,
resumed from its last checkpoint when an earlier attempt was interrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from retrofit.training.logs import HELDOUT_FILE


def finetune_run(recipe: Path, overrides: list[str], work: Path, progress: Callable[[str], None]) -> dict:
    """Fine-tune into ``work/model``; returns the held-out curve (``heldout.jsonl``) and the output folder."""
    from retrofit.training.checkpoints import latest_checkpoint
    from retrofit.training.recipe import load_recipe
    from retrofit.training.trainer import Finetune

    out = work / "model"
    parsed, recipe_dir = load_recipe(recipe, [*overrides, f"checkpoint.output_dir={out}"])
    resume = latest_checkpoint(out) is not None
    if not resume and out.exists():
        shutil.rmtree(out)  # an attempt that stopped before its first checkpoint: start over
    job = Finetune(parsed, recipe_dir, recipe.read_text(), resume=resume,
                   progress=lambda done, total, values: progress(f"step {done}/{total}"))
    job.run()
    curve = [json.loads(line) for line in (out / HELDOUT_FILE).read_text().splitlines()]
    return {"curve": curve, "model": str(out), "overrides": list(overrides)}
