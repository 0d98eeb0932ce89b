"""The router registry: router type name → router class, and everything keyed by it.

The settings of each router are its own pydantic class; ``router_settings`` picks the class by the ``type``
field, a discriminated union whose members are the registered routers (built at run time rather than as a
static ``Union`` so that a router registered later, a test's toy router included, is one of them).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, SerializeAsAny

from retrofit.errors import RetrofitError
from retrofit.flags import add_to_registry
from retrofit.routers.base import SOFTMAX, Router, RouterSettings, Scoring

ROUTERS: dict[str, type[Router]] = {}

# Fields of the one flat settings model that converted config.json files written before per-router settings
# carry for every router type; reading such a file drops the ones its router does not have.
_FLAT_FIELDS = {"capacity_factor", "per_batch", "schedule", "ec_order", "block_length", "core_threshold",
                "guard_size", "renormalize"}


class UnknownRouter(RetrofitError, ValueError):
    """A ``type`` no registered router has (a ValueError too, so pydantic reports it with its location)."""


def register_router(cls: type[Router]) -> type[Router]:
    """Make ``cls`` selectable by its ``kind`` everywhere: settings, config.json, recipes, command-line flags."""
    return add_to_registry(ROUTERS, cls)


def router_settings(data: dict | RouterSettings | None = None, /, *, stored: bool = False,
                    **fields: Any) -> RouterSettings:
    """The settings of the router that ``type`` names (token choice when absent), validated by its own class.

    ``data``: a mapping (config.json, a recipe) or settings to copy; ``fields`` update it. ``stored``: the
    mapping comes from a config.json written by an earlier retrofit, whose flat router section held every
    router's fields; those that do not belong to its router are dropped (any other unknown key is an error).
    """
    if isinstance(data, RouterSettings) and not fields:
        return data
    merged = dict(data.model_dump() if isinstance(data, RouterSettings) else data or {}) | fields
    kind = merged.get("type", "tc")
    if kind not in ROUTERS:
        raise UnknownRouter(f"unknown router type {kind!r}; use {', '.join(ROUTERS)}")
    cls = ROUTERS[kind].settings_class
    if stored:
        merged = {k: v for k, v in merged.items() if k in cls.model_fields or k not in _FLAT_FIELDS}
    return cls.model_validate(merged)


# A pydantic field holding any registered router's settings: validated by the class ``type`` selects, and
# serialised with that class's fields.
RouterField = Annotated[SerializeAsAny[RouterSettings], BeforeValidator(router_settings)]


def build_router(settings: RouterSettings, hidden_size: int, num_experts: int, top_k: int,
                 scoring: Scoring = SOFTMAX) -> Router:
    """A fresh router of the configured kind (its gate weight uninitialised: the caller loads or shares it)."""
    return ROUTERS[settings.type](hidden_size, num_experts, top_k, settings, scoring)


def swap_routers(model, settings: RouterSettings, weights: list[torch.Tensor] | None = None) -> list[Router]:
    """Replace the router of every MoE layer of ``model`` (anything with ``moe_blocks()`` whose blocks hold
    their router as ``gate``) in place; the new routers share the old ones' tensors, or take ``weights`` (one
    gate weight per layer, frozen). Records the settings in ``model.config.router``; returns the replaced
    routers, which ``swap_routers_back`` puts back."""
    replaced = []
    blocks = model.moe_blocks()
    for i, block in enumerate(blocks):
        old = block.gate
        new = build_router(settings, old.hidden_size, old.num_experts, old.top_k, old.scoring)
        new.adopt(old)
        if weights is not None:
            new.weight = torch.nn.Parameter(weights[i], requires_grad=False)
        block.gate = new
        replaced.append(old)
    model.config.router = settings.model_dump()
    return replaced


def swap_routers_back(model, routers: list[Router]) -> None:
    for block, router in zip(model.moe_blocks(), routers):
        block.gate = router
    if routers:
        model.config.router = routers[0].settings.model_dump()
