"""The one dtype resolver. Every place that chooses the weights' dtype (eval's ``--dtype`` and lm-eval's
``dtype=``, a recipe's ``optim.precision``) goes through :func:`resolve_dtype`, with one vocabulary that takes
either spelling: ``auto``, ``fp32``/``float32``, ``bf16``/``bfloat16``."""

from __future__ import annotations

import torch

from retrofit.errors import RetrofitError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
NAMES = ("auto", *DTYPES)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 on a CPU (where bf16 matmuls are ~3x slower); LLaDA-MoE-7B needs bf16 to fit
    in 24 GB of CPU memory, so it can be asked for by name."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise RetrofitError(f"dtype {name!r}: use auto, fp32 (float32) or bf16 (bfloat16)")
    return DTYPES[name]
