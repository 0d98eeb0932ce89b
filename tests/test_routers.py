"""Every router against a slow, obviously-correct loop implementation, on random inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from retrofit.routers import (
    ROUTERS,
    BlockRouter,
    ExpertChoiceRouter,
    RoutingContext,
    RoutingStats,
    StatsByMaskRatio,
    TokenChoiceRouter,
    build_router,
    router_settings,
)
from tests.helpers import loop_shape, runner


def random_case(seed: int, batch: int, length: int, experts: int, pad: bool = True):
    """Continuous random probabilities (no ties); sequence b > 0 ends in 3·b padding positions."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(batch, length, experts, generator=gen) * 2, dim=-1)
    valid = torch.ones(batch, length, dtype=torch.bool)
    if pad:
        for b in range(1, batch):
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


def ranked(values: list[float]) -> list[int]:
    """Indices by descending value; equal values keep index order."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def ref_tc(probs, k):
    out = {}
    flat = probs.reshape(-1, probs.shape[-1]).tolist()
    for t, row in enumerate(flat):
        for e in ranked(row)[:k]:
            out[(t, e)] = row[e]
    return out


def ref_schedule_k(name, r, top_k, k_min, k_max, sigma=0.22, threshold=0.5):
    if name == "constant":
        return top_k
    k_min = top_k if k_min is None else k_min
    k_max = top_k if k_max is None else k_max
    s = loop_shape(name, r, sigma, threshold)
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
    flat = probs.reshape(-1, experts).tolist()
    caps = ref_capacities(ctx, settings, top_k, experts)
    out = {}
    groups = [list(range(batch))] if settings.per_batch else [[b] for b in range(batch)]
    for group in groups:
        capacity = sum(caps[b] for b in group)
        candidates = [b * length + i for b in group for i in range(length) if ctx.valid[b, i]]
        for e in range(experts):
            for t in sorted(candidates, key=lambda t: -flat[t][e])[:capacity]:
                out[(t, e)] = flat[t][e]
    return out


def ref_ec_logit_order(logits, ctx, settings, top_k):
    """EC-DLM's default, from its description: each expert takes its top-C tokens by raw logit; a chosen pair's
    gate is the softmax over the logits of the experts that chose that token."""
    batch, length, experts = logits.shape
    flat = logits.reshape(-1, experts).tolist()
    caps = ref_capacities(ctx, settings, top_k, experts)
    chosen_by: dict[int, list[int]] = {}
    for b in range(batch):
        candidates = [b * length + i for i in range(length) if ctx.valid[b, i]]
        for e in range(experts):
            for t in sorted(candidates, key=lambda t: -flat[t][e])[:caps[b]]:
                chosen_by.setdefault(t, []).append(e)
    out = {}
    for t, chosen in chosen_by.items():
        top = max(flat[t][e] for e in chosen)
        total = sum(math.exp(flat[t][e] - top) for e in chosen)
        for e in chosen:
            out[(t, e)] = math.exp(flat[t][e] - top) / total
    return out


def ref_core(vote: list[float], threshold: float, guard: int) -> list[int]:
    """Top-p core set. Cumulative raw votes against p · (their total, summed in the same order): the same rule
    as on the normalised vote, without a division that could push the last cumulative value past p = 1."""
    order = ranked(vote)
    total = sum(vote[e] for e in order)
    core, cumulative = [], 0.0
    for e in order:
        core.append(e)
        cumulative += vote[e]
        if cumulative > threshold * total:
            break
    return core if len(core) >= guard else order[:guard]


def ref_block(probs, ctx, settings, top_k):
    batch, length, experts = probs.shape
    out = {}
    for b in range(batch):
        rows = probs[b].tolist()
        for start in range(0, length, settings.block_length):
            block = range(start, min(start + settings.block_length, length))
            vote = [0.0] * experts
            for i in block:
                if ctx.valid[b, i]:
                    for e in ranked(rows[i])[:top_k]:
                        vote[e] += rows[i][e]
            core = ref_core(vote, settings.core_threshold, min(settings.guard_size, experts))
            for i in block:
                chosen = sorted(core, key=lambda e: -rows[i][e])[:top_k]
                norm = sum(rows[i][e] for e in chosen) if settings.renormalize else 1.0
                for e in chosen:
                    out[(b * length + i, e)] = rows[i][e] / norm
    return out


def assert_same(ours: dict, ref: dict, tol: float = 0.0):
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:10]
    for key, g in ref.items():
        assert abs(ours[key] - g) <= tol * max(1.0, abs(g)), (key, ours[key], g)


# ---------------------------------------------------------------------------------------- registry


def settings_of(kind: str, **fields):
    """``kind``'s settings with those of ``fields`` it has (one call covers every router in a parametrised test)."""
    own = ROUTERS[kind].settings_class.model_fields
    return router_settings(type=kind, **{k: v for k, v in fields.items() if k in own})


def test_registry_builds_each_kind():
    assert set(ROUTERS) == {"tc", "ec", "block"}
    for kind, cls in ROUTERS.items():
        router = build_router(settings_of(kind, guard_size=4), 6, 8, 2)
        assert type(router) is cls and router.kind == kind
        assert router.weight.shape == (8, 6) and router.top_k == 2


@pytest.mark.parametrize("kind", ["tc", "ec", "block"])
def test_forward_scores_with_softmax_and_keeps_logits(kind):
    router = build_router(settings_of(kind, guard_size=2, block_length=4), 6, 8, 2)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(2, 5, 6)
    ctx = RoutingContext.unpadded(2, 5)
    routing = router(hidden, ctx)
    logits = hidden.reshape(-1, 6) @ router.weight.T
    torch.testing.assert_close(routing.logits, logits)
    expected = router.select(torch.softmax(logits.float(), -1).view(2, 5, 8), ctx)
    assert pairs_of(routing) == pytest.approx(pairs_of(expected), rel=1e-6)


# ------------------------------------------------------------------------------------ token choice


@pytest.mark.parametrize("seed, batch, length, experts, k", [(0, 1, 7, 8, 2), (1, 3, 40, 16, 4), (2, 2, 13, 8, 1)])
def test_tc_matches_reference(seed, batch, length, experts, k):
    probs, ctx = random_case(seed, batch, length, experts)
    routing = TokenChoiceRouter(4, experts, k).select(probs, ctx)
    assert routing.layout == "token" and routing.indices.shape == (batch * length, k), "padding is routed too"
    assert_same(pairs_of(routing), ref_tc(probs, k))


def test_tc_gates_are_raw_softmax_values():
    router = TokenChoiceRouter(6, 8, 2)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(2, 5, 6)
    routing = router(hidden, RoutingContext.unpadded(2, 5))
    probs = torch.softmax(hidden.reshape(-1, 6) @ router.weight.T, dim=-1)
    assert torch.equal(routing.gates, probs.topk(2).values)
    assert (routing.gates.sum(-1) < 1).all(), "not renormalised, as the checkpoint's reference does"


def test_tc_is_bit_exact_with_the_reference_block_in_bf16():
    # The reference MoE block: logits = gate(hidden[T, d]) in the model dtype, softmax(dim=1, dtype=float),
    # topk(k, dim=-1), gates used raw.
    torch.manual_seed(0)
    router = TokenChoiceRouter(32, 16, 4).to(torch.bfloat16)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(3, 11, 32, dtype=torch.bfloat16)
    routing = router(hidden, RoutingContext.unpadded(3, 11))
    gate = torch.nn.Linear(32, 16, bias=False, dtype=torch.bfloat16)
    gate.weight.data.copy_(router.weight.data)
    weights = F.softmax(gate(hidden.view(-1, 32)), dim=1, dtype=torch.float)
    gates, experts = torch.topk(weights, 4, dim=-1)
    assert routing.gates.dtype == torch.float32
    assert torch.equal(routing.indices, experts) and torch.equal(routing.gates, gates)


# ----------------------------------------------------------------------------------- expert choice


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
    settings = router_settings(type="ec", **options)
    probs, ctx = random_case(seed, batch, length, experts)
    routing = ExpertChoiceRouter(4, experts, k, settings).select(probs, ctx)
    caps = ref_capacities(ctx, settings, k, experts)
    assert routing.layout == "expert" and routing.indices.shape == (experts, sum(caps))
    assert_same(pairs_of(routing), ref_ec(probs, ctx, settings, k))
    assert routing.capacity.tolist() == caps


def test_ec_layout_is_sequences_in_order_each_in_descending_score():
    probs, ctx = random_case(4, 3, 20, 8)
    routing = ExpertChoiceRouter(4, 8, 2, router_settings(type="ec", capacity_factor=2.0)).select(probs, ctx)
    flat = probs.reshape(-1, 8)
    bounds = [0] + torch.cumsum(routing.capacity, 0).tolist()
    for e in range(8):
        for b in range(3):
            tokens = routing.indices[e, bounds[b]:bounds[b + 1]]
            assert ((tokens // 20) == b).all(), "the b-th slice belongs to sequence b"
            gates = routing.gates[e, bounds[b]:bounds[b + 1]]
            assert torch.equal(gates, flat[tokens, e]), "gates are the token's own probability"
            assert (gates[:-1] > gates[1:]).all(), "descending score inside a sequence"


def test_ec_never_chooses_padding_even_when_capacity_exceeds_length():
    probs, ctx = random_case(7, 3, 10, 8)
    routing = ExpertChoiceRouter(4, 8, 8, router_settings(type="ec", capacity_factor=4.0)).select(probs, ctx)
    tokens, _, _ = routing.pairs()
    assert ctx.valid.reshape(-1)[tokens].all()
    assert routing.capacity.tolist() == ctx.valid.sum(-1).tolist(), "capacity is clamped to the valid length"


@pytest.mark.parametrize("per_batch", [False, True])
def test_ec_sequence_of_padding_only_gets_no_capacity(per_batch):
    probs, ctx = random_case(8, 3, 12, 8)
    ctx.valid[1] = False
    settings = router_settings(type="ec", per_batch=per_batch)
    routing = ExpertChoiceRouter(4, 8, 2, settings).select(probs, ctx)
    assert routing.capacity.tolist() == [3, 0, 2]  # round(12·2/8), empty, round(6·2/8) = round(1.5) = 2
    assert not ((routing.indices >= 12) & (routing.indices < 24)).any()
    assert_same(pairs_of(routing), ref_ec(probs, ctx, settings, 2))


@pytest.mark.parametrize("length, k, experts, factor, expected", [(64, 8, 64, 1.0, 8), (10, 2, 8, 1.0, 2),
                                                                   (3, 2, 64, 1.0, 1), (512, 8, 64, 1.25, 80),
                                                                   (20, 2, 8, 1.0, 5), (6, 1, 4, 1.0, 2),
                                                                   (7, 4, 16, 0.5, 1), (5, 8, 4, 1.0, 5)])
def test_ec_capacity_formula(length, k, experts, factor, expected):
    # C = round(L·k/E·factor) (half to even: 6·1/4 = 1.5 → 2), at least 1, at most L.
    ctx = RoutingContext.unpadded(1, length)
    router = ExpertChoiceRouter(4, experts, k, router_settings(type="ec", capacity_factor=factor))
    assert router.capacities(ctx).tolist() == [expected]


def test_ec_capacity_counts_only_valid_tokens():
    ctx = RoutingContext(valid=torch.arange(64).expand(2, 64) < torch.tensor([[64], [32]]),
                         mask_ratio=torch.zeros(2))
    router = ExpertChoiceRouter(4, 64, 8, router_settings(type="ec"))
    assert router.capacities(ctx).tolist() == [8, 4]


def test_ec_capacity_follows_mask_ratio():
    settings = router_settings(type="ec", schedule=dict(name="linear-reverse", k_min=1, k_max=8))
    router = ExpertChoiceRouter(4, 8, 2, settings)
    ctx = RoutingContext(valid=torch.ones(3, 32, dtype=torch.bool), mask_ratio=torch.tensor([0.05, 0.5, 0.95]))
    low, mid, high = router.capacities(ctx).tolist()
    assert low > mid > high, "linear-reverse spends more capacity on lightly masked sequences"
    assert (low, mid, high) == (round(32 * 8 / 8), round(32 * 4 / 8), round(32 * 1 / 8))  # k = 8, round(4.5), 1
    routing = router.select(torch.softmax(torch.randn(3, 32, 8), -1), ctx)
    assert routing.indices.shape == (8, low + mid + high)


def test_ec_reads_observed_mask_ratio_through_the_model():
    from retrofit.tiny import build_tiny_model

    settings = router_settings(type="ec", schedule=dict(name="linear", k_min=1, k_max=4))
    model = build_tiny_model(router=settings.model_dump())
    ids = torch.randint(0, 256, (2, 16))
    ids[0, :12] = model.config.mask_token_id
    ctx = model.model.routing_context(ids, None, None)
    assert ctx.mask_ratio.tolist() == [0.75, 0.0]
    caps = model.moe_blocks()[0].gate.capacities(ctx).tolist()
    assert caps[0] > caps[1]


def test_inference_mask_ratio_counts_only_the_maskable_region():
    """A prompt is never masked: the same answer region behind a 10- or a 900-token prompt gets the same
    mask ratio, hence the same experts per token, at every denoising step (issue 10.1)."""
    from retrofit.eval.sampler_llada import GenerateArgs, generate
    from retrofit.tiny import build_tiny_model

    settings = router_settings(type="ec", schedule=dict(name="linear-reverse", k_min=1, k_max=4))
    model = build_tiny_model(router=settings.model_dump())
    gate = model.moe_blocks()[0].gate
    seen = []
    gate.register_forward_pre_hook(lambda module, args: seen.append(args[1].mask_ratio.tolist()))
    per_prompt = []
    for prompt_length in (10, 900):
        seen.clear()
        prompt = torch.randint(0, 256, (1, prompt_length), generator=torch.Generator().manual_seed(prompt_length))
        generate(model, prompt, model.config.mask_token_id, GenerateArgs(gen_length=16, steps=8, denoise_block=16))
        per_prompt.append(list(seen))
    assert per_prompt[0] == per_prompt[1] == [[1 - step / 8] for step in range(8)]


@pytest.mark.parametrize("seed, batch, length, experts, k", [(0, 1, 9, 8, 2), (3, 3, 37, 16, 2), (5, 2, 24, 16, 4)])
@pytest.mark.parametrize("factor", [1.0, 1.7])
def test_ec_logit_order_matches_reference(seed, batch, length, experts, k, factor):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, experts, generator=gen, dtype=torch.float64) * 2
    _, ctx = random_case(seed, batch, length, experts)
    settings = router_settings(type="ec", capacity_factor=factor, ec_order="topk-then-softmax")
    router = ExpertChoiceRouter(4, experts, k, settings)
    assert_same(pairs_of(router.select_by_logits(logits, ctx)), ref_ec_logit_order(logits, ctx, settings, k),
                tol=1e-12)


def test_ec_orders_choose_different_pairs_and_the_setting_travels(tiny_dir, tmp_path):
    """The two orders are different routers on the same weights; the converted config records which one."""
    from retrofit.cli import app
    from retrofit.io.load import load_model

    result = runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "ec", "--ec-order",
                                 "topk-then-softmax", "--out", str(tmp_path / "ec")])
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "ec")
    assert model.config.router_settings.ec_order == "topk-then-softmax"
    assert all(b.gate.order == "topk-then-softmax" for b in model.moe_blocks())
    hidden = torch.randn(2, 20, model.config.hidden_size)
    ctx = RoutingContext.unpadded(2, 20)
    gate = model.moe_blocks()[0].gate
    by_logit = pairs_of(gate(hidden, ctx))
    gate.order = "softmax-then-topk"
    by_probability = pairs_of(gate(hidden, ctx))
    assert set(by_logit) != set(by_probability) and len(by_logit) == len(by_probability)


# ----------------------------------------------------------------------------------- block routing


BLOCK_CASES = [
    dict(block_length=4, core_threshold=0.6, guard_size=4),
    dict(block_length=5, core_threshold=0.3, guard_size=5),
    dict(block_length=32, core_threshold=0.9, guard_size=4, renormalize=False),
    dict(block_length=3, core_threshold=1.0, guard_size=16),
    dict(block_length=7, core_threshold=1.0, guard_size=4),
    dict(block_length=1, core_threshold=0.5, guard_size=4),
]


@pytest.mark.parametrize("options", BLOCK_CASES)
@pytest.mark.parametrize("seed, batch, length, experts, k", [(0, 1, 9, 8, 2), (4, 3, 37, 16, 2), (6, 2, 12, 16, 4)])
def test_block_matches_reference(options, seed, batch, length, experts, k):
    settings = router_settings(type="block", **options)
    probs, ctx = random_case(seed, batch, length, experts)
    routing = BlockRouter(4, experts, k, settings).select(probs, ctx)
    assert routing.layout == "token" and routing.indices.shape == (batch * length, k)
    assert_same(pairs_of(routing), ref_block(probs, ctx, settings, k), tol=1e-6)


# Integer votes, so cumulative sums and p · total are exact: normalised 0.5, 0.7, 0.85, 0.95, 1.0 in rank order.
VOTE = torch.tensor([1.0, 10.0, 0.0, 3.0, 4.0, 2.0, 0.0, 0.0])  # ranked: 1, 4, 3, 5, 0, then 2, 6, 7 (ties: id)


@pytest.mark.parametrize("threshold, guard, core", [
    (0.6, 1, [1, 4]),  # 0.5 ≤ 0.6, then 0.7 crosses: kept as the first crossing
    (0.5, 1, [1, 4]),  # 0.5 is within p (≤), 0.7 is the first crossing
    (0.4, 1, [1]),  # the first expert already crosses: still at least one
    (0.4, 3, [1, 4, 3]),  # fewer than guard_size: top-guard by vote instead
    (0.9, 2, [1, 4, 3, 5]),  # 0.95 crosses at expert 5
    (0.96, 2, [1, 4, 3, 5, 0]),  # 1.0 crosses at expert 0; the zero-vote experts stay out
    (0.96, 6, [1, 4, 3, 5, 0, 2]),  # the guard takes a zero-vote expert, the lowest id first
    (1.0, 2, [1, 4, 3, 5, 0, 2, 6, 7]),  # nothing ever crosses p = 1: zero-vote experts too
    (0.6, 8, [1, 4, 3, 5, 0, 2, 6, 7]),
])
def test_block_core_set_respects_threshold_and_guard(threshold, guard, core):
    settings = router_settings(type="block", core_threshold=threshold, guard_size=guard)
    router = BlockRouter(4, 8, 1, settings)
    for scale in (1.0, 0.25, 3.0):  # the vote need not be normalised
        chosen = router.core_sets(VOTE * scale)
        assert chosen.nonzero().squeeze(1).tolist() == sorted(core)
        assert ref_core((VOTE * scale).tolist(), threshold, guard) == core


def test_block_core_sets_are_per_block():
    votes = torch.stack([VOTE, VOTE.flip(0), torch.zeros(8)]).view(1, 3, 8)
    core = BlockRouter(4, 8, 1, router_settings(type="block", core_threshold=0.6, guard_size=1)).core_sets(votes)
    assert [c.nonzero().squeeze(1).tolist() for c in core[0]] == [[1, 4], [3, 6], list(range(8))]


def test_block_tokens_stay_inside_their_blocks_core_set():
    probs, ctx = random_case(12, 2, 40, 16)
    settings = router_settings(type="block", block_length=8, core_threshold=0.5, guard_size=4)
    routing = BlockRouter(4, 16, 2, settings).select(probs, ctx)
    experts = routing.indices.view(2, 5, 8, 2)
    for b in range(2):
        for n in range(5):
            vote = torch.zeros(16)
            for i in range(8):
                if ctx.valid[b, n * 8 + i]:
                    top = probs[b, n * 8 + i].topk(2)
                    vote[top.indices] += top.values
            core = set(ref_core(vote.tolist(), 0.5, 4))
            assert set(experts[b, n].reshape(-1).tolist()) <= core
    # Raw gates by default, the checkpoint's convention: each is the token's own probability for that expert.
    torch.testing.assert_close(routing.gates, probs.reshape(80, 16).gather(-1, routing.indices))
    settings = settings.model_copy(update={"renormalize": True})
    renormalised = BlockRouter(4, 16, 2, settings).select(probs, ctx)
    torch.testing.assert_close(renormalised.gates.sum(-1), torch.ones(80), msg="renormalised over the k")


def test_block_of_padding_only_routes_like_token_choice():
    probs, ctx = random_case(13, 2, 10, 8, pad=False)
    ctx.valid[1, 5:] = False  # the second sequence's second block (positions 5..9) is all padding
    settings = router_settings(type="block", block_length=5, core_threshold=0.3, guard_size=2)
    routing = BlockRouter(4, 8, 2, settings).select(probs, ctx)
    top = probs[1, 5:].topk(2)
    rows = slice(15, 20)
    assert torch.equal(routing.indices[rows], top.indices)
    torch.testing.assert_close(routing.gates[rows], top.values)
    renormalised = BlockRouter(4, 8, 2, settings.model_copy(update={"renormalize": True})).select(probs, ctx)
    torch.testing.assert_close(renormalised.gates[rows], top.values / top.values.sum(-1, keepdim=True))


def test_block_touches_fewer_experts_than_tc():
    probs, ctx = random_case(11, 1, 32, 64, pad=False)
    settings = router_settings(type="block", block_length=32, guard_size=8)
    block = BlockRouter(4, 64, 4, settings).select(probs, ctx)
    tc = TokenChoiceRouter(4, 64, 4).select(probs, ctx)
    assert block.indices.unique().numel() < tc.indices.unique().numel()


def test_block_refuses_guard_smaller_than_k():
    with pytest.raises(ValueError, match="guard_size"):
        build_router(router_settings(type="block", guard_size=1), 4, 8, 2)


# -------------------------------------------------------------------------------------- statistics


def loop_counts(routing, valid, experts):
    load = [0] * experts
    per_token = {}
    flat_valid = valid.reshape(-1).tolist()
    for (t, e) in pairs_of(routing):
        if flat_valid[t]:
            load[e] += 1
            per_token[t] = per_token.get(t, 0) + 1
    histogram = [0] * (experts + 1)
    for t, ok in enumerate(flat_valid):
        if ok:
            histogram[per_token.get(t, 0)] += 1
    return load, histogram, sum(flat_valid)


@pytest.mark.parametrize("kind", ["tc", "ec", "block"])
def test_stats_match_a_loop_count(kind):
    probs, ctx = random_case(9, 3, 20, 8)
    settings = settings_of(kind, guard_size=2, block_length=6)
    routing = build_router(settings, 4, 8, 2).select(probs, ctx)
    stats = RoutingStats(8)
    stats.update(routing, ctx.valid)
    load, histogram, tokens = loop_counts(routing, ctx.valid, 8)
    assert stats.tokens_per_expert.tolist() == load
    assert stats.experts_per_token.tolist() == histogram
    assert stats.unique_experts == sum(1 for n in load if n)
    assert stats.tokens_with_zero_experts == histogram[0]
    assert stats.num_tokens == tokens == 20 + 17 + 14
    assert stats.capacity == (routing.capacity.tolist() if kind == "ec" else None)
    again = RoutingStats(8)
    again.update(routing, ctx.valid)
    stats.merge(again)
    assert stats.unique_experts == sum(1 for n in load if n), "the mean over routings is kept"
    assert stats.tokens_per_expert.tolist() == [2 * n for n in load]
    assert stats.routings == 2


def test_stats_average_unique_experts_over_routings_and_serialise():
    probs, ctx = random_case(10, 2, 16, 16, pad=False)
    ec = ExpertChoiceRouter(4, 16, 2, router_settings(type="ec", capacity_factor=0.5)).select(probs, ctx)
    narrow = BlockRouter(4, 16, 2, router_settings(type="block", guard_size=2, core_threshold=0.1)).select(probs, ctx)
    stats = RoutingStats(16)
    stats.update(ec, ctx.valid)
    stats.update(narrow, ctx.valid)
    unique = [len({e for (_, e) in pairs_of(r)}) for r in (ec, narrow)]
    assert stats.unique_experts == sum(unique) / 2
    assert stats.unique_experts < 16, "the narrow block router touches fewer experts"
    assert stats.capacity == [1, 1]  # round(16·2/16·0.5)
    out = json.loads(json.dumps(stats.as_dict()))
    assert out["experts_per_token_histogram"] == stats.experts_per_token.tolist()
    assert out["tokens_with_zero_experts"] > 0, "EC at half capacity leaves tokens unchosen"
    assert out["tokens"] == 64 and out["routings"] == 2


def test_unique_experts_per_block_matches_a_loop():
    probs, ctx = random_case(13, 2, 20, 8)
    routing = build_router(router_settings(type="tc"), 4, 8, 2).select(probs, ctx)
    stats = RoutingStats(8, block_length=6)
    stats.update(routing, ctx.valid)
    per_block = {}
    flat_valid = ctx.valid.reshape(-1).tolist()
    for (t, e) in pairs_of(routing):
        if flat_valid[t]:
            per_block.setdefault((t // 20, (t % 20) // 6), set()).add(e)
    assert stats.blocks == len(per_block)
    assert stats.unique_experts_per_block == pytest.approx(sum(map(len, per_block.values())) / len(per_block))


@pytest.mark.parametrize("block_start", [0, 3, 6, 11])
def test_unique_experts_per_block_cut_at_block_start(block_start):
    """Statistics cut blocks where the sampler and the block router do: at block_start + multiples of the block."""
    probs, ctx = random_case(14, 2, 20, 8)
    routing = build_router(router_settings(type="tc"), 4, 8, 2).select(probs, ctx)
    stats = RoutingStats(8, block_length=6)
    stats.update(routing, ctx.valid, block_start=block_start)
    per_block = {}
    flat_valid = ctx.valid.reshape(-1).tolist()
    for (t, e) in pairs_of(routing):
        if flat_valid[t]:
            per_block.setdefault((t // 20, math.floor((t % 20 - block_start) / 6)), set()).add(e)
    assert stats.blocks == len(per_block)
    assert stats.unique_experts_per_block == pytest.approx(sum(map(len, per_block.values())) / len(per_block))


@pytest.mark.parametrize("kind", ["tc", "ec"])
def test_stats_by_mask_ratio_put_each_sequence_in_its_nearest_bucket(kind):
    probs, ctx = random_case(15, 3, 20, 8)
    ctx = RoutingContext(ctx.valid, torch.tensor([0.05, 0.52, 0.33]))  # buckets 0.1, 0.5, 0.3
    routing = build_router(settings_of(kind), 4, 8, 2).select(probs, ctx)
    stats = StatsByMaskRatio(8, 6, (0.1, 0.3, 0.5, 0.7, 0.9))
    stats.update(routing, ctx.valid, mask_ratio=ctx.mask_ratio)
    assert [stats.ratios[i] for i in stats.filled()] == [0.1, 0.3, 0.5]
    for ratio, row in ((0.1, 0), (0.3, 2), (0.5, 1)):
        only = torch.zeros_like(ctx.valid)
        only[row] = ctx.valid[row]
        load, histogram, tokens = loop_counts(routing, only, 8)
        bucket = stats.buckets[stats.ratios.index(ratio)]
        assert bucket.tokens_per_expert.tolist() == load and bucket.experts_per_token.tolist() == histogram
        assert bucket.num_tokens == tokens and bucket.routings == 1
        if kind == "ec":
            assert bucket.capacity == [int(routing.capacity[row])]
    whole = RoutingStats(8, 6)
    whole.update(routing, ctx.valid)
    assert stats.merged().as_dict() == whole.as_dict(), "the total is the unsplit statistics"
    assert stats.merged().routings == 1, "one forward counts once however many buckets it feeds"


@pytest.mark.parametrize("prompt_length", [5, 13, 16, 22])
def test_denoising_blocks_are_routing_blocks_for_any_prompt_length(prompt_length):
    """With block_start at the prompt's end, each denoising block is routed as one block: its tokens get
    exactly the experts the router gives that block on its own; the prompt ends on a block boundary too."""
    n, generated = 8, 24
    router = BlockRouter(16, 16, 2, router_settings(type="block", block_length=n, core_threshold=0.5, guard_size=4))
    probs, _ = random_case(7, 1, prompt_length + generated, 16, pad=False)
    valid = torch.ones(1, prompt_length + generated, dtype=torch.bool)
    whole = router.select(probs, RoutingContext(valid, torch.zeros(1), block_start=prompt_length)).indices
    starts = list(range(prompt_length, prompt_length + generated, n))
    starts += list(range(prompt_length - n, -n, -n))
    for start in starts:
        lo, hi = max(start, 0), start + n
        alone = router.select(probs[:, lo:hi], RoutingContext(valid[:, lo:hi], torch.zeros(1))).indices
        assert torch.equal(whole[lo:hi], alone), (lo, hi)


def test_settings_are_per_router_and_stored_flat_sections_still_load():
    """Each router validates only its own fields; a config.json written before per-router settings held every
    router's fields in one flat section, and reading it keeps those of its router only."""
    with pytest.raises(Exception, match="guard_size"):
        router_settings(type="ec", guard_size=4)
    flat = {"type": "ec", "capacity_factor": 2.0, "per_batch": False, "schedule": {"name": "constant"},
            "ec_order": "softmax-then-topk", "block_length": 32, "core_threshold": 0.6, "guard_size": 16,
            "renormalize": False}
    settings = router_settings(flat, stored=True)
    assert type(settings).__name__ == "ExpertChoiceSettings" and settings.capacity_factor == 2.0
    assert "guard_size" not in settings.model_dump()
    with pytest.raises(Exception, match="capacity_fator"):
        router_settings({**flat, "capacity_fator": 1.0}, stored=True)  # a misspelling is never dropped
    with pytest.raises(Exception, match="unknown router type 'xc'; use tc, ec, block"):
        router_settings(type="xc")


def test_an_expert_layout_with_keep_lists_only_the_kept_pairs():
    """A cached expert-choice step lists every span token for each expert and marks the chosen (``keep``):
    statistics, through ``pairs``, see the chosen alone."""
    from retrofit.routers.base import Routing

    keep = torch.tensor([[True, False, True], [False, False, True]])
    routing = Routing("expert", torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[0.5, 0.0, 0.2], [0, 0, 0.7]]),
                      2, keep=keep)
    tokens, experts, gates = routing.pairs()
    assert tokens.tolist() == [0, 2, 2] and experts.tolist() == [0, 0, 1]
    assert gates.tolist() == pytest.approx([0.5, 0.2, 0.7])
