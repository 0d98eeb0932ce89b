"""Prompts of unequal lengths generate as one left-padded batch, and each row gives exactly (fp64) what it gives
alone: both families, every router, greedy and sampled draws; the routing statistics count what the rows alone
would count. The LLaDA sampler's threshold (parallel) decoding: Fast-dLLM's rule against a slow loop, and
without a threshold the schedule's output is unchanged."""

from __future__ import annotations

import pytest
import torch

from retrofit.eval.samplers import make_sampler
from retrofit.models import FAMILIES
from retrofit.routers import router_settings
from retrofit.tiny import build_tiny_model

PROMPT_LENGTHS = (3, 11, 6, 1)
ROUTERS = {"tc": {"type": "tc"}, "ec": {"type": "ec"}, "block": {"type": "block", "block_length": 4, "guard_size": 4},
           "ec-scheduled": {"type": "ec", "schedule": {"name": "linear", "k_min": 1, "k_max": 3}}}
FAMILY_OPTIONS = {  # each family's own sampler; small blocks so that prompts end inside, before and across them
    "llada-moe": {"gen_length": 8, "steps": 8, "denoise_block": 4},
    "llada2": {"gen_length": 8, "steps": 8, "denoise_block": 4, "threshold": 0.5},
}


def _model(family: str, router: dict, sharp: bool = False):
    """The tiny random model in fp64; ``sharp``: attention weights scaled up, so that attention (hence every
    output) depends strongly on which keys are visible, and a padding mistake shows in tokens."""
    model = build_tiny_model(seed=3, router=router_settings(router), family=FAMILIES[family]).double()
    if sharp:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "query_key_value.weight", "lm_head.weight")):
                    p.mul_(6)
    return model


def _prompts(model, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.mask_token_id  # ids below the mask token: ordinary tokens
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _generators(count: int, seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def _counts(stats) -> dict:
    """The statistics a row alone contributes the same of (per-forward totals are per batch by nature)."""
    d = stats.as_dict()
    keep = ("tokens", "tokens_per_expert", "experts_per_token_histogram", "unique_experts_per_block",
            "unique_experts_current_block", "tokens_with_zero_experts")
    return {k: d[k] for k in keep}


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_each_row_of_a_padded_batch_generates_what_it_generates_alone(family, router, temperature):
    model = _model(family, ROUTERS[router], sharp=True)
    config = model.config
    sampler = make_sampler(FAMILIES[family].sampler, {**FAMILY_OPTIONS[family], "temperature": temperature})
    prompts = _prompts(model)
    model.enable_routing_stats(block_length=4)
    together = sampler.generate(model, prompts, config.mask_token_id, config.eos_token_id, _generators(len(prompts)))
    batched_stats = _counts(model.routing_stats())
    model.enable_routing_stats(block_length=4)
    alone = torch.cat([sampler.generate(model, [p], config.mask_token_id, config.eos_token_id, [g])
                       for p, g in zip(prompts, _generators(len(prompts)))])
    assert together.shape == (len(prompts), sampler.gen_length)
    assert torch.equal(together, alone)
    assert batched_stats == _counts(model.routing_stats())


@pytest.mark.parametrize("sampler_name", ["llada2", "llada2.1"])
def test_rows_of_a_padded_batch_stop_early_as_they_do_alone(sampler_name):
    """The eos early stop, decided on the device for all rows at once: with an eos the random model often writes
    (its most frequent token in a first run), rows of unequal prompts stop at different steps or not at all, each as
    it does alone."""
    model = _model("llada2", ROUTERS["tc"], sharp=True)
    mask, prompts = model.config.mask_token_id, _prompts(model)
    options = {"gen_length": 12, "denoise_block": 4, "threshold": 0.5, "temperature": 0.0}
    first = make_sampler(sampler_name, options).generate(model, prompts, mask, model.config.eos_token_id,
                                                         _generators(len(prompts)))
    eos = int(first.flatten().mode().values)
    sampler = make_sampler(sampler_name, {**options, "early_stop": True})
    together = sampler.generate(model, prompts, mask, eos, _generators(len(prompts)))
    alone = torch.cat([sampler.generate(model, [p], mask, eos, [g]) for p, g in zip(prompts, _generators(len(prompts)))])
    assert torch.equal(together, alone)
    stops = [bool((row == eos).any()) for row in together]
    assert any(stops) and not all(stops), "some rows stop early, others run to the end"


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_padding_is_invisible_to_the_logits(family):
    """The forward itself (fp64): a left-padded row's logits at its own positions equal its unpadded forward's,
    with positions counted from its first token; block-causal attention (LLaDA2.0's sampling) included."""
    model = _model(family, ROUTERS["block"])
    from retrofit.eval.padding import RowLayout, forward_rows, lay_out

    prompts = _prompts(model)
    blocks = 4 if family == "llada2" else None
    # Whole blocks of padding: routing blocks (and LLaDA2.0's attention blocks) count from column 0 here, and
    # from each row's first token alone (the samplers align them at the prompt's end instead).
    pads = [4 * (3 - -(-n // 4)) for n in PROMPT_LENGTHS]
    width = max(p + n for p, n in zip(pads, PROMPT_LENGTHS))
    ids = lay_out(prompts, pads, width, model.config.mask_token_id, "cpu")
    layout = RowLayout(tuple(pads), tuple(p + n for p, n in zip(pads, PROMPT_LENGTHS)))
    with torch.no_grad():
        logits = forward_rows(model, ids, layout, attention_blocks=blocks)
        for row, (prompt, pad) in enumerate(zip(prompts, pads)):
            alone = model(input_ids=torch.tensor([prompt]), attention_blocks=blocks).logits[0]
            torch.testing.assert_close(logits[row, pad:pad + len(prompt)], alone, rtol=0, atol=1e-10)


# --- threshold decoding (the LLaDA sampler) -------------------------------------------------------------------


def _loop_threshold_generate(model, prompt: list[int], mask_id: int, gen_length: int, block: int,
                             threshold: float) -> list[int]:
    """Fast-dLLM's ``generate`` with a threshold (llada/generate.py, get_transfer_index), one prompt, greedy, as
    a slow loop: every step ranks the block's masked positions by confidence, keeps the first and every later one
    at least ``threshold`` confident, until the block has no mask left."""
    x = prompt + [mask_id] * gen_length
    for lo in range(len(prompt), len(x), block):
        while mask_id in x[lo:lo + block]:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([x])).logits[0]
            probs = torch.softmax(logits.float(), -1)
            ranked = sorted((float(probs[i].max()), -i, i) for i in range(lo, lo + block) if x[i] == mask_id)[::-1]
            for rank, (confidence, _, i) in enumerate(ranked):
                if rank == 0 or confidence >= threshold:
                    x[i] = int(logits[i].argmax())
    return x[len(prompt):]


@pytest.mark.parametrize("router", ["tc", "ec"])
# The random tiny model's confidences are near 1/vocab (0.0045-0.0055): these thresholds take some, most, none.
@pytest.mark.parametrize("threshold", [0.0044, 0.0046, 0.0048, 1.0])
def test_threshold_decoding_matches_a_slow_loop_of_fast_dllm(router, threshold):
    model = _model("llada-moe", ROUTERS[router])
    mask = model.config.mask_token_id
    sampler = make_sampler("llada", {"gen_length": 8, "denoise_block": 4, "threshold": threshold})
    prompts = _prompts(model)
    out = sampler.generate(model, prompts, mask, model.config.eos_token_id, _generators(len(prompts)))
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == _loop_threshold_generate(model, prompt, mask, 8, 4, threshold)


def test_threshold_decoding_takes_fewer_steps_and_one_at_a_time_at_threshold_one():
    model = _model("llada-moe", ROUTERS["tc"])
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    prompts = _prompts(model)[:1]
    mask, eos = model.config.mask_token_id, model.config.eos_token_id
    make_sampler("llada", {"gen_length": 8, "denoise_block": 4, "threshold": 1.0}).generate(model, prompts, mask, eos)
    assert len(calls) == 8  # nothing is that confident: one position per step
    calls.clear()
    make_sampler("llada", {"gen_length": 8, "denoise_block": 4, "threshold": 0.0044}).generate(model, prompts, mask, eos)
    assert len(calls) == 2  # everything is that confident: one step per block
    calls.clear()
    make_sampler("llada", {"gen_length": 8, "denoise_block": 4, "threshold": 0.0046}).generate(model, prompts, mask, eos)
    assert 2 < len(calls) < 8


def test_no_threshold_keeps_the_schedule_exactly():
    """Without --threshold the LLaDA sampler is LLaDA's: the schedule's share per step, the same tokens as the
    sampler's own generate() on an unpadded batch (which the parity tests in test_eval hold to the reference)."""
    from retrofit.eval.sampler_llada import GenerateArgs, generate

    model = _model("llada-moe", ROUTERS["ec"])
    mask = model.config.mask_token_id
    prompts = [p[:1] for p in _prompts(model)]  # equal lengths: no padding
    sampler = make_sampler("llada", {"gen_length": 8, "steps": 4, "denoise_block": 4})
    out = sampler.generate(model, prompts, mask, model.config.eos_token_id)
    args = GenerateArgs(gen_length=8, steps=4, denoise_block=4)
    assert torch.equal(out, generate(model, torch.tensor(prompts), mask, args)[:, 1:])


def test_threshold_with_steps_is_refused_in_one_line():
    from retrofit.errors import RetrofitError

    with pytest.raises(RetrofitError, match="--steps 8 has no effect with --threshold on the LLaDA sampler"):
        make_sampler("llada", {"steps": 8, "threshold": 0.9})


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_the_adapter_answers_with_the_generated_tokens(family, tmp_path):
    """The text lm-eval gets is the decoded generation after the prompt, for every family's sampler (LLaDA2.0's
    answers once lost as many tokens as the prompt had); prompts of several lengths in one batch."""
    from retrofit.eval.adapter import RetrofitLM
    from retrofit.eval.likelihood import request_seed
    from tests.helpers import Request, tiny_snapshot

    snapshot = tiny_snapshot(tmp_path / "m", seed=3, family=FAMILIES[family])
    lm = RetrofitLM(str(snapshot), batch_size=4, progress=False, **FAMILY_OPTIONS[family])
    texts = ["Question: what is two and two?", "Hi", "A somewhat longer prompt, longer than a block"]
    answers = lm.generate_until([Request(t, {"until": []}) for t in texts])
    for text, answer in zip(texts, answers):
        prompt = lm.tokenizer(text)["input_ids"]
        alone = lm.sampler.generate(lm.model, [prompt], lm.mask_id, lm.eos_id,
                                    [torch.Generator().manual_seed(request_seed(lm.seed, prompt))])
        assert answer == lm.tokenizer.decode(alone[0].tolist(), skip_special_tokens=True)
    assert any(answers)
