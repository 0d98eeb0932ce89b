"""Make ``transformers.Auto*`` know retrofit's model types once ``import retrofit`` has run."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from retrofit.models.llada_moe import MODEL_TYPE, LLaDAMoEConfig, LLaDAMoEModelLM

_done = False


def _expert_stacking():
    """Checkpoints name each expert's weights separately; the model stacks them. transformers applies this
    conversion on ``from_pretrained`` and reverses it on ``save_pretrained``, so saved files keep Hub names."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    return [
        WeightConverter(
            source_patterns=f"mlp.experts.*.{proj}.weight",
            target_patterns=f"mlp.experts.{proj}",
            operations=[MergeModulelist(dim=0)],
        )
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]


def register_with_transformers() -> None:
    global _done
    if _done:
        return
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    AutoConfig.register(MODEL_TYPE, LLaDAMoEConfig, exist_ok=True)
    AutoModel.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)
    AutoModelForMaskedLM.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)
    register_checkpoint_conversion_mapping(MODEL_TYPE, _expert_stacking(), overwrite=True)
    _done = True
