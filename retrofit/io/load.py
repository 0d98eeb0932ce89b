"""Load a checkpoint directory (Hub snapshot, converted or fine-tuned) into retrofit's native model.

The one loading path of eval, finetune, the demo and the benches. The model is built on the meta device
(no memory, no random init), given its dtype there, then allocated once; every checkpoint tensor is read
straight from its shard into its place (an expert's ``[f, d]`` weight into its slot of the stacked
``[E, f, d]`` parameter), cast on the way when the dtypes differ. Nothing is held twice: peak memory is the
model plus one tensor, so LLaDA-MoE-7B loads in bf16 within ~15 GB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.safetensors_file import TensorEntry, read_header, read_into
from retrofit.io.tokenizer_files import mask_token_id
from retrofit.models import family_for_checkpoint, family_of
from retrofit.models.moe import StackedExperts, parse_expert_key
from retrofit.routers import RouterSettings, build_router


def checkpoint_config(ckpt: CheckpointDir, router: RouterSettings | None = None):
    """The validated config of a checkpoint; the mask id comes from its tokenizer when config.json lacks it
    (the Hub's does), and ``router`` overrides the checkpoint's own router settings."""
    raw = dict(ckpt.config)
    if "mask_token_id" not in raw:
        found = mask_token_id(ckpt.path)
        if found is not None:
            raw["mask_token_id"] = found
    if router is not None:
        raw["router"] = router.model_dump()
    config = family_for_checkpoint(raw, str(ckpt.path)).config_from_checkpoint(raw)
    if not 0 <= config.mask_token_id < config.vocab_size:
        where = "config.json's mask_token_id" if "mask_token_id" in ckpt.config else \
            "the default mask id (no <|mask|> in a tokenizer.json)"
        raise RetrofitError(f"{ckpt.path}: {where} is {config.mask_token_id}, outside the vocabulary of "
                            f"{config.vocab_size}; add the checkpoint's tokenizer.json or set mask_token_id in "
                            "config.json")
    check_router_fits(config, config.router_settings)
    return config


def check_router_fits(config, settings: RouterSettings) -> None:
    """Building one router surfaces settings this model cannot honour (block guard_size < top_k, or so large
    that block routing is token choice; an EC schedule past the model's experts), as one line."""
    family = family_of(config)
    try:
        build_router(settings, config.hidden_size, config.num_experts, config.num_experts_per_tok,
                     family.scoring(config))
    except ValueError as exc:
        raise RetrofitError(f"router settings do not fit this model: {exc}") from None
    problem = settings.misfit(config.num_experts, config.num_experts_per_tok)
    if problem:
        raise RetrofitError(f"router settings do not fit this model: {problem}")


ADAPTER_DIR = "adapter"


def load_model(path: str | Path | CheckpointDir, router: RouterSettings | None = None,
               dtype: torch.dtype = torch.float32, router_dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", check_memory: bool = True,
               merge_adapter: bool = True, read_weights: bool = True) -> torch.nn.Module:
    """Build the model from config.json and load every tensor strictly (a missing or extra tensor is an error).

    ``dtype``: the weights' dtype (fp32 by default: bf16 matmuls are ~3x slower on CPUs). ``router_dtype``:
    the routers' own dtype when it should differ, e.g. fp32 master copies of routers that train while the
    frozen weights stay bf16 (the router casts its weight to the activations' dtype in the forward pass).
    The model class is the checkpoint's family's (``retrofit.models``). A LoRA adapter that ``retrofit
    finetune`` wrote beside the weights (``adapter/``) is merged into them (``merge_adapter``): the model is what
    was trained, wherever it is evaluated. ``read_weights=False`` allocates the weights without reading them.
    """
    ckpt = path if isinstance(path, CheckpointDir) else CheckpointDir(path)
    config = checkpoint_config(ckpt, router)
    model = check_weights_fit(ckpt, config)  # on the meta device; a config.json that disagrees is named now
    model.to(dtype)
    if router_dtype is not None:
        for block in model.moe_blocks():
            block.gate.to(router_dtype)
    device = torch.device(device)
    if not read_weights:  # uninitialised memory, never touched here: the weights come from FSDP's rank 0
        return model.to_empty(device=device).eval()
    if check_memory and device.type == "cpu":
        _check_fits(model, dtype)
    model.to_empty(device=device)
    _fill(model, ckpt)
    if merge_adapter and has_adapter(ckpt.path):
        model = _merge_adapter(model, ckpt.path / ADAPTER_DIR)
    return model.eval()


def has_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_DIR / "adapter_config.json").is_file()


def _merge_adapter(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    import warnings

    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft asks transformers 5 for a renamed attribute (for peft's authors)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise RetrofitError(f"{adapter}: cannot apply this LoRA adapter to the model ({str(exc).splitlines()[0]}); "
                            "remove the folder to load the weights without it") from None


def _fill(model: torch.nn.Module, ckpt: CheckpointDir) -> None:
    fill_from_checkpoint(model, ckpt, list(ckpt.weight_map))
    if model.config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def fill_from_checkpoint(module: torch.nn.Module, ckpt: CheckpointDir, names: list[str],
                         rename: Callable[[str], str] = lambda name: name) -> None:
    """Read the named checkpoint tensors into ``module``'s parameters (``rename``: checkpoint name → the
    module's Hub-style name), shard by shard; every parameter must be filled exactly once."""
    with torch.no_grad():
        for shard, placed in placements(module, ckpt, names, rename).items():
            with open(ckpt.path / shard, "rb") as f:
                for name, entry, slot in placed:
                    read_into(f, entry, slot, name)


def check_weights_fit(ckpt: CheckpointDir, config) -> torch.nn.Module:
    """Every tensor of the checkpoint has the shape ``config`` gives its place in the model, and every weight of
    the model is in the checkpoint, read from the shard headers alone (a truncated shard fails here too): a
    config.json that disagrees with its weights is named before anything is allocated, converted or trained.
    Returns the model it built to check, on the meta device (no memory)."""
    with torch.device("meta"):
        model = family_of(config).model_class(config)
    placements(model, ckpt, list(ckpt.weight_map))
    return model


Placed = tuple[str, TensorEntry, torch.Tensor]  # checkpoint name, where its bytes are, the view it fills


def placements(module: torch.nn.Module, ckpt: CheckpointDir, names: list[str],
               rename: Callable[[str], str] = lambda name: name) -> dict[str, list[Placed]]:
    """Where each named checkpoint tensor goes in ``module`` (an expert's ``[f, d]`` weight into its slot of the
    stacked ``[E, f, d]`` parameter), by shard, after checking shapes and that every parameter is covered once."""
    params = dict(module.state_dict(keep_vars=True))  # parameters and persistent buffers (an expert bias)
    experts = next((m.gate_proj.shape[0] for m in module.modules() if isinstance(m, StackedExperts)), 0)
    config = getattr(module, "config", None)
    filled: dict[str, int] = {}  # parameter name -> elements placed
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(ckpt.weight_map[name], []).append(name)
    out: dict[str, list[Placed]] = {}
    for shard, shard_names in by_shard.items():
        entries = read_header(ckpt.path / shard)
        for name in shard_names:
            if name not in entries:
                raise RetrofitError(f"shard {shard} lacks tensor {name} that the index promises")
            target, slot = _destination(rename(name), params, experts, ckpt)
            if tuple(slot.shape) != entries[name].shape:
                raise RetrofitError(_shape_mismatch(ckpt, name, entries[name].shape, tuple(slot.shape), config))
            out.setdefault(shard, []).append((name, entries[name], slot))
            filled[target] = filled.get(target, 0) + slot.numel()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(n for n, p in params.items() if filled.get(n, 0) != p.numel() and n not in tied)
    if missing:
        raise RetrofitError(f"{ckpt.path}: config.json does not match the weights: the model it describes needs "
                            f"{', '.join(missing[:3])}, which the checkpoint does not hold (in full); correct "
                            "config.json (num_hidden_layers, num_experts, ...) or use the checkpoint's own")
    return out


def _destination(name: str, params: dict[str, torch.nn.Parameter], experts: int,
                 ckpt: CheckpointDir | None = None) -> tuple[str, torch.Tensor]:
    """The parameter a Hub-named tensor belongs to, and the view of it the tensor fills."""
    parsed = parse_expert_key(name)
    if parsed is not None:
        prefix, expert, proj = parsed
        stacked = f"{prefix}.{proj}"
        if stacked in params and expert < experts:
            return stacked, params[stacked].data[expert]
        if stacked in params:
            raise RetrofitError(f"{ckpt.path if ckpt else 'checkpoint'}: config.json does not match the weights: "
                                f"num_experts is {experts} but the checkpoint holds expert {expert} ({name}); "
                                "correct num_experts in config.json")
    elif name in params:
        return name, params[name].data
    raise RetrofitError(f"{ckpt.path if ckpt else 'checkpoint'}: config.json does not match the weights: the "
                        f"checkpoint holds {name}, which the model config.json describes has no place for; correct "
                        "config.json (num_hidden_layers, ...) or use the checkpoint's own")


def _shape_mismatch(ckpt: CheckpointDir, name: str, stored: tuple, expected: tuple, config) -> str:
    """Name the config.json field a wrong shape most likely comes from: one whose value is the expected size."""
    fields = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
              if isinstance(v, int) and not isinstance(v, bool) and not k.endswith("_id")}
    guesses = [f"{' or '.join(k for k, v in fields.items() if v == e)} is {e} in config.json but the weights say "
               f"{s}" for e, s in zip(expected, stored) if e != s and e in fields.values()]
    guess = f" ({guesses[0]})" if guesses else ""
    return (f"{ckpt.path}: config.json does not match the weights: {name} is {'x'.join(map(str, stored))} in the "
            f"checkpoint, {'x'.join(map(str, expected))} for config.json's sizes{guess}; correct config.json or use "
            "the checkpoint's own")


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_fits(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Refuse up front, by name, a model that cannot fit in this machine's memory, instead of being killed."""
    needed = model_bytes(model)
    available = _available_memory()
    if available is not None and needed > available:
        hint = " (try bfloat16: --dtype bfloat16 for eval, optim.precision=bf16 for finetune)" \
            if dtype != torch.bfloat16 else ""
        raise RetrofitError(f"the model needs {needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} but "
                            f"only {available / 2**30:.1f} GiB of memory is available{hint}")


def _available_memory() -> int | None:
    if os.environ.get("RETROFIT_SKIP_MEMORY_CHECK"):
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

