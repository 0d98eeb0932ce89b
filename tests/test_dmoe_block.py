"""dMoE's block router for LLaDA2.0 (the HEAD ``..._be_adaptive`` gate; llada2-spec.md §7.2-§7.3) against the
project's :class:`BlockRouter` with LLaDA2.0's own scoring (:class:`GroupLimitedSigmoid`, spec §4.2).

The reference below is a slow loop written from the spec's description, not from either implementation: router
blocks are consecutive 32-token chunks counted from position 0 of the forward, each chunk votes with its tokens'
biased top-k (no group limit), keeps the top-p of the normalised vote (widened by the guard), and every token then
runs LLaDA2.0's group-limited token choice inside its chunk's core set. Where dMoE's result depends on how
``torch.topk`` breaks ties between −inf values (spec §7.2 (b)) the reference calls ``torch.topk`` on one token's
1-D row, as dMoE's description says it does; ties in the *vote* (zero-vote experts) go to the lower expert id, the
project's documented convention (dMoE's ``torch.sort``/``torch.topk`` leave that order to the backend).
"""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.models.llada2 import GroupLimitedSigmoid
from retrofit.routers import BlockRouter, RoutingContext, router_settings

BLOCK = 32  # dMoE HEAD hard-codes its router block (spec §7.3)
SCALE = 2.5  # LLaDA2.0-mini's routed_scaling_factor
P = 0.6  # dMoE's core_threshold (spec §7.1)

# E=256 is LLaDA2.0-mini's router (8 groups of 32, best 4 groups, top-8) with dMoE HEAD's guard of 16; the small
# ones keep the same structure at a size where the guard and the group limit both bite on random inputs.
CONFIGS = {
    "E16": dict(experts=16, n_group=4, topk_group=2, k=4, guard=8),
    "E32": dict(experts=32, n_group=8, topk_group=4, k=4, guard=6),
    "E256-mini": dict(experts=256, n_group=8, topk_group=4, k=8, guard=16),
}


# ------------------------------------------------------------------------------------------------- reference


def ranked(values: list[float]) -> list[int]:
    """Indices by descending value; equal values keep index order (Python's sort is stable)."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def reference_core_set(chunk: list[list[float]], k: int, p: float, guard: int) -> tuple[list[int], bool]:
    """One router block's core set (spec §7.2 steps 1-4) from its voting tokens' biased scores ``[n][E]``.

    Returns the sorted core expert ids and whether the guard replaced the top-p set. The keep rule is written
    exactly as described (cumulative ≤ p, the first expert, the first expert whose cumulative crosses p) rather
    than as "a prefix", so that a non-monotone cumulative (negative votes, §7.2 (c)) is handled as dMoE does.
    """
    num_experts = len(chunk[0])
    votes = [0.0] * num_experts
    for row in chunk:
        for e in ranked(row)[:k]:  # each token's own top-k by biased score over ALL experts, no group limit
            votes[e] += row[e]
    total = sum(votes)
    share = [v / (total + 1e-20) for v in votes]
    order = ranked(share)
    kept, cumulative, above = [], 0.0, False
    for rank, e in enumerate(order):
        cumulative += share[e]
        crosses = cumulative > p and not above
        if cumulative <= p or rank == 0 or crosses:
            kept.append(e)
        above = cumulative > p
    guarded = len(kept) < guard
    if guarded:
        kept = order[:guard]  # the top-guard experts by vote replace the top-p set
    return sorted(kept), guarded


def reference_token_choice(biased: list[float], scores: list[float], core: set[int], k: int, n_group: int,
                           topk_group: int) -> tuple[list[int], list[float]]:
    """One token's group-limited top-k restricted to ``core`` (spec §7.2 step 5-6, §4.2): (expert ids, gates)."""
    num_experts = len(biased)
    size = num_experts // n_group
    masked = [b if e in core else -math.inf for e, b in enumerate(biased)]
    group_scores = [sum(sorted(masked[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    groups = set(torch.tensor(group_scores).topk(topk_group, sorted=False).indices.tolist())
    candidates = [m if e // size in groups else -math.inf for e, m in enumerate(masked)]
    experts = torch.tensor(candidates).topk(k).indices.tolist()  # descending biased score, as torch.topk returns
    chosen = [scores[e] for e in experts]  # UNBIASED scores, even for a −inf filler (§7.2 (b))
    total = sum(chosen)
    return experts, [g / (total + 1e-20) * SCALE for g in chosen]


def reference_block_routing(probs: torch.Tensor, bias: torch.Tensor, valid: torch.Tensor, cfg: dict,
                            p: float = P):
    """dMoE HEAD's routing of one forward: (indices ``[B*L, k]``, gates ``[B*L, k]``, cores, guarded flags).

    ``cores``/``guarded`` are per (sequence, chunk). Chunks are ``[0, 32), [32, 64), …`` of the forward; a partial
    last chunk holds only its real tokens, and padding (``valid`` False) never votes but is still routed, the
    training gate's ``valid_token_mask`` convention and the project's (dMoE's eval gate turns a partial chunk into
    −inf/NaN votes instead, spec §7.3, which no test here reproduces).
    """
    batch, length, _ = probs.shape
    biased = (probs + bias.float()).tolist()  # s = sigmoid(logits) + expert_bias, in fp32 as the gate computes it
    plain = probs.tolist()
    indices, gates, cores, guarded = [], [], [], []
    for b in range(batch):
        for start in range(0, length, BLOCK):
            positions = range(start, min(start + BLOCK, length))
            voters = [biased[b][t] for t in positions if valid[b, t]]
            if voters:
                core, fired = reference_core_set(voters, cfg["k"], p, cfg["guard"])
            else:  # an all-padding chunk: zero vote, every expert within p (the project's documented choice)
                core, fired = list(range(cfg["experts"])), False
            cores.append(core)
            guarded.append(fired)
            for t in positions:
                experts, weights = reference_token_choice(biased[b][t], plain[b][t], set(core), cfg["k"],
                                                          cfg["n_group"], cfg["topk_group"])
                indices.append(experts)
                gates.append(weights)
    return torch.tensor(indices), torch.tensor(gates, dtype=torch.float64), cores, guarded


# --------------------------------------------------------------------------------------------------- helpers


def make_router(cfg: dict, bias: torch.Tensor, p: float = P, guard: int | None = None) -> BlockRouter:
    settings = router_settings(type="block", block_length=BLOCK, core_threshold=p,
                               guard_size=cfg["guard"] if guard is None else guard)
    scoring = GroupLimitedSigmoid(cfg["n_group"], cfg["topk_group"], SCALE)
    router = BlockRouter(8, cfg["experts"], cfg["k"], settings, scoring=scoring)
    router.expert_bias.copy_(bias)
    return router


def random_case(seed: int, batch: int, length: int, experts: int, peaked: bool):
    """Sigmoid scores of continuous random logits (no ties) and a random expert bias of the scores' own scale.

    ``peaked`` adds a per-sequence preference over experts, so that a block's vote concentrates on a few experts
    and the guard replaces the top-p set; flat logits spread the vote so that top-p alone exceeds the guard.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, experts, generator=gen)
    if peaked:
        logits = logits + 4 * torch.randn(batch, 1, experts, generator=gen)
    bias = 0.1 * torch.randn(experts, generator=gen)
    return torch.sigmoid(logits), bias


def route(router: BlockRouter, probs: torch.Tensor, valid: torch.Tensor | None = None, block_start: int = 0):
    batch, length, _ = probs.shape
    valid = torch.ones(batch, length, dtype=torch.bool) if valid is None else valid
    routing = router.select(probs, RoutingContext(valid=valid, mask_ratio=torch.zeros(batch), block_start=block_start))
    assert routing.layout == "token"
    return routing


def assert_same_routing(routing, ref_indices: torch.Tensor, ref_gates: torch.Tensor, ordered: bool = True):
    """Same expert SET per token, the same gate per (token, expert) to 1e-6, and (``ordered``) the same order."""
    assert routing.indices.shape == ref_indices.shape
    for t, (ours, ref) in enumerate(zip(routing.indices.tolist(), ref_indices.tolist())):
        assert sorted(ours) == sorted(ref), f"token {t}: experts {sorted(ours)} != reference {sorted(ref)}"
    ours_sorted, ours_order = routing.indices.sort(-1)
    ref_sorted, ref_order = ref_indices.sort(-1)
    torch.testing.assert_close(routing.gates.double().gather(-1, ours_order), ref_gates.gather(-1, ref_order),
                               atol=1e-6, rtol=0)
    if ordered:
        # LLaDA2.0's own gate returns its k experts in descending biased-score order (torch.topk, sorted=True), the
        # slot order its fp32 combine sums in (spec §4.3): the block router must keep it.
        assert torch.equal(routing.indices, ref_indices)


def core_sets_of(router: BlockRouter, probs: torch.Tensor) -> torch.Tensor:
    """The project's core sets ``[B, N, E]`` of an unpadded forward whose length is a multiple of 32."""
    batch, length, experts = probs.shape
    blocked = probs.reshape(batch, length // BLOCK, BLOCK, experts)
    valid = torch.ones(batch, length // BLOCK, BLOCK, dtype=torch.bool)
    return router.core_sets(router.votes(router.scoring.selection(blocked, router.bias), valid))


def as_sets(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask.reshape(-1, mask.shape[-1])]


# ------------------------------------------------------------------------------------ random inputs vs dMoE

CASES = [(name, seed, batch, length, peaked) for name in CONFIGS for seed in (0, 1, 2) for batch in (1, 2)
         for length in (32, 64, 45) for peaked in (False, True)]


@pytest.mark.parametrize("name, seed, batch, length, peaked", CASES)
def test_block_router_matches_dmoe_reference(name, seed, batch, length, peaked):
    """The project's block router gives dMoE HEAD's routing: per token the same experts (in the same descending
    biased-score order) with the same renormalised, scaled unbiased gates."""
    cfg = CONFIGS[name]
    probs, bias = random_case(seed, batch, length, cfg["experts"], peaked)
    router = make_router(cfg, bias)
    valid = torch.ones(batch, length, dtype=torch.bool)
    ref_indices, ref_gates, cores, _ = reference_block_routing(probs, bias, valid, cfg)
    routing = route(router, probs)
    assert_same_routing(routing, ref_indices, ref_gates)
    # A token's core experts come first (descending order); any expert outside its chunk's core set is a −inf
    # filler of §7.2 (b), ranked last. Under mini's shape (8 groups, best 4, k 8, guard 16) the chosen groups
    # always hold ≥ 9 core experts, so there every expert is a core expert; E32 (guard 6, groups of 4) has fillers.
    chunks = math.ceil(length / BLOCK)
    for flat, experts in enumerate(routing.indices.tolist()):
        b, t = divmod(flat, length)
        inside = [e in set(cores[b * chunks + t // BLOCK]) for e in experts]
        assert inside == sorted(inside, reverse=True)
        assert all(inside) or name == "E32"


@pytest.mark.parametrize("name, seed, length", [(n, s, L) for n in CONFIGS for s in (0, 1) for L in (64, 45)])
def test_core_sets_match_dmoe_reference(name, seed, length):
    """The core sets themselves (not just the routing they lead to) match: a core expert no token ends up using
    would change the unique-expert statistic (spec §7.4) without changing any routing."""
    cfg = CONFIGS[name]
    for peaked in (False, True):
        probs, bias = random_case(seed, 1, length, cfg["experts"], peaked)
        router = make_router(cfg, bias)
        _, _, cores, _ = reference_block_routing(probs, bias, torch.ones(1, length, dtype=torch.bool), cfg)
        padded = torch.nn.functional.pad(probs, (0, 0, 0, (-length) % BLOCK))
        blocked = padded.reshape(1, -1, BLOCK, cfg["experts"])
        valid = torch.nn.functional.pad(torch.ones(1, length, dtype=torch.bool), (0, (-length) % BLOCK))
        selection = router.scoring.selection(blocked, router.bias)
        ours = router.core_sets(router.votes(selection, valid.reshape(1, -1, BLOCK)))
        assert as_sets(ours) == cores


def test_random_cases_exercise_both_core_set_branches():
    """Guards the test above against vacuity: for every config, some random blocks keep their top-p set and
    others have it replaced by the guard, so both branches of step 4 are compared."""
    for name, cfg in CONFIGS.items():
        fired = set()
        for seed, batch, length, peaked in [(s, 2, 64, pk) for s in (0, 1, 2) for pk in (False, True)]:
            probs, bias = random_case(seed, batch, length, cfg["experts"], peaked)
            _, _, _, guarded = reference_block_routing(probs, bias, torch.ones(batch, length, dtype=torch.bool), cfg)
            fired.update(guarded)
        assert fired == {False, True}, f"{name}: guard fired {fired} only"


def test_padding_never_votes():
    """Padding (the project's convention, dMoE's training gate's ``valid_token_mask``): a padded position does
    not vote, whatever its scores, but is still routed inside its chunk's core set."""
    cfg = CONFIGS["E32"]
    probs, bias = random_case(3, 2, 64, cfg["experts"], peaked=True)
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[1, 50:] = False
    router = make_router(cfg, bias)
    ref_indices, ref_gates, _, _ = reference_block_routing(probs, bias, valid, cfg)
    routing = route(router, probs, valid)
    assert_same_routing(routing, ref_indices, ref_gates)
    scrambled = probs.clone()
    scrambled[1, 50:] = torch.rand(14, cfg["experts"])
    again = route(router, scrambled, valid)
    assert torch.equal(again.indices[:64 + 50], routing.indices[:64 + 50])


# ---------------------------------------------------------------------------------- edge cases (spec §7.2)

EDGE = dict(experts=16, n_group=4, topk_group=2, k=2, guard=5)  # groups {0-3}, {4-7}, {8-11}, {12-15}


def edge_probs(seed: int, favourites: list[int], others: list[list[int]], high: float = 0.95) -> torch.Tensor:
    """32 tokens whose biased top-k over all experts is every expert in ``favourites`` plus the experts of
    ``others[t % len(others)]``: the vote then lands exactly on those experts, so the core set is known."""
    gen = torch.Generator().manual_seed(seed)
    probs = 0.01 + 0.09 * torch.rand(BLOCK, 16, generator=gen)
    for t in range(BLOCK):
        probs[t, favourites] = high + 0.01 * torch.rand(len(favourites), generator=gen)
        probs[t, others[t % len(others)]] = 0.6 + 0.3 * torch.rand(len(others[0]), generator=gen)
    return probs.unsqueeze(0)


def test_a_group_with_one_core_expert_is_not_chosen():
    """§7.2 (a): expert 0 is every token's best expert and in the core set, but alone in its group there; a group's
    score is the sum of its two best core scores, so it is −inf and (two other groups holding two core experts
    each) never chosen. Core = the guard's top-5 by vote: {0, 4, 5, 8, 9} (p is tiny, so top-p keeps one)."""
    cfg = EDGE
    probs = edge_probs(0, [0], [[4], [5], [8], [9]])
    bias = torch.zeros(16)
    router = make_router(cfg, bias, p=0.01)
    ref_indices, ref_gates, cores, guarded = reference_block_routing(probs, bias, torch.ones(1, BLOCK, dtype=bool),
                                                                     cfg, p=0.01)
    assert cores == [[0, 4, 5, 8, 9]] and guarded == [True]
    assert as_sets(core_sets_of(router, probs)) == cores
    routing = route(router, probs)
    assert_same_routing(routing, ref_indices, ref_gates)
    assert 0 not in routing.indices.unique().tolist()
    assert set(routing.indices.unique().tolist()) == {4, 5, 8, 9}


def test_fewer_than_k_finite_candidates():
    """§7.2 (b): the core set {0, 4, 8, 12} holds one expert per group, so every group scores −inf; the two groups
    torch.topk picks among the tied −inf scores hold only two finite candidates for k = 4, and torch.topk fills
    the other two slots with −inf experts (from anywhere: every non-core expert is −inf), which still get gates
    from their unbiased scores. What is backend-independent: each token gets exactly two core experts (one per
    chosen group), two non-core fillers, distinct ids, gates summing to 2.5 with the fillers' gates > 0. The ids
    themselves follow torch.topk's tie order; the project makes the same torch.topk calls as the reference and,
    on this backend, picks the same groups and fillers (checked below)."""
    cfg = dict(EDGE, k=4, guard=4)
    probs = edge_probs(1, [0, 4, 8, 12], [[]], high=0.9)
    bias = torch.zeros(16)
    router = make_router(cfg, bias, p=0.01)
    ref_indices, ref_gates, cores, _ = reference_block_routing(probs, bias, torch.ones(1, BLOCK, dtype=bool), cfg,
                                                               p=0.01)
    assert cores == [[0, 4, 8, 12]]
    routing = route(router, probs)
    for experts, gates in zip(routing.indices.tolist(), routing.gates.tolist()):
        assert len(set(experts)) == 4
        core = [e for e in experts if e in {0, 4, 8, 12}]
        assert len(core) == 2 and len({e // 4 for e in core}) == 2
        assert all(g > 0 for g in gates) and math.isclose(sum(gates), SCALE, rel_tol=1e-6)
    # The tie-dependent part: same ids and gates as dMoE's torch.topk calls on one token's row.
    assert_same_routing(routing, ref_indices, ref_gates, ordered=False)


def test_negative_bias_mixed_sign_votes():
    """§7.2 (c), the common case: a negative bias on most experts puts biased values ≤ 0 into the vote while the
    block's total vote stays positive; dMoE does not guard against it, and neither need the project: with a
    positive total the normalised vote keeps the raw vote's order and the cumulative still crosses p once."""
    cfg = CONFIGS["E16"]
    gen = torch.Generator().manual_seed(5)
    probs = torch.sigmoid(torch.randn(2, 64, 16, generator=gen))
    bias = torch.full((16,), -0.8)
    bias[[1, 6, 11]] = 0.0  # three positive experts; each token's other top-k slot is biased ≤ 0.2
    router = make_router(cfg, bias)
    valid = torch.ones(2, 64, dtype=torch.bool)
    ref_indices, ref_gates, cores, _ = reference_block_routing(probs, bias, valid, cfg)
    biased = probs + bias
    votes = router.votes(biased.reshape(2, 2, BLOCK, 16), valid.reshape(2, 2, BLOCK))
    assert bool((votes < 0).any()) and bool((votes.sum(-1) > 0).all()), "the case must hold negative votes"
    assert as_sets(core_sets_of(router, probs)) == cores
    assert_same_routing(route(router, probs), ref_indices, ref_gates)


def test_negative_bias_negative_total_vote():
    """§7.2 (c), the degenerate case: every biased score is < 0, so every vote is ≤ 0 and the total negative.
    dMoE's ``votes / (sum + 1e-20)`` flips every sign: its core set is the top-p of |vote| (the experts the block
    votes for most), then routing inside it is as usual."""
    cfg = CONFIGS["E16"]
    gen = torch.Generator().manual_seed(6)
    probs = torch.sigmoid(torch.randn(1, 32, 16, generator=gen) + 2 * torch.randn(1, 1, 16, generator=gen))
    bias = torch.full((16,), -1.0)
    router = make_router(cfg, bias)
    valid = torch.ones(1, 32, dtype=torch.bool)
    ref_indices, ref_gates, cores, _ = reference_block_routing(probs, bias, valid, cfg)
    assert bool((router.votes((probs + bias).reshape(1, 1, BLOCK, 16), valid.reshape(1, 1, BLOCK)) <= 0).all())
    assert as_sets(core_sets_of(router, probs)) == cores
    assert_same_routing(route(router, probs), ref_indices, ref_gates)


def test_guard_fills_zero_vote_experts_by_lower_id():
    """When fewer than guard_size experts get any vote (every token of the block votes the same k experts), the
    guard takes zero-vote experts; dMoE's ``torch.topk`` picks them in a backend-defined order (on CPU not the
    lowest ids), the project by the lower id (stable sort, its documented convention), as the reference does."""
    cfg = CONFIGS["E32"]
    probs = torch.full((1, BLOCK, 32), 0.1)
    probs[..., [3, 17, 20, 30]] = torch.linspace(0.9, 0.6, 4)
    bias = torch.zeros(32)
    router = make_router(cfg, bias)
    ref_indices, ref_gates, cores, guarded = reference_block_routing(probs, bias, torch.ones(1, BLOCK, dtype=bool),
                                                                     cfg)
    assert cores == [[0, 1, 3, 17, 20, 30]] and guarded == [True]
    assert as_sets(core_sets_of(router, probs)) == cores


# -------------------------------------------------------------------------------- block alignment (spec §7.3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunks_start_at_position_zero_and_route_independently(name):
    """dMoE HEAD cuts a forward into 32-token chunks from its first position, each with its own core set. With
    block_start=0: changing tokens 32..63 changes nothing in chunk 1 (core set, experts, gates) and does change
    chunk 2; changing token 31 changes chunk 1's vote only; so the boundary is exactly position 32."""
    cfg = CONFIGS[name]
    probs, bias = random_case(7, 1, 64, cfg["experts"], peaked=True)
    router = make_router(cfg, bias)
    base, base_core = route(router, probs), as_sets(core_sets_of(router, probs))
    other, _ = random_case(8, 1, 64, cfg["experts"], peaked=True)
    late = probs.clone()
    late[:, 32:] = other[:, 32:]
    changed, changed_core = route(router, late), as_sets(core_sets_of(router, late))
    assert changed_core[0] == base_core[0] and changed_core[1] != base_core[1]
    assert torch.equal(changed.indices[:32], base.indices[:32]) and torch.equal(changed.gates[:32], base.gates[:32])
    assert not torch.equal(changed.indices[32:], base.indices[32:])
    # Token 31 is the last of chunk 1: replacing it (by a token that votes elsewhere) moves chunk 1's vote only.
    edge = probs.clone()
    edge[:, 31] = probs[:, 31].flip(-1)
    moved = route(router, edge)
    assert torch.equal(moved.indices[32:], base.indices[32:]) and torch.equal(moved.gates[32:], base.gates[32:])
    for start in (0, 32):
        ref_indices, ref_gates, _, _ = reference_block_routing(late[:, start:start + 32], bias,
                                                               torch.ones(1, 32, dtype=torch.bool), cfg)
        assert torch.equal(changed.indices[start:start + 32], ref_indices)
