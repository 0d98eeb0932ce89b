"""The LLaDA2.0 block-diffusion sampler against small stub models: block layout, the threshold rule, both samplings
at temperature 0, the eos stops, batches, settings checks, and parity with a plain loop written from spec §5.2."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.eval.sampler_llada2 import (LLaDA2GenerateArgs, choose_transfers, generate, sample_tokens,
                                          transfer_schedule)

VOCAB, MASK, EOS = 16, 15, 2
NEVER = 999  # an eos id no stub ever predicts: generation runs to gen_length


class ContextStub(nn.Module):
    """Deterministic random logits that depend on every token the block-causal mask lets a position see: the mean
    embedding of blocks 0..b, plus a per-position term. Records each call's window and ``attention_blocks``."""

    def __init__(self, seed: int = 0, scale: float = 1.5, dim: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("embed", torch.randn(VOCAB, dim, generator=g))
        self.register_buffer("place", torch.randn(256, dim, generator=g))
        self.register_buffer("head", torch.randn(dim, VOCAB, generator=g) * scale)
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, input_ids, attention_blocks, logits_to_keep, maskable=None, attention_mask=None, position_ids=None):
        self.calls.append((input_ids.shape[1], attention_blocks, input_ids.clone()))
        length = input_ids.shape[1]
        block_of = torch.arange(length) // attention_blocks
        visible = (block_of.unsqueeze(0) <= block_of.unsqueeze(1)).float()
        context = visible @ self.embed[input_ids] / visible.sum(1, keepdim=True)
        logits = torch.tanh(context + self.place[:length]) @ self.head
        logits[..., MASK] = float("-inf")  # the mask token is never predicted, so every block fills
        return SimpleNamespace(logits=logits[:, logits_to_keep])


class FixedStub(nn.Module):
    """The same logits at every call: position j of the kept block predicts ``tokens[j]`` with probability
    ``confidence[j]``, the rest spread evenly over the other non-mask tokens."""

    def __init__(self, tokens: list[int], confidence: list[float]):
        super().__init__()
        rest = torch.tensor([(1 - c) / (VOCAB - 2) for c in confidence]).unsqueeze(1)
        probs = rest.repeat(1, VOCAB)
        probs[torch.arange(len(tokens)), torch.tensor(tokens)] = torch.tensor(confidence)
        probs[:, MASK] = 0
        self.register_buffer("logits", probs.log())
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, input_ids, attention_blocks, logits_to_keep, maskable=None, attention_mask=None, position_ids=None):
        self.calls.append((input_ids.shape[1], attention_blocks, input_ids.clone()))
        return SimpleNamespace(logits=self.logits.unsqueeze(0).repeat(input_ids.shape[0], 1, 1))


def settings(**kw) -> LLaDA2GenerateArgs:
    return LLaDA2GenerateArgs(**{"gen_length": 8, "denoise_block": 4, "steps": 4, **kw})


def cut(row: torch.Tensor, eos_id: int = EOS) -> torch.Tensor:
    """A generated row as the reference returns it: up to and including the first eos."""
    found = (row == eos_id).nonzero()
    return row if not len(found) else row[:int(found[0, 0]) + 1]


# --- schedule and layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block,steps,expected", [(32, 32, [1] * 32), (10, 4, [3, 3, 2, 2]), (4, 6, [1, 1, 1, 1, 0, 0]),
                                                  (8, 2, [4, 4]), (5, 1, [5])])
def test_transfer_schedule(block, steps, expected):
    assert transfer_schedule(block, steps).tolist() == expected


def test_blocks_count_from_position_zero():
    # Prompt 5, block 4: positions 4..7 form block 1, holding the prompt's last token and 3 masks. It is the first
    # block denoised; with one token a step it takes 3 calls, then block 2 (4 masks) takes 4.
    model = ContextStub()
    prompt = torch.tensor([[3, 4, 5, 6, 7]])
    out = generate(model, prompt, MASK, NEVER, settings(gen_length=7, threshold=1.0, sampling="greedy"))
    assert out.shape == (1, 7) and not (out == MASK).any()
    assert [(length, blocks) for length, blocks, _ in model.calls] == [(8, 4)] * 3 + [(12, 4)] * 4
    first = model.calls[0][2]
    assert first[0, :5].tolist() == [3, 4, 5, 6, 7] and (first[0, 5:] == MASK).all()


@pytest.mark.parametrize("prompt_length,block,gen_length", [(1, 4, 9), (8, 4, 8), (7, 8, 20), (12, 5, 3)])
def test_every_window_ends_at_a_block_boundary(prompt_length, block, gen_length):
    model = ContextStub()
    prompt = torch.randint(0, MASK, (2, prompt_length), generator=torch.Generator().manual_seed(1))
    s = LLaDA2GenerateArgs(gen_length=gen_length, denoise_block=block, steps=3, threshold=0.9)
    out = generate(model, prompt, MASK, NEVER, s, torch.Generator().manual_seed(0))
    assert out.shape == (2, gen_length) and not (out == MASK).any()
    lengths = [length for length, _, _ in model.calls]
    assert all(length % block == 0 for length in lengths) and {b for _, b, _ in model.calls} == {block}
    assert lengths[0] == (prompt_length // block + 1) * block
    assert lengths[-1] == -(-(prompt_length + gen_length) // block) * block
    # Every call passes the prompt unchanged.
    assert all(torch.equal(ids[:, :prompt_length], prompt) for _, _, ids in model.calls)


# --- the transfer rule -----------------------------------------------------------------------------------------------


def filled_per_call(model, start: int) -> list[list[int]]:
    """Positions of the block at ``start`` that each call saw decoded: the record of what earlier steps wrote."""
    return [(ids[0, start:start + 4] != MASK).nonzero()[:, 0].tolist() for _, _, ids in model.calls]


CONFIDENT = dict(tokens=[3, 4, 5, 6], confidence=[0.99, 0.97, 0.5, 0.3])


def test_threshold_takes_every_confident_position_in_one_step():
    model = FixedStub(**CONFIDENT)
    out = generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, NEVER, settings(gen_length=4, threshold=0.9,
                                                                                sampling="greedy"))
    # Step 0: two above 0.9 ≥ the share of 1, so both. Then the schedule: the most confident left, one a step.
    assert filled_per_call(model, 4) == [[], [0, 1], [0, 1, 2]]
    assert out.tolist() == [[3, 4, 5, 6]]


def test_schedule_fallback_when_too_few_are_confident():
    model = FixedStub(**CONFIDENT)
    generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, NEVER, settings(gen_length=4, threshold=0.999,
                                                                          sampling="greedy"))
    assert filled_per_call(model, 4) == [[], [0], [0, 1], [0, 1, 2]]


def test_share_larger_than_the_confident_count_takes_the_top_share():
    # Steps 2 → shares [2, 2]. Step 0: two confident = share, take them. Step 1: none confident, take the top 2.
    model = FixedStub(**CONFIDENT)
    generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, NEVER, settings(gen_length=4, steps=2, threshold=0.9,
                                                                          sampling="greedy"))
    assert filled_per_call(model, 4) == [[], [0, 1]]
    # One step → share 4 > 2 confident: the top 4, the whole block at once.
    model = FixedStub(**CONFIDENT)
    generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, NEVER, settings(gen_length=4, steps=1, threshold=0.9,
                                                                          sampling="greedy"))
    assert len(model.calls) == 1


def test_threshold_is_strict():
    # Two positions exactly at the threshold are not above it: the share of 1 falls back to the single most confident.
    confidence = torch.tensor([[0.95, 0.95, 0.2, float("-inf")]])
    active = torch.tensor([[True, True, True, False]])
    assert int(choose_transfers(confidence, active, 1, 0.95).sum()) == 1
    assert choose_transfers(confidence, active, 1, 0.9).tolist() == [[True, True, False, False]]
    # A share larger than the masks left takes them all, never a finished position.
    assert choose_transfers(confidence, active, 4, 0.99).tolist() == [[True, True, True, False]]


def test_minimal_topk_caps_the_steps():
    # gen_length 8 // minimal_topk 4 = 2 steps per block: shares [2, 2], two calls a block.
    model = FixedStub(tokens=[3] * 4, confidence=[0.6] * 4)
    generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, NEVER, settings(minimal_topk=4, sampling="greedy"))
    assert len(model.calls) == 4


# --- sampling at temperature 0 ---------------------------------------------------------------------------------------


def flat_logits() -> torch.Tensor:
    return torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(3)) * 0.5


def test_greedy_is_the_argmax_with_its_probability():
    logits = flat_logits()
    token, prob = sample_tokens(logits, LLaDA2GenerateArgs(sampling="greedy"), torch.Generator().manual_seed(0))
    assert torch.equal(token, logits.argmax(-1))
    assert torch.allclose(prob, logits.softmax(-1).max(-1).values)


def test_reference_draws_from_the_untempered_softmax_at_temperature_0():
    logits = flat_logits()
    zero = LLaDA2GenerateArgs(temperature=0.0)
    token, prob = sample_tokens(logits, zero, torch.Generator().manual_seed(5))
    expected = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert torch.equal(token, expected)
    assert torch.equal(prob, logits.softmax(-1).gather(-1, token.unsqueeze(-1))[:, 0])
    # Temperature 0 and 1 are the same draw: the logits are divided only for other temperatures.
    one, _ = sample_tokens(logits, LLaDA2GenerateArgs(temperature=1.0), torch.Generator().manual_seed(5))
    assert torch.equal(token, one)
    # Over seeds it is not the argmax everywhere: temperature 0 is not greedy in the reference.
    draws = [sample_tokens(logits, zero, torch.Generator().manual_seed(s))[0] for s in range(10)]
    assert any(not torch.equal(d, logits.argmax(-1)) for d in draws)


def test_generate_reference_is_reproducible_and_greedy_is_argmax():
    model = FixedStub(tokens=[3, 4, 5, 6], confidence=[0.4, 0.4, 0.4, 0.4])
    prompt = torch.tensor([[7, 8, 9, 10]])
    greedy = generate(model, prompt, MASK, NEVER, settings(gen_length=4, sampling="greedy"))
    assert greedy.tolist() == [[3, 4, 5, 6]]
    runs = [generate(model, prompt, MASK, NEVER, settings(gen_length=4), torch.Generator().manual_seed(s))
            for s in (11, 11, 12, 13, 14)]
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(run, greedy) for run in runs)


# --- eos -------------------------------------------------------------------------------------------------------------


def test_block_containing_eos_stops_generation():
    # Every block predicts [3, eos, 5, 6]: block 1 gets an eos, so blocks 2 and 3 are never denoised.
    model = FixedStub(tokens=[3, EOS, 5, 6], confidence=[0.99, 0.9, 0.5, 0.4])
    out = generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, EOS, settings(gen_length=12, threshold=0.95,
                                                                              sampling="greedy"))
    assert {length for length, _, _ in model.calls} == {8}
    assert out.tolist() == [[3, EOS] + [EOS] * 10]


def test_eos_early_stop_returns_once_the_prefix_is_decoded():
    # Step 0 writes position 0; step 1 writes the eos with everything before it decoded: stop mid-block.
    model = FixedStub(tokens=[3, EOS, 5, 6], confidence=[0.99, 0.9, 0.5, 0.4])
    s = settings(gen_length=12, threshold=0.95, sampling="greedy", eos_early_stop=True)
    out = generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, EOS, s)
    assert len(model.calls) == 2 and out.tolist() == [[3, EOS] + [EOS] * 10]


def test_eos_early_stop_waits_for_the_step_that_writes_an_eos():
    # The eos comes first, position 0 later: the step that completes the prefix writes no eos, so the block runs to
    # its end and the block-level stop ends generation (the reference checks only on a step that writes an eos).
    model = FixedStub(tokens=[3, EOS, 5, 6], confidence=[0.9, 0.99, 0.5, 0.4])
    s = settings(gen_length=12, threshold=0.95, sampling="greedy", eos_early_stop=True)
    out = generate(model, torch.tensor([[7, 8, 9, 10]]), MASK, EOS, s)
    assert len(model.calls) == 4 and out.tolist() == [[3, EOS] + [EOS] * 10]


def test_eos_in_the_prompt_makes_the_early_stop_answer_empty():
    # The reference finds the prompt's eos first: its decoded check is vacuous and it returns only the prompt.
    model = FixedStub(tokens=[3, EOS, 5, 6], confidence=[0.99, 0.9, 0.5, 0.4])
    s = settings(gen_length=12, threshold=0.95, sampling="greedy", eos_early_stop=True)
    out = generate(model, torch.tensor([[7, EOS, 9, 10]]), MASK, EOS, s)
    assert len(model.calls) == 2 and out.tolist() == [[EOS] * 12]


# --- batches ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("early,answer_lengths", [(False, [14, 4, 9, 4]), (True, [14, 1, 9, 4])])
def test_batch_rows_match_single_runs(early, answer_lengths):
    # Greedy draws no random numbers, so each row of a batch must decode exactly as it does alone, stops included.
    # With eos 7 these prompts stop in different blocks, and one row never stops.
    prompts = torch.randint(0, MASK, (4, 6), generator=torch.Generator().manual_seed(0))
    s = LLaDA2GenerateArgs(gen_length=14, denoise_block=4, steps=3, threshold=0.6, sampling="greedy",
                              eos_early_stop=early)
    model, singles = ContextStub(seed=4), [ContextStub(seed=4) for _ in prompts]
    together = generate(model, prompts, MASK, 7, s)
    alone = torch.cat([generate(single, row.unsqueeze(0), MASK, 7, s) for single, row in zip(singles, prompts)])
    assert torch.equal(together, alone)
    # A stopped row is no longer denoised: each block takes as many calls as its slowest row still running.
    per_row = [Counter(length for length, _, _ in single.calls) for single in singles]
    assert len(model.calls) == sum(max(calls[end] for calls in per_row) for end in set().union(*per_row))
    assert [len(cut(row, 7)) for row in together] == answer_lengths


# --- settings --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,needle", [
    (dict(gen_length=0), "gen_length"), (dict(denoise_block=-1), "denoise_block"), (dict(steps=0), "steps"),
    (dict(minimal_topk=0), "minimal_topk"), (dict(minimal_topk=9), "no denoising steps"),
    (dict(temperature=-0.1), "temperature"), (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.2), "top_p"), (dict(top_k=0), "top_k"),
    (dict(sampling="argmax"), "sampling"),
])
def test_settings_check_rejects_impossible_values(bad, needle):
    with pytest.raises(RetrofitError, match=needle) as caught:
        settings(**bad).check()
    assert "\n" not in str(caught.value)


def test_default_settings_are_the_reference_defaults():
    s = LLaDA2GenerateArgs()
    s.check()
    assert (s.gen_length, s.denoise_block, s.steps, s.temperature, s.threshold) == (2048, 32, 32, 0.0, 0.95)
    assert (s.top_p, s.top_k, s.minimal_topk, s.eos_early_stop, s.sampling) == (None, None, 1, False, "reference")


# --- parity with the spec, written as a plain loop -------------------------------------------------------------------


def spec_filter(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Top-k then top-p, one row at a time."""
    logits = logits.clone()
    for row in logits:
        if top_k is not None:
            row[row < row.sort(descending=True).values[top_k - 1]] = float("-inf")
        if top_p is not None and top_p < 1:
            order = row.argsort(descending=True)
            mass = row[order].softmax(-1).cumsum(-1)
            for i in range(1, len(order)):
                if mass[i - 1] > top_p:
                    row[order[i]] = float("-inf")
    return logits


def spec_generate(model, prompt, mask_id, eos_id, s, generator):
    """Spec §5.2 for one prompt, step by step. Returns the answer as the reference does (cut after the first eos;
    prompt tokens dropped), and which rule each step took."""
    steps = min(s.steps, s.gen_length // s.minimal_topk)
    P, B = prompt.shape[1], s.denoise_block
    blocks = (P + s.gen_length + B - 1) // B
    x = torch.full((blocks * B,), mask_id)
    x[:P] = prompt[0]
    shares = [B // steps + (i < B % steps) for i in range(steps)]
    rules = []
    for b in range(P // B, blocks):
        lo, end = b * B, (b + 1) * B
        for step in range(steps):
            active = x[lo:end] == mask_id
            if not active.any():
                break
            logits = model(input_ids=x[:end].unsqueeze(0).clone(), attention_blocks=B,
                           logits_to_keep=slice(-B, None)).logits[0].float()
            if s.temperature > 0 and s.temperature != 1:
                logits = logits / s.temperature
            probs = spec_filter(logits, s.top_k, s.top_p).softmax(-1)
            if s.sampling == "greedy" and s.temperature == 0:
                x0 = probs.argmax(-1)
            else:
                x0 = torch.multinomial(probs, 1, generator=generator)[:, 0]
            confidence = torch.where(active, probs[torch.arange(B), x0], torch.tensor(float("-inf")))
            high = confidence > s.threshold
            if int(high.sum()) >= shares[step]:
                pick, rule = high, "threshold"
            else:
                pick = torch.zeros(B, dtype=torch.bool)
                pick[confidence.topk(min(shares[step], int(active.sum()))).indices] = True
                rule = "schedule"
            rules.append(rule)
            x[lo:end][pick] = x0[pick]
            if s.eos_early_stop and (x0[pick] == eos_id).any():
                first = int((x[:end] == eos_id).nonzero()[0, 0])
                if (x[P:first] != mask_id).all():
                    return x[:first + 1][P:], rules  # the reference returns the prompt too; drop it
        if (x[P:end] == eos_id).any():
            break
    return cut(x[P:P + s.gen_length], eos_id), rules


PARITY = [
    dict(gen_length=10, denoise_block=4, steps=4, threshold=0.9),
    dict(gen_length=12, denoise_block=4, steps=2, threshold=0.7, eos_early_stop=True),
    dict(gen_length=16, denoise_block=8, steps=3, threshold=0.5, eos_early_stop=True, temperature=0.7, top_k=5),
    dict(gen_length=9, denoise_block=4, steps=8, threshold=0.95, temperature=1.3, top_p=0.8),
    dict(gen_length=11, denoise_block=3, steps=3, threshold=0.6, sampling="greedy", eos_early_stop=True),
    dict(gen_length=6, denoise_block=4, steps=4, minimal_topk=3, threshold=0.8, top_k=3, top_p=0.9),
]


@pytest.mark.parametrize("config", PARITY)
def test_parity_with_the_spec_loop(config):
    s = LLaDA2GenerateArgs(**config)
    rules, stops = set(), 0
    for seed in range(12):
        prompt = torch.randint(0, MASK, (1, 3 + seed % 6), generator=torch.Generator().manual_seed(100 + seed))
        ours_model, spec_model = ContextStub(seed=seed), ContextStub(seed=seed)
        ours = generate(ours_model, prompt, MASK, EOS, s, torch.Generator().manual_seed(seed))
        expected, used = spec_generate(spec_model, prompt, MASK, EOS, s, torch.Generator().manual_seed(seed))
        assert ours.shape == (1, s.gen_length)
        assert torch.equal(ours[0, :len(expected)], expected), (seed, ours, expected)
        assert (ours[0, len(expected):] == EOS).all()
        assert len(ours_model.calls) == len(spec_model.calls)
        rules |= set(used)
        stops += len(expected) < s.gen_length
    # The seeds exercise both transfer rules and the eos stop.
    assert rules == {"threshold", "schedule"} and stops
