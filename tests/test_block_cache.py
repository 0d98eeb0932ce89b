"""The block-wise key/value cache (--cache prefix|dual). A cached step right after a refresh computes exactly
(fp64) what the full forward computes at its columns, for every router (expert choice by the refresh's cut-offs),
padded batches and row subsets included; refreshed every step, generation equals no cache; under LLaDA2.0's block-causal
attention the cache is exact, so generation equals no cache outright; the routing statistics count only the
columns a step computed."""

from __future__ import annotations

import pytest
import torch

from retrofit.eval.padding import RowLayout, forward_rows, lay_out
from retrofit.eval.samplers import make_sampler
from retrofit.models import FAMILIES
from retrofit.models.kv_cache import BlockCache
from tests.test_batched_generation import PROMPT_LENGTHS, ROUTERS, _generators, _model, _prompts

EXACT_ROUTERS = ("tc", "block")  # choose per token, or per routing block aligned with the span
# Expert choice is exact right after a refresh too (each expert takes the span's tokens by the cut-off it chose the
# whole sequence by), and an approximation once tokens change: the whole sequence's choice would move.
AT_REFRESH = {**ROUTERS, "ec-per-batch": {"type": "ec", "per_batch": True},
              "ec-topk-then-softmax": {"type": "ec", "ec_order": "topk-then-softmax"}}
# Spans that are whole routing blocks (block_length 4, blocks from column 10) but start at a column that is no
# multiple of 4: the block router must cut the span's blocks where the whole sequence's fall. (A span that cuts
# a routing block changes its vote: the cache is exact for block routing only when the denoising block is whole
# routing blocks, as the samplers run it.)
SPANS = {"dual": slice(6, 10), "prefix": slice(6, None)}


def _batch(model):
    """Four prompts left-padded by whole blocks into one batch, some masks at the end of each row."""
    prompts = _prompts(model)
    pads = [4 * (3 - -(-n // 4)) for n in PROMPT_LENGTHS]
    ids = lay_out([p + [model.config.mask_token_id] * 4 for p in prompts], pads, 16, model.config.mask_token_id,
                  "cpu")
    return ids, RowLayout(tuple(pads))


@pytest.mark.parametrize("router", sorted(AT_REFRESH))
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", sorted(SPANS))
def test_a_cached_step_after_a_refresh_equals_the_full_forward(family, router, kind):
    model = _model(family, AT_REFRESH[router], sharp=True)
    blocks = 4 if family == "llada2" else None
    ids, layout = _batch(model)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 10:] = True
    cache = BlockCache()
    with torch.no_grad():
        full = forward_rows(model, ids, layout, maskable=maskable, attention_blocks=blocks, block_start=10,
                            kv_cache=cache)
        span = SPANS[kind]
        rows = [0, 2, 3]  # a row subset too, as when a row has finished its block
        step = forward_rows(model, ids, layout, rows, maskable=maskable, attention_blocks=blocks, block_start=10,
                            kv_cache=cache, compute=span)
    torch.testing.assert_close(step, full[rows, span], rtol=0, atol=1e-10)


@pytest.mark.parametrize("router", EXACT_ROUTERS)
def test_under_block_causal_attention_a_changed_block_reads_only_fresh_keys(router):
    """LLaDA2.0: tokens of the current (last) block change after the refresh; the earlier blocks never see them,
    so a cached step equals a full forward of the changed sequence."""
    model = _model("llada2", ROUTERS[router], sharp=True)
    ids, layout = _batch(model)
    cache = BlockCache()
    with torch.no_grad():
        forward_rows(model, ids, layout, attention_blocks=4, kv_cache=cache)
        ids[:, 12:14] = torch.tensor([5, 6])
        exact = forward_rows(model, ids, layout, attention_blocks=4)[:, 12:]
        cached = forward_rows(model, ids, layout, attention_blocks=4, kv_cache=cache, compute=slice(12, 16))
    torch.testing.assert_close(cached, exact, rtol=0, atol=1e-10)


def test_the_cache_is_stale_for_a_bidirectional_model_once_tokens_change():
    """What the approximation is: after a token changes, the cached keys outside the span are the old ones."""
    model = _model("llada-moe", ROUTERS["tc"], sharp=True)
    ids, layout = _batch(model)
    cache = BlockCache()
    with torch.no_grad():
        forward_rows(model, ids, layout, kv_cache=cache)
        ids[:, 13] = 5  # a later column changes; the dual step still attends to its old keys
        exact = forward_rows(model, ids, layout)[:, 8:12]
        cached = forward_rows(model, ids, layout, kv_cache=cache, compute=slice(8, 12))
    assert not torch.allclose(cached, exact, atol=1e-6)


def _generate(model, family: str, cache: str, prompts, **options):
    base = {"llada-moe": {"gen_length": 8, "steps": 8, "denoise_block": 4},
            "llada2": {"gen_length": 8, "steps": 8, "denoise_block": 4, "threshold": 0.5}}[family]
    sampler = make_sampler(FAMILIES[family].sampler, {**base, "cache": cache, **options})
    mask, eos = model.config.mask_token_id, model.config.eos_token_id
    return sampler.generate(model, prompts, mask, eos, _generators(len(prompts)))


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refreshed_every_step_the_cache_generates_what_no_cache_does(family, router, cache):
    model = _model(family, ROUTERS[router], sharp=True)
    prompts = _prompts(model)
    assert torch.equal(_generate(model, family, cache, prompts, cache_refresh=1),
                       _generate(model, family, "none", prompts))


@pytest.mark.parametrize("router", EXACT_ROUTERS)
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_llada2_block_causal_cache_is_exact(router, threshold):
    """Finished blocks never attend to later ones: their cached keys are what a full window computes."""
    model = _model("llada2", ROUTERS[router], sharp=True)
    prompts = _prompts(model)
    assert torch.equal(_generate(model, "llada2", "dual", prompts, threshold=threshold),
                       _generate(model, "llada2", "none", prompts, threshold=threshold))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_statistics_count_the_columns_a_step_computed(cache):
    """One prompt of 3, gen 8 in blocks of 4, 4 steps per block: each block is a refresh over the whole sequence
    (11 columns) and 3 cached steps over the block (dual: 4 columns) or the block and what follows (prefix)."""
    model = _model("llada-moe", ROUTERS["tc"])
    model.enable_routing_stats(block_length=4)
    _generate(model, "llada-moe", cache, _prompts(model)[:1], steps=8)
    layers = len(model.moe_blocks())
    per_block = {"dual": [4, 4], "prefix": [8, 4]}[cache]  # columns a cached step computes, block by block
    assert model.routing_stats().as_dict()["tokens"] == layers * sum(11 + 3 * n for n in per_block)


def test_cache_refresh_without_a_cache_is_refused_in_one_line():
    from retrofit.errors import RetrofitError

    for kind in ("llada", "llada2"):
        with pytest.raises(RetrofitError, match="--cache-refresh 2 has no effect without a cache; add --cache dual"):
            make_sampler(kind, {"cache_refresh": 2})
