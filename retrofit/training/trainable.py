"""Which parameters train: the routers only (default), or the routers plus peft LoRA adapters.

Everything else is frozen with ``requires_grad_(False)``, so autograd builds no weight gradient for experts or
attention; gradients still flow *through* them to the routers.
"""

from __future__ import annotations

import warnings

from torch import nn

from retrofit.errors import RetrofitError
from retrofit.routers import Router
from retrofit.training.recipe import TrainableSection


def router_parameter_names(model: nn.Module) -> list[str]:
    """Every router's parameters (the gate weights), under their names in ``model`` (a peft wrapper's too)."""
    return [f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, Router)
            for name, _ in module.named_parameters(recurse=False)]


def make_trainable(model: nn.Module, section: TrainableSection) -> nn.Module:
    """Freeze all but the routers (and LoRA adapters); returns the module to train (a PeftModel with LoRA).
    ``all`` trains every parameter (pretraining a model from scratch)."""
    if section.mode == "all":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if section.mode == "routers+lora":
        from peft import LoraConfig, get_peft_model

        lora = section.lora
        check_lora_targets(model, lora.target_modules)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, bias="none")
        with warnings.catch_warnings():
            # peft 0.x asks transformers 5 for a renamed attribute; the warning is for peft's authors, not users.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, config)  # adapters are created trainable, the base stays frozen
    for block in base_model(model).moe_blocks():
        block.gate.requires_grad_(True)
    return model


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Each LoRA target names linear layers of ``model`` as peft matches them (a module name or the end of one
    after a dot); one that names none is refused with the names there are."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        have = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise RetrofitError(f"trainable.lora.target_modules: {', '.join(missing)} names no linear layer of this "
                            f"model; its linear layers are {', '.join(have)}")


def base_model(model: nn.Module) -> nn.Module:
    """The native model under an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_state(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
