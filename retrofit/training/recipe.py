"""Fine-tuning recipes: YAML validated by one pydantic schema, with ``key.sub=value`` overrides.

Every section forbids unknown keys, so a misspelled key is an error that names it and the closest valid one.
Relative paths (``model.source``, ``data.path``) are resolved against the recipe's directory first, then the
working directory; ``checkpoint.output_dir`` is relative to the working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrofit.errors import RetrofitError
from retrofit.io.text_data import DataSection
from retrofit.routers import RouterField


Fraction = Annotated[float, Field(ge=0, lt=1)]  # Adam's betas
MaskRatio = Annotated[float, Field(gt=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    source: str = Field(description="registry name, Hub id or directory of a TC or converted checkpoint")
    router: RouterField | None = Field(default=None, description=(
        "overrides the checkpoint's router: a mapping whose type (tc, ec, block, ...) selects the router's own "
        "settings"))


class DistillSection(Section):
    weight: float = Field(default=0.0, ge=0, description="KL(teacher || student) weight at masked positions")
    temperature: float = Field(default=1.0, gt=0)


class ObjectiveSection(Section):
    eps: float = Field(default=1e-3, gt=0, lt=1, description="minimum mask probability")
    z_loss: float = Field(default=0.0, ge=0, description="router z-loss coefficient (EC-DLM used 1e-3)")
    balance_loss: float = Field(default=0.0, ge=0, description="top-k load-balancing loss coefficient (TC "
                                                               "pretraining; EC is balanced by construction)")
    distill: DistillSection = Field(default_factory=DistillSection)


class LoraSection(Section):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainableSection(Section):
    mode: Literal["routers", "routers+lora", "all"] = "routers"
    lora: LoraSection = Field(default_factory=LoraSection)


class OptimSection(Section):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1, description="sequences per micro-batch on each process")
    grad_accum: int = Field(default=1, ge=1)
    global_batch: int | None = Field(default=None, ge=1, description=(
        "sequences per optimizer step over all processes, batch_size × grad_accum × processes; when given, a "
        "launch whose product differs is refused"))
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "float32", "bfloat16"] = Field(default="auto", description=(
        "bf16 (or bfloat16): frozen weights in bf16 (fp32 master copies of the weights that train; bf16 autocast on a GPU); "
        "fp32: everything fp32; auto: bf16 on a GPU, fp32 on a CPU (LLaDA-MoE-7B needs bf16 to fit in 24 GB)"))
    activation_checkpointing: bool = False
    device: str = "auto"


class CheckpointSection(Section):
    output_dir: str
    every: int = Field(default=100, ge=1, description="save training state every N steps (and at the end)")


class LoggingSection(Section):
    every: int = Field(default=10, ge=1)


class HeldoutSection(Section):
    """Held-out masked-token loss during training, into ``heldout.jsonl`` (before the first step, every
    ``every`` steps and at the end): the same seeded masks each time, so the curve shows the model, not noise."""

    data: DataSection = Field(description="held-out text; its objective is pretrain (every token maskable)")
    every: int = Field(default=50, ge=1)
    samples: int = Field(default=2, ge=1, description="noise draws per sequence (t ~ U(0, 1))")
    mask_ratios: list[MaskRatio] = Field(default_factory=list, description="also the loss at each of these mask "
                                                                       "ratios (every token masked with it)")
    seed: int = 0


class Recipe(Section):
    model: ModelSection
    data: DataSection
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    trainable: TrainableSection = Field(default_factory=TrainableSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    checkpoint: CheckpointSection
    logging: LoggingSection = Field(default_factory=LoggingSection)
    heldout: HeldoutSection | None = None


# ----------------------------------------------------------------------------------- loading


def _schema_keys(model: type[BaseModel], path: list[str], data: dict) -> list[str]:
    """Valid keys at ``path`` of the schema (for suggestions); a router section's are its ``type``'s settings."""
    if path == ["model", "router"]:
        from retrofit.routers import ROUTERS

        section = (data.get("model") or {}).get("router") or {}
        kind = section.get("type", "tc") if isinstance(section, dict) else None
        return list(ROUTERS[kind].settings_class.model_fields) if kind in ROUTERS else []
    for key in path:
        field = model.model_fields.get(key)
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def explain(exc: ValidationError, source: str, data: dict | None = None) -> RetrofitError:
    """The first validation problem as one line; for an unknown key, name the closest valid one."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _schema_keys(Recipe, loc[:-1], data or {})
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean {'.'.join(loc[:-1] + close)}?" if close else f"; valid keys: {', '.join(valid)}"
        if loc[:-1] == ["model", "router"] and not close:
            kind = ((data or {}).get("model") or {}).get("router", {}).get("type", "tc")
            hint = f"; the {kind} router's keys are {', '.join(valid)}"
        return RetrofitError(f"{source}: unknown key {where}{hint}")
    if err["type"] == "missing":
        return RetrofitError(f"{source}: missing required key {where}")
    return RetrofitError(f"{source}: invalid {where}: {err['msg']} (got {err.get('input')!r})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` → (["optim", "lr"], 0.0003); the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RetrofitError(f"override {text!r} must look like key.sub=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RetrofitError(f"override {text!r}: {key} is not a section")
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read, override and validate a recipe; returns it with the directory its relative paths start from."""
    path = Path(path)
    if not path.is_file():
        raise RetrofitError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RetrofitError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RetrofitError(f"{path}: a recipe is a mapping of sections (model, data, ...)")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data), path.resolve().parent
    except ValidationError as exc:
        raise explain(exc, str(path), data) from None


# What a resumed run may change: how long it runs, how often it saves, logs and measures held-out loss, and how the
# global batch is split over processes (the trainer checks the product). Anything else makes another run.
RESUMABLE_CHANGES = {"optim.max_steps", "optim.batch_size", "optim.grad_accum", "optim.global_batch",
                     "optim.activation_checkpointing", "checkpoint.every", "logging", "heldout"}


def run_differences(saved: dict, recipe: Recipe) -> list[str]:
    """The settings in which ``recipe`` differs from the recipe (as ``model_dump``) that wrote a checkpoint,
    as ``key: saved -> now``, leaving out what a resumed run may change."""
    now = recipe.model_dump(mode="json")

    def walk(a, b, key: str) -> list[str]:
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            return []
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in dict.fromkeys([*a, *b]) for d in walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)]
        return [] if a == b else [f"{key}: {a!r} -> {b!r}"]

    return walk(saved, now, "")
