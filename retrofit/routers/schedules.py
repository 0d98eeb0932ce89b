"""Timestep-dependent capacity for expert choice (algorithms.md §5).

Each schedule is a shape s(r) in [0, 1] of the mask ratio r; the experts per token of a sequence are
k(r) = round(k_min + (k_max - k_min) * s(r)), clamped to [k_min, k_max].

| name             | s(r)                                   | capacity goes to            |
|------------------|----------------------------------------|-----------------------------|
| constant         | — (k = the checkpoint's top-k)         | every step alike            |
| linear           | r                                      | heavily masked steps        |
| linear-reverse   | 1 - r                                  | lightly masked steps (best) |
| cosine           | (1 - cos πr) / 2                       | heavily masked steps        |
| cosine-reverse   | (1 + cos πr) / 2                       | lightly masked steps        |
| bell             | max(0, 1 - 4(r - ½)²)                  | mid-denoising               |
| gaussian         | gaussian bell of width σ, 0 at r∈{0,1} | mid-denoising               |
| gaussian-reverse | 1 - gaussian                           | both ends                   |
| step             | 1 if r ≥ threshold else 0              | heavily masked steps        |
| step-reverse     | 1 if r < threshold else 0              | lightly masked steps        |

:func:`expected_k` gives E_r[k(r)] for r ~ U(0, 1), so schedules can be compared at matched FLOPs: with
k_min = 8, k_max = 32, linear-reverse averages 20, the paper's constant baseline.
"""

from __future__ import annotations

import math

import torch

from retrofit.routers.settings import ScheduleSettings


def _gaussian(r: torch.Tensor, sigma: float) -> torch.Tensor:
    edge = math.exp(-0.25 / (2 * sigma**2))  # value at r = 0 and r = 1, mapped to 0
    return (torch.exp(-((r - 0.5) ** 2) / (2 * sigma**2)) - edge) / (1 - edge)


def shape(settings: ScheduleSettings, r: torch.Tensor) -> torch.Tensor:
    """s(r) of the named schedule, in [0, 1]."""
    r = r.double().clamp(0, 1)
    name = settings.name
    if name == "linear":
        s = r
    elif name == "linear-reverse":
        s = 1 - r
    elif name == "cosine":
        s = (1 - torch.cos(math.pi * r)) / 2
    elif name == "cosine-reverse":
        s = (1 + torch.cos(math.pi * r)) / 2
    elif name == "bell":
        s = 1 - 4 * (r - 0.5) ** 2
    elif name == "gaussian":
        s = _gaussian(r, settings.sigma)
    elif name == "gaussian-reverse":
        s = 1 - _gaussian(r, settings.sigma)
    elif name == "step":
        s = (r >= settings.threshold).double()
    elif name == "step-reverse":
        s = (r < settings.threshold).double()
    elif name == "constant":
        s = torch.zeros_like(r)
    else:  # the settings model only admits the names above
        raise ValueError(f"unknown schedule {name!r}")
    return s.clamp(0, 1)


def bounds(settings: ScheduleSettings, top_k: int) -> tuple[int, int]:
    if settings.name == "constant":
        return top_k, top_k
    k_min = top_k if settings.k_min is None else settings.k_min
    k_max = top_k if settings.k_max is None else settings.k_max
    return k_min, k_max


def experts_per_token(settings: ScheduleSettings, top_k: int, r: torch.Tensor) -> torch.Tensor:
    """k(r) for each sequence's mask ratio ``r`` ``[B]`` → long ``[B]``."""
    k_min, k_max = bounds(settings, top_k)
    k = torch.round(k_min + (k_max - k_min) * shape(settings, r))
    return k.clamp(k_min, k_max).long()


def expected_k(settings: ScheduleSettings, top_k: int, points: int = 200_000) -> float:
    """E[k(r)] for r ~ U(0, 1) by the midpoint rule (k(r) is a step function because of the rounding)."""
    r = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    return float(experts_per_token(settings, top_k, r).double().mean())
