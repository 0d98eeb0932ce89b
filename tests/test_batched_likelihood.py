"""Likelihood requests share forwards: Monte-Carlo samples, greedy checks and one-token rows of several requests,
padded into one batch. In fp64 every score equals what each request gets alone, row by row in unpadded forwards
(a slow loop written here), for any batch size; both families, every router; the routing statistics count what
the rows alone count."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from retrofit.eval.adapter import RetrofitLM
from retrofit.eval.likelihood import mc_rows
from retrofit.models import FAMILIES
from tests.helpers import Request, tiny_snapshot

ROUTERS = {"tc": {}, "ec": {"router": "ec"}, "block": {"router": "block", "block_length": 4, "guard_size": 4},
           "ec-scheduled": {"router": "ec", "schedule": "linear", "k_min": 1, "k_max": 3}}
REQUESTS = [("Question: 2+2\nAnswer:", " four"), ("x", " yz"), ("Hell", "o"), ("Hell", "!"),
            ("A longer context, so that rows need padding:", " and a longer continuation too"), ("", " empty context")]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def snapshot(request, tmp_path_factory):
    return tiny_snapshot(tmp_path_factory.mktemp("lik") / "tiny", seed=3, family=FAMILIES[request.param])


def _lm(snapshot, router: str, batch_size: int) -> RetrofitLM:
    lm = RetrofitLM(str(snapshot), mc_num=12, batch_size=batch_size, progress=False, **ROUTERS[router])
    lm.model = lm.model.double()
    lm.model.enable_routing_stats(block_length=4)
    return lm


def _alone(lm: RetrofitLM, context: str, continuation: str) -> tuple[float, bool]:
    """One request, each of its rows in its own unpadded forward: the reference the batched scorer must equal."""
    ctx, cont = lm.encode_pair(context, continuation)
    model, mask = lm.model, lm.mask_id

    def logits(shown):
        ids = torch.tensor([ctx + shown])
        region = torch.zeros_like(ids, dtype=torch.bool)
        region[:, len(ctx):] = True
        with torch.no_grad():
            return model(input_ids=ids, maskable=region, block_start=len(ctx)).logits[0, len(ctx):]

    if len(cont) == 1 and ctx:
        logprobs = F.log_softmax(logits([mask])[-1], -1)
        return float(logprobs[cont[0]]), cont[0] == int(logprobs.argmax())
    total = 0.0
    for row in mc_rows(ctx, cont, mask, lm.mc_num, lm.seed):
        masked = [i for i, t in enumerate(row.shown) if t == mask]
        logprobs = F.log_softmax(logits(row.shown), -1)
        total += len(cont) / len(masked) * -sum(float(logprobs[i, cont[i]]) for i in masked)
    greedy = bool((logits([mask] * len(cont)).argmax(-1) == torch.tensor(cont)).all())
    return -total / lm.mc_num, greedy


def _counts(lm: RetrofitLM) -> dict:
    d = lm.model.routing_stats().as_dict()
    return {k: d[k] for k in ("tokens", "tokens_per_expert", "experts_per_token_histogram", "unique_experts_per_block")}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_batched_scores_equal_each_request_alone(snapshot, router):
    lm = _lm(snapshot, router, batch_size=5)  # forwards mix the rows of several requests
    batched = lm.loglikelihood([Request(*r) for r in REQUESTS])
    stats = _counts(lm)
    lm.model.enable_routing_stats(block_length=4)
    for n, ((score, greedy), request) in enumerate(zip(batched, REQUESTS)):
        shares_a_row = request[0] in [r[0] for r in REQUESTS[:n]] and len(lm.encode_pair(*request)[1]) == 1
        with lm.model.routing_stats_paused() if shares_a_row else contextlib.nullcontext():  # counted once
            expected, expected_greedy = _alone(lm, *request)
        assert score == pytest.approx(expected, rel=1e-12, abs=1e-12) and greedy == expected_greedy, request
    assert stats == _counts(lm)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_scores_do_not_depend_on_the_batch_size(snapshot, batch_size):
    reference = _lm(snapshot, "ec", batch_size=8).loglikelihood([Request(*r) for r in REQUESTS])
    scores = _lm(snapshot, "ec", batch_size=batch_size).loglikelihood([Request(*r) for r in REQUESTS])
    for (a, greedy_a), (b, greedy_b) in zip(scores, reference):
        assert a == pytest.approx(b, rel=1e-12) and greedy_a == greedy_b


def test_forwards_are_shared_between_requests(snapshot):
    """Four multi-token requests of 12 samples and a greedy row each, 52 rows: 7 forwards of 8, not 4 · 2."""
    lm = _lm(snapshot, "tc", batch_size=8)
    calls = []
    lm.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    lm.loglikelihood([Request("ab", " cd"), Request("abc", " d e"), Request("a", " bcd"), Request("b", " cc")])
    assert calls == [8] * 6 + [4]
