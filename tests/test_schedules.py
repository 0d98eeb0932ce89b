"""Capacity schedules: their shapes at the ends and middle, k(r) against a plain loop, expected k for FLOPs."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from retrofit.routers import ScheduleSettings, expected_k, experts_per_token
from retrofit.routers.schedules import SHAPES, experts_per_token_counted, shape
from tests.helpers import loop_shape

R = torch.tensor([0.0, 0.5, 1.0])
NAMES = [name for name in SHAPES if name != "constant"]


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


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_k_match_a_loop(name):
    settings = ScheduleSettings(name=name, k_min=2, k_max=11, sigma=0.3, threshold=0.4)
    r = torch.cat([torch.rand(200, generator=torch.Generator().manual_seed(0)), torch.tensor([0.0, 0.4, 1.0])])
    s = shape(settings, r)
    expected = [loop_shape(name, x, 0.3, 0.4) for x in r.tolist()]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert ((s >= 0) & (s <= 1)).all()
    k = experts_per_token(settings, 8, r)
    assert k.dtype == torch.long
    assert k.tolist() == [min(max(round(2 + 9 * v), 2), 11) for v in s.tolist()]


@pytest.mark.parametrize("sigma", [0.1, 0.22, 0.5])
def test_gaussian_is_normalised_for_any_width(sigma):
    values = shape(ScheduleSettings(name="gaussian", sigma=sigma), R).tolist()
    assert values == pytest.approx([0, 1, 0], abs=1e-12)


def test_k_is_rounded_and_clamped():
    s = ScheduleSettings(name="linear", k_min=8, k_max=32)
    assert experts_per_token(s, 8, torch.tensor([0.0, 0.5, 1.0, 0.26, -0.5, 1.5])).tolist() == [8, 20, 32, 14, 8, 32]


def test_unset_bounds_default_to_top_k():
    r = torch.tensor([0.0, 1.0])
    assert experts_per_token(ScheduleSettings(name="linear", k_max=12), 4, r).tolist() == [4, 12]
    assert experts_per_token(ScheduleSettings(name="linear", k_min=1), 4, r).tolist() == [1, 4]
    assert experts_per_token(ScheduleSettings(name="linear"), 4, r).tolist() == [4, 4]


def test_constant_ignores_mask_ratio_and_bounds():
    s = ScheduleSettings(name="constant", k_min=1, k_max=30)
    assert experts_per_token(s, 8, torch.rand(5)).tolist() == [8] * 5
    assert expected_k(s, 8) == 8


@pytest.mark.parametrize("name", ["linear", "linear-reverse", "cosine", "cosine-reverse", "step", "step-reverse"])
def test_symmetric_schedules_match_the_papers_constant_20(name):
    # k_min = 8, k_max = 32 against a constant k = 20: the paper's matched-FLOPs comparison.
    assert expected_k(ScheduleSettings(name=name, k_min=8, k_max=32), 8) == pytest.approx(20, abs=0.01)


def test_expected_k_is_the_exact_mean_of_the_step_function():
    # step at 0.3 between 8 and 32: 0.3·8 + 0.7·32; linear between 0 and 1 rounds to 0 below ½ and 1 above.
    step = ScheduleSettings(name="step", k_min=8, k_max=32, threshold=0.3)
    assert expected_k(step, 4) == pytest.approx(24.8, abs=1e-3)
    assert expected_k(ScheduleSettings(name="linear", k_min=0, k_max=1), 4) == pytest.approx(0.5, abs=1e-4)
    # bell has no neat closed form once rounded: check against a Riemann sum of the loop's k(r).
    n = 20_000
    loop = sum(min(max(round(8 + 24 * loop_shape("bell", (i + 0.5) / n)), 8), 32) for i in range(n)) / n
    assert expected_k(ScheduleSettings(name="bell", k_min=8, k_max=32), 8) == pytest.approx(loop, abs=5e-3)


def test_gaussian_and_its_reverse_share_the_budget():
    bell = expected_k(ScheduleSettings(name="gaussian", k_min=8, k_max=32), 8)
    reverse = expected_k(ScheduleSettings(name="gaussian-reverse", k_min=8, k_max=32), 8)
    assert bell + reverse == pytest.approx(40, abs=0.01), "k(r) + k_reverse(r) = k_min + k_max at every r"
    assert 8 < reverse < 32 and 8 < bell < 32


def test_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="k_min"):
        ScheduleSettings(name="linear", k_min=9, k_max=3)


def _exact_k(k_min: int, k_max: int, r: Fraction) -> int:
    """k_min + (k_max − k_min)·r rounded half to even, in exact rational arithmetic (Python's round on a
    Fraction rounds half to even)."""
    return round(k_min + (k_max - k_min) * r)


@pytest.mark.parametrize("name", ["linear", "linear-reverse"])
@pytest.mark.parametrize("k_min, k_max", [(8, 32), (4, 12), (1, 3), (0, 7)])
def test_linear_schedules_round_exactly_from_counts(name, k_min, k_max):
    settings = ScheduleSettings(name=name, k_min=k_min, k_max=k_max)
    maskable = torch.arange(1, 97).repeat_interleave(torch.arange(2, 98))  # every masked count 0..n of n ≤ 96
    masked = torch.cat([torch.arange(n + 1) for n in range(1, 97)])
    got = experts_per_token_counted(settings, 8, masked, maskable)
    expected = [_exact_k(k_min, k_max, Fraction(m, n) if name == "linear" else 1 - Fraction(m, n))
                for m, n in zip(masked.tolist(), maskable.tolist())]
    assert got.tolist() == expected


def test_the_issues_half_integer_case():
    settings = ScheduleSettings(name="linear", k_min=8, k_max=32)
    assert experts_per_token_counted(settings, 8, torch.tensor([1]), torch.tensor([48])).item() == 8
    assert experts_per_token(settings, 8, torch.tensor([1 / 48])).item() == 9  # a float32 ratio, as before


@pytest.mark.parametrize("name", sorted(set(SHAPES) - {"linear", "linear-reverse"}))
def test_other_schedules_from_counts_take_the_float64_ratio(name):
    settings = ScheduleSettings(name=name, k_min=2, k_max=14)
    masked, maskable = torch.tensor([0, 3, 7, 50, 64]), torch.tensor([64, 64, 9, 50, 64])
    got = experts_per_token_counted(settings, 8, masked, maskable)
    assert got.tolist() == experts_per_token(settings, 8, masked.double() / maskable.double()).tolist()


def test_ec_in_the_model_rounds_from_the_observed_counts():
    """A sequence with 1 of 48 positions masked: EC at linear 8..32 gives its experts the capacity of k = 8."""
    from retrofit.routers import RoutingContext, router_settings
    from retrofit.routers.ec import ExpertChoiceRouter

    router = ExpertChoiceRouter(16, 64, 8, router_settings(type="ec", schedule={"name": "linear", "k_min": 8,
                                                                                 "k_max": 32}))
    ctx = RoutingContext(valid=torch.ones(1, 48, dtype=torch.bool), mask_ratio=torch.tensor([1 / 48]),
                         padded=False, mask_counts=(torch.tensor([1]), torch.tensor([48])))
    assert router.capacities(ctx).tolist() == [6]  # round(48 · 8 / 64); k = 9 would give round(6.75) = 7


def test_ec_capacity_floor_is_ec_dlms_and_round_is_the_default():
    from retrofit.routers import router_settings
    from retrofit.routers.ec import sequence_capacity

    lengths = torch.arange(1, 1025)
    k = torch.full_like(lengths, 8)
    floor = sequence_capacity(lengths, k, 64, 1.0, "floor")
    ec_dlm = torch.tensor([max(1, int(n * 8 / 64)) for n in range(1, 1025)])  # EC-DLM's int(), at least one token
    assert torch.equal(floor, ec_dlm)
    rounded = sequence_capacity(lengths, k, 64, 1.0)
    assert int((rounded != floor).sum()) == 445  # the issue's count at E 64, k 8
    assert router_settings(type="ec").capacity_rounding == "round"
    assert "capacity-floor" in router_settings(type="ec", capacity_rounding="floor").describe()
