"""Model families retrofit implements natively (no remote code): one module per family behind the interface
of :mod:`retrofit.models.family`, one registry line each below."""

from retrofit.models.family import (
    FAMILIES,
    ModelFamily,
    family_for_checkpoint,
    family_of,
    hub_models,
    register_family,
)
from retrofit.models.llada2 import LLADA2, LLaDA2Config, LLaDA2ModelLM
from retrofit.models.llada_moe import LLADA_MOE, LLaDAMoEConfig, LLaDAMoEModel, LLaDAMoEModelLM

register_family(LLADA_MOE)
register_family(LLADA2)

__all__ = [
    "FAMILIES",
    "LLADA2",
    "LLADA_MOE",
    "LLaDA2Config",
    "LLaDA2ModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "ModelFamily",
    "family_for_checkpoint",
    "family_of",
    "hub_models",
    "register_family",
]
