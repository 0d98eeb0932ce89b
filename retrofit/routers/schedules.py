"""Timestep-dependent capacity for expert choice (docs/algorithms.md §5).

Each schedule is a shape s(r) in [0, 1] of the mask ratio r; the experts per token of a sequence are
k(r) = round(k_min + (k_max - k_min) * s(r)), clamped to [k_min, k_max].

| name             | s(r)                                   | capacity goes to            | E[k], k∈[8, 32] |
|------------------|----------------------------------------|-----------------------------|-----------------|
| constant         | — (k = the checkpoint's top-k)         | every step alike            | top-k           |
| linear           | r                                      | heavily masked steps        | 20              |
| linear-reverse   | 1 - r                                  | lightly masked steps (best) | 20              |
| cosine           | (1 - cos πr) / 2                       | heavily masked steps        | 20              |
| cosine-reverse   | (1 + cos πr) / 2                       | lightly masked steps        | 20              |
| bell             | max(0, 1 - 4(r - ½)²)                  | mid-denoising               | 24.01           |
| gaussian         | exp(−(r−½)²/2σ²), 0 at r∈{0,1}, 1 at ½ | mid-denoising               | 20.03 (σ 0.22)  |
| gaussian-reverse | 1 - gaussian                           | both ends                   | 19.97 (σ 0.22)  |
| step             | 1 if r ≥ threshold else 0              | heavily masked steps        | 20 (threshold ½)|
| step-reverse     | 1 if r < threshold else 0              | lightly masked steps        | 20 (threshold ½)|

:func:`expected_k` gives E_r[k(r)] for r ~ U(0, 1), so schedules can be compared at matched FLOPs: with
k_min = 8, k_max = 32, linear-reverse averages 20, the paper's constant baseline.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

ScheduleName = Literal[
    "constant",
    "linear",
    "linear-reverse",
    "cosine",
    "cosine-reverse",
    "bell",
    "gaussian",
    "gaussian-reverse",
    "step",
    "step-reverse",
]


class ScheduleSettings(BaseModel):
    """Capacity as a function of the mask ratio r (docs/algorithms.md §5).

    k(r) = round(k_min + (k_max - k_min) * s(r)), clamped to [k_min, k_max]; ``None`` bounds default to the
    checkpoint's top-k. ``constant`` ignores r and uses the checkpoint's top-k.
    """

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName = Field(default="constant", description=(
        "capacity as a function of the mask ratio r (constant: the checkpoint's top-k at every step)"))
    k_min: int | None = Field(default=None, ge=0, description="experts per token at s(r)=0 (default: the "
                                                              "checkpoint's top-k)")
    k_max: int | None = Field(default=None, ge=1, description="experts per token at s(r)=1 (default: the "
                                                              "checkpoint's top-k)")
    sigma: float = Field(default=0.22, gt=0, description="width of the gaussian schedules' bell",
                         json_schema_extra={"flag": "schedule-sigma"})
    threshold: float = Field(default=0.5, ge=0, le=1, description="mask ratio where the step schedules switch",
                             json_schema_extra={"flag": "schedule-threshold"})

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "ScheduleSettings":
        if self.k_min is not None and self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"schedule k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        return self


def _gaussian(r: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(−(r−½)²/(2σ²)), rescaled so that it is 0 at r ∈ {0, 1} and 1 at r = ½."""
    edge = math.exp(-0.25 / (2 * sigma**2))  # value at r = 0 and r = 1, mapped to 0
    return (torch.exp(-((r - 0.5) ** 2) / (2 * sigma**2)) - edge) / (1 - edge)


Shape = Callable[[torch.Tensor, ScheduleSettings], torch.Tensor]

# One s(r) per schedule name. ``constant`` never reads its shape (k is the checkpoint's top-k); 0 keeps it total.
SHAPES: dict[str, Shape] = {
    "constant": lambda r, s: torch.zeros_like(r),
    "linear": lambda r, s: r,
    "linear-reverse": lambda r, s: 1 - r,
    "cosine": lambda r, s: (1 - torch.cos(math.pi * r)) / 2,
    "cosine-reverse": lambda r, s: (1 + torch.cos(math.pi * r)) / 2,
    "bell": lambda r, s: (1 - 4 * (r - 0.5) ** 2).clamp(min=0),
    "gaussian": lambda r, s: _gaussian(r, s.sigma),
    "gaussian-reverse": lambda r, s: 1 - _gaussian(r, s.sigma),
    "step": lambda r, s: (r >= s.threshold).double(),
    "step-reverse": lambda r, s: 1 - (r >= s.threshold).double(),
}


def shape(settings: ScheduleSettings, r: torch.Tensor) -> torch.Tensor:
    """s(r) of the named schedule in float64, in [0, 1]; r is clamped to [0, 1] first."""
    if settings.name not in SHAPES:  # the settings model only admits the names above
        raise ValueError(f"unknown schedule {settings.name!r}; known: {', '.join(SHAPES)}")
    r = r.double().clamp(0, 1)
    return SHAPES[settings.name](r, settings).clamp(0, 1)


def bounds(settings: ScheduleSettings, top_k: int) -> tuple[int, int]:
    """(k_min, k_max), unset bounds being the checkpoint's top-k; both are top-k for ``constant``."""
    if settings.name == "constant":
        return top_k, top_k
    k_min = top_k if settings.k_min is None else settings.k_min
    k_max = top_k if settings.k_max is None else settings.k_max
    return k_min, k_max


def experts_per_token(settings: ScheduleSettings, top_k: int, r: torch.Tensor) -> torch.Tensor:
    """k(r) = round(k_min + (k_max − k_min)·s(r)) clamped to [k_min, k_max], for each sequence's mask ratio
    ``r`` ``[B]`` → long ``[B]`` on r's device. ``round`` is half to even, like Python's."""
    k_min, k_max = bounds(settings, top_k)
    k = torch.round(k_min + (k_max - k_min) * shape(settings, r))
    return k.clamp(k_min, k_max).long()


def expected_k(settings: ScheduleSettings, top_k: int, points: int = 200_000) -> float:
    """E[k(r)] for r ~ U(0, 1), by the midpoint rule on ``points`` points.

    k(r) is a step function (it is rounded), so the rule is exact up to the few cells that straddle a jump:
    the error is at most (k_max − k_min + 2) / points. Used to compare schedules at matched FLOPs.
    """
    r = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    return float(experts_per_token(settings, top_k, r).double().mean())


# Schedules whose k is a rational function of the mask ratio: from counts it is rounded exactly.
_LINEAR = {"linear": False, "linear-reverse": True}


def experts_per_token_counted(settings: ScheduleSettings, top_k: int, masked: torch.Tensor,
                              maskable: torch.Tensor) -> torch.Tensor:
    """k(r) for the observed mask ratio r = ``masked`` / ``maskable`` (integer counts ``[B]``), the way EC-DLM
    computes it: for the linear schedules k = k_min + (k_max − k_min)·r is rounded half to even exactly, in
    integers (from a float32 ratio, 1/48 at k 8..32 would give 8.5 plus its representation error, so 9, not 8);
    the other schedules take r in float64."""
    masked, maskable = masked.long(), maskable.long().clamp(min=1)
    if settings.name not in _LINEAR:
        return experts_per_token(settings, top_k, masked.double() / maskable.double())
    k_min, k_max = bounds(settings, top_k)
    share = maskable - masked if _LINEAR[settings.name] else masked
    numerator, denominator = k_min * maskable + (k_max - k_min) * share.clamp(0), maskable
    whole, rest = numerator // denominator, numerator % denominator
    up = (2 * rest > denominator) | ((2 * rest == denominator) & (whole % 2 == 1))
    return (whole + up.long()).clamp(k_min, k_max)
