"""Every router against a slow, obviously-correct loop implementation, on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.routers import (
    BlockRouter,
    ExpertChoiceRouter,
    RouterSettings,
    RoutingContext,
    RoutingStats,
    TokenChoiceRouter,
    build_router,
)


def random_case(seed: int, batch: int, length: int, experts: int, pad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(batch, length, experts, generator=gen) * 2, dim=-1)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if pad:
        for b in range(1, batch):  # later sequences end in padding of different lengths
            valid[b, length - 3 * b:] = False
    mask_ratio = torch.rand(batch, generator=gen)
    return probs, RoutingContext(valid=valid, mask_ratio=mask_ratio)


def pairs_of(routing) -> dict[tuple[int, int], float]:
    tokens, experts, gates = routing.pairs()
    out = {}
    for t, e, g in zip(tokens.tolist(), experts.tolist(), gates.tolist()):
        assert (t, e) not in out, "a (token, expert) pair must occur once"
        out[(t, e)] = g
    return out


# ------------------------------------------------------------------------------------- references


def ref_tc(probs, k):
    out = {}
    flat = probs.reshape(-1, probs.shape[-1])
    for t in range(flat.shape[0]):
        ranked = sorted(range(flat.shape[1]), key=lambda e: -flat[t, e].item())
        for e in ranked[:k]:
            out[(t, e)] = flat[t, e].item()
    return out


def ref_schedule_k(name, r, top_k, k_min, k_max, sigma=0.22, threshold=0.5):
    if name == "constant":
        return top_k
    k_min = top_k if k_min is None else k_min
    k_max = top_k if k_max is None else k_max
    edge = math.exp(-0.25 / (2 * sigma**2))
    gauss = (math.exp(-((r - 0.5) ** 2) / (2 * sigma**2)) - edge) / (1 - edge)
    s = {
        "linear": r,
        "linear-reverse": 1 - r,
        "cosine": (1 - math.cos(math.pi * r)) / 2,
        "cosine-reverse": (1 + math.cos(math.pi * r)) / 2,
        "bell": max(0.0, 1 - 4 * (r - 0.5) ** 2),
        "gaussian": gauss,
        "gaussian-reverse": 1 - gauss,
        "step": 1.0 if r >= threshold else 0.0,
        "step-reverse": 1.0 if r < threshold else 0.0,
    }[name]
    return min(max(round(k_min + (k_max - k_min) * s), k_min), k_max)


def ref_capacities(ctx, settings, top_k, experts):
    caps = []
    for b in range(ctx.valid.shape[0]):
        length = int(ctx.valid[b].sum())
        s = settings.schedule
        k = ref_schedule_k(s.name, ctx.mask_ratio[b].item(), top_k, s.k_min, s.k_max, s.sigma, s.threshold)
        caps.append(0 if length == 0 else min(max(round(length * k / experts * settings.capacity_factor), 1), length))
    return caps


def ref_ec(probs, ctx, settings, top_k):
    batch, length, experts = probs.shape
    caps = ref_capacities(ctx, settings, top_k, experts)
    out = {}
    groups = [list(range(batch))] if settings.per_batch else [[b] for b in range(batch)]
    for group in groups:
        capacity = sum(caps[b] for b in group)
        candidates = [(b * length + i) for b in group for i in range(length) if ctx.valid[b, i]]
        for e in range(experts):
            ranked = sorted(candidates, key=lambda t: -probs.reshape(-1, experts)[t, e].item())
            for t in ranked[:capacity]:
                out[(t, e)] = probs.reshape(-1, experts)[t, e].item()
    return out


def ref_block(probs, ctx, settings, top_k):
    batch, length, experts = probs.shape
    guard = min(settings.guard_size, experts)
    out = {}
    for b in range(batch):
        for start in range(0, length, settings.block_length):
            block = range(start, min(start + settings.block_length, length))
            vote = [0.0] * experts
            for i in block:
                if ctx.valid[b, i]:
                    for e in sorted(range(experts), key=lambda e: -probs[b, i, e].item())[:top_k]:
                        vote[e] += probs[b, i, e].item()
            total = sum(vote)
            vote = [v / total if total > 0 else 0.0 for v in vote]
            ranked = sorted(range(experts), key=lambda e: -vote[e])
            core, cumulative = [], 0.0
            for e in ranked:
                core.append(e)
                cumulative += vote[e]
                if cumulative > settings.core_threshold:
                    break
            if len(core) < guard:
                core = ranked[:guard]
            for i in block:
                chosen = sorted(core, key=lambda e: -probs[b, i, e].item())[:top_k]
                norm = sum(probs[b, i, e].item() for e in chosen) if settings.renormalize else 1.0
                for e in chosen:
                    out[(b * length + i, e)] = probs[b, i, e].item() / norm
    return out


def assert_same(ours: dict, ref: dict, tol: float = 0.0):
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))[:10]
    for key, g in ref.items():
        assert abs(ours[key] - g) <= tol * max(1.0, abs(g)), (key, ours[key], g)


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed, batch, length, experts, k", [(0, 1, 7, 8, 2), (1, 3, 40, 16, 4), (2, 2, 13, 8, 1)])
def test_tc_matches_reference(seed, batch, length, experts, k):
    probs, ctx = random_case(seed, batch, length, experts)
    routing = TokenChoiceRouter(4, experts, k).select(probs, ctx)
    assert routing.layout == "token" and routing.indices.shape == (batch * length, k)
    assert_same(pairs_of(routing), ref_tc(probs, k))


def test_tc_gates_are_raw_softmax_values():
    router = TokenChoiceRouter(6, 8, 2)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(2, 5, 6)
    routing = router(hidden, RoutingContext.unpadded(2, 5))
    probs = torch.softmax(hidden.reshape(-1, 6) @ router.weight.T, dim=-1)
    assert torch.equal(routing.gates, probs.topk(2).values)
    assert (routing.gates.sum(-1) < 1).all(), "not renormalised, as the checkpoint's reference does"


EC_CASES = [
    dict(),
    dict(capacity_factor=1.7),
    dict(capacity_factor=0.3),
    dict(per_batch=True),
    dict(per_batch=True, capacity_factor=1.3),
    dict(schedule=dict(name="linear-reverse", k_min=1, k_max=6)),
    dict(schedule=dict(name="cosine", k_min=2, k_max=5)),
    dict(schedule=dict(name="gaussian", k_min=1, k_max=8)),
    dict(schedule=dict(name="step", k_min=1, k_max=4, threshold=0.3), per_batch=True),
]


@pytest.mark.parametrize("options", EC_CASES)
@pytest.mark.parametrize("seed, batch, length, experts, k", [(0, 1, 9, 8, 2), (3, 3, 37, 16, 4), (5, 2, 12, 8, 2)])
def test_ec_matches_reference(options, seed, batch, length, experts, k):
    settings = RouterSettings(type="ec", **options)
    probs, ctx = random_case(seed, batch, length, experts)
    routing = ExpertChoiceRouter(4, experts, k, settings).select(probs, ctx)
    assert routing.layout == "expert" and routing.indices.shape[0] == experts
    assert_same(pairs_of(routing), ref_ec(probs, ctx, settings, k))
    assert routing.capacity.tolist() == ref_capacities(ctx, settings, k, experts)


def test_ec_never_chooses_padding_even_when_capacity_exceeds_length():
    probs, ctx = random_case(7, 3, 10, 8)
    routing = ExpertChoiceRouter(4, 8, 8, RouterSettings(type="ec", capacity_factor=4.0)).select(probs, ctx)
    tokens, _, _ = routing.pairs()
    assert ctx.valid.reshape(-1)[tokens].all()
    assert routing.capacity.tolist() == ctx.valid.sum(-1).tolist(), "capacity is clamped to the valid length"


@pytest.mark.parametrize("length, k, experts, factor, expected", [(64, 8, 64, 1.0, 8), (10, 2, 8, 1.0, 2),
                                                                   (3, 2, 64, 1.0, 1), (512, 8, 64, 1.25, 80)])
def test_ec_capacity_formula(length, k, experts, factor, expected):
    ctx = RoutingContext.unpadded(1, length)
    router = ExpertChoiceRouter(4, experts, k, RouterSettings(type="ec", capacity_factor=factor))
    assert router.capacities(ctx).tolist() == [expected]


def test_ec_capacity_follows_mask_ratio():
    settings = RouterSettings(type="ec", schedule=dict(name="linear-reverse", k_min=1, k_max=8))
    router = ExpertChoiceRouter(4, 8, 2, settings)
    ctx = RoutingContext(valid=torch.ones(2, 32, dtype=torch.bool), mask_ratio=torch.tensor([0.05, 0.95]))
    low, high = router.capacities(ctx).tolist()
    assert low > high, "linear-reverse spends more capacity on lightly masked sequences"
    assert (low, high) == (round(32 * 8 / 8), round(32 * 1 / 8))


def test_ec_reads_observed_mask_ratio_through_the_model():
    from retrofit.tiny import build_tiny_model

    settings = RouterSettings(type="ec", schedule=dict(name="linear", k_min=1, k_max=4))
    model = build_tiny_model(router=settings.model_dump())
    ids = torch.randint(0, 256, (2, 16))
    ids[0, :12] = model.config.mask_token_id
    ctx = model.model.routing_context(ids, None, None)
    assert ctx.mask_ratio.tolist() == [0.75, 0.0]
    caps = model.moe_blocks()[0].gate.capacities(ctx).tolist()
    assert caps[0] > caps[1]


BLOCK_CASES = [
    dict(block_length=4, core_threshold=0.6, guard_size=4),
    dict(block_length=5, core_threshold=0.3, guard_size=5),
    dict(block_length=32, core_threshold=0.9, guard_size=4, renormalize=False),
    dict(block_length=3, core_threshold=1.0, guard_size=16),
]


@pytest.mark.parametrize("options", BLOCK_CASES)
@pytest.mark.parametrize("seed, batch, length, experts, k", [(0, 1, 9, 8, 2), (4, 3, 37, 16, 2), (6, 2, 12, 16, 4)])
def test_block_matches_reference(options, seed, batch, length, experts, k):
    settings = RouterSettings(type="block", **options)
    probs, ctx = random_case(seed, batch, length, experts)
    routing = BlockRouter(4, experts, k, settings).select(probs, ctx)
    assert routing.layout == "token" and routing.indices.shape == (batch * length, k)
    assert_same(pairs_of(routing), ref_block(probs, ctx, settings, k), tol=1e-6)


def test_block_touches_fewer_experts_than_tc():
    probs, ctx = random_case(11, 1, 32, 64, pad=False)
    settings = RouterSettings(type="block", block_length=32, guard_size=8)
    block = BlockRouter(4, 64, 4, settings).select(probs, ctx)
    tc = TokenChoiceRouter(4, 64, 4).select(probs, ctx)
    assert block.indices.unique().numel() < tc.indices.unique().numel()


def test_block_refuses_guard_smaller_than_k():
    with pytest.raises(ValueError, match="guard_size"):
        build_router(RouterSettings(type="block", guard_size=1), 4, 8, 2)


@pytest.mark.parametrize("kind", ["tc", "ec", "block"])
def test_stats_match_a_loop_count(kind):
    probs, ctx = random_case(9, 3, 20, 8)
    settings = RouterSettings(type=kind, guard_size=2, block_length=6)
    routing = build_router(settings, 4, 8, 2).select(probs, ctx)
    stats = RoutingStats(8)
    stats.update(routing, ctx.valid)
    load = [0] * 8
    per_token = {}
    flat_valid = ctx.valid.reshape(-1).tolist()
    for (t, e) in pairs_of(routing):
        if flat_valid[t]:
            load[e] += 1
            per_token[t] = per_token.get(t, 0) + 1
    histogram = [0] * 9
    for t, ok in enumerate(flat_valid):
        if ok:
            histogram[per_token.get(t, 0)] += 1
    assert stats.tokens_per_expert.tolist() == load
    assert stats.experts_per_token.tolist() == histogram
    assert stats.unique_experts == sum(1 for n in load if n)
    assert stats.tokens_with_zero_experts == histogram[0]
    assert stats.num_tokens == sum(flat_valid)
    again = RoutingStats(8)
    again.update(routing, ctx.valid)
    stats.merge(again)
    assert stats.unique_experts == sum(1 for n in load if n), "the mean over routings is kept"
    assert stats.tokens_per_expert.tolist() == [2 * n for n in load]
