"""Capacity schedules: their shapes at the ends and middle, and expected k for FLOP matching."""

from __future__ import annotations

import pytest
import torch

from retrofit.routers import ScheduleSettings, expected_k, experts_per_token
from retrofit.routers.schedules import shape

R = torch.tensor([0.0, 0.5, 1.0])


@pytest.mark.parametrize(
    "name, values",
    [
        ("linear", [0, 0.5, 1]),
        ("linear-reverse", [1, 0.5, 0]),
        ("cosine", [0, 0.5, 1]),
        ("cosine-reverse", [1, 0.5, 0]),
        ("bell", [0, 1, 0]),
        ("gaussian", [0, 1, 0]),
        ("gaussian-reverse", [1, 0, 1]),
        ("step", [0, 1, 1]),
        ("step-reverse", [1, 0, 0]),
    ],
)
def test_shape_at_ends_and_middle(name, values):
    torch.testing.assert_close(shape(ScheduleSettings(name=name), R), torch.tensor(values, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_k_is_rounded_and_clamped():
    s = ScheduleSettings(name="linear", k_min=8, k_max=32)
    assert experts_per_token(s, 8, torch.tensor([0.0, 0.5, 1.0, 0.26])).tolist() == [8, 20, 32, 14]


def test_constant_ignores_mask_ratio_and_bounds():
    s = ScheduleSettings(name="constant", k_min=1, k_max=30)
    assert experts_per_token(s, 8, torch.rand(5)).tolist() == [8] * 5
    assert expected_k(s, 8) == 8


@pytest.mark.parametrize("name", ["linear", "linear-reverse", "cosine", "cosine-reverse"])
def test_symmetric_schedules_match_the_papers_constant_20(name):
    # k_min = 8, k_max = 32 against a constant k = 20: the paper's matched-FLOPs comparison.
    assert expected_k(ScheduleSettings(name=name, k_min=8, k_max=32), 8) == pytest.approx(20, abs=0.01)


def test_bell_spends_more_than_its_reverse():
    bell = expected_k(ScheduleSettings(name="gaussian", k_min=8, k_max=32), 8)
    reverse = expected_k(ScheduleSettings(name="gaussian-reverse", k_min=8, k_max=32), 8)
    assert bell + reverse == pytest.approx(40, abs=0.01)
    assert 8 < reverse < 32 and 8 < bell < 32


def test_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="k_min"):
        ScheduleSettings(name="linear", k_min=9, k_max=3)
