"""Model families retrofit implements natively (no remote code). One module per family."""

from retrofit.models.llada_moe import (
    LLaDAMoEConfig,
    LLaDAMoEModel,
    LLaDAMoEModelLM,
    config_from_checkpoint,
    is_llada_moe_config,
)
from retrofit.models.registration import register_with_transformers

register_with_transformers()

__all__ = [
    "LLaDAMoEConfig",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "config_from_checkpoint",
    "is_llada_moe_config",
]
