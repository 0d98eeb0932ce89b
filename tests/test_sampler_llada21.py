"""The LLaDA2.1 token-editing sampler against a plain loop written from the public ``generate`` of LLaDA2.1's Hub
modeling file (as quoted in the research notes, §2.1): token for token and forward for forward over settings that
make every rule fire; batches of unequal prompts; its relation to LLaDA2.0's sampler with editing off; the
sampler's options; the block cache on a real tiny model."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.eval import sampler_llada2
from retrofit.eval.sampler_base import left_pad
from retrofit.eval.sampler_llada21 import (MODES, LLaDA21GenerateArgs, LLaDA21Sampler, choose_writes, generate,
                                           sample_tokens)
from retrofit.eval.samplers import make_sampler
from tests.test_batched_generation import ROUTERS, _generators, _model, _prompts
from tests.test_sampler_llada2 import EOS, MASK, NEVER, VOCAB, ContextStub, cut

# Every test compares two generations token for token: on one thread, matmuls cannot change their last bits with
# the machine's load (tests/conftest.py), and the small forwards stay fast while other work holds a core.
pytestmark = pytest.mark.usefixtures("one_thread")

# --- the reference, as a plain loop ----------------------------------------------------------------------------------


def ref_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """``_top_k_logits``, verbatim."""
    if k is None or k <= 0:
        return logits
    values, _ = torch.topk(logits, k)
    return torch.where(logits < values[..., -1, None], torch.full_like(logits, float("-inf")), logits)


def ref_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """``_top_p_logits``, verbatim."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_mask = cumulative > p
    sorted_mask[..., 1:] = sorted_mask[..., :-1].clone()
    sorted_mask[..., 0] = False
    mask = torch.scatter(torch.full_like(logits, False, dtype=torch.bool), -1, sorted_indices, sorted_mask)
    return logits.masked_fill(mask, float("-inf"))


def ref_sample(logits: torch.Tensor, s: LLaDA21GenerateArgs, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sample_with_temperature_topk_topp`` for the block's ``[B, vocab]`` logits. The reference draws from the
    global RNG; here from ``generator``, one ``multinomial`` over the block's rows, as the sampler's ``draw``
    does for one generator."""
    if s.temperature == 0.0:
        token = torch.argmax(logits, dim=-1, keepdim=True)
        return token[:, 0], torch.gather(F.softmax(logits, dim=-1), -1, token)[:, 0]
    if s.temperature > 0 and s.temperature != 1.0:
        logits = logits / s.temperature
    probs = F.softmax(ref_top_p(ref_top_k(logits, s.top_k), s.top_p), dim=-1)
    token = torch.multinomial(probs, num_samples=1, generator=generator)
    return token[:, 0], torch.gather(probs, -1, token)[:, 0]


def spec_generate(model, prompt: torch.Tensor, mask_id: int, eos_id: int, s: LLaDA21GenerateArgs,
                  generator=None) -> tuple[torch.Tensor, set[str]]:
    """The reference ``generate`` for one prompt ``[1, P]``, step by step, the whole window every step. Returns the
    answer as the reference does (after the prompt, up to and including the first eos within gen_length) and the
    rules that fired: threshold, fallback, edit, settled (a step began with no mask and edited nothing),
    budget (the post steps ran out), early stop (eos_early_stop ended generation before the last block)."""
    P, B = prompt.shape[1], s.denoise_block
    num_blocks = (P + s.gen_length + B - 1) // B
    x = torch.full((num_blocks * B,), mask_id)
    x[:P] = prompt[0]
    fired: set[str] = set()
    for num_block in range(P // B, num_blocks):
        lo, end = num_block * B, (num_block + 1) * B
        post_steps, iterations = 0, 0
        while True:
            old = x[lo:end].clone()
            active = old == mask_id
            if not active.any():
                post_steps += 1
            if post_steps > s.max_post_steps:
                fired.add("budget")
                break
            iterations += 1
            assert iterations <= 2 * (B + s.max_post_steps + 1), "the reference would not end this block"
            logits = model(input_ids=x[:end].unsqueeze(0).clone(), attention_blocks=B,
                           logits_to_keep=slice(lo, end)).logits[0].float()
            x0, p = ref_sample(logits, s, generator)
            fills = torch.zeros(B, dtype=torch.bool)
            if active.any():
                confidence = torch.where(active, p, torch.tensor(float("-inf")))
                high = (confidence > s.threshold) & active
                if int(high.sum()) >= s.num_to_transfer:
                    fills, rule = high, "threshold"
                else:
                    fills[torch.topk(confidence, k=min(s.num_to_transfer, int(active.sum()))).indices] = True
                    rule = "fallback"
                fired.add(rule)
            editable = ~active & ~(torch.arange(lo, end) < P)
            edits = (torch.where(editable, p, torch.tensor(float("-inf"))) > s.editing_threshold) & editable
            edits &= x0 != old
            fired |= {"edit"} if edits.any() else set()
            writes = fills | edits
            x[lo:end][writes] = x0[writes]
            if not active.any() and not edits.any():
                fired.add("settled")
                break
        if s.eos_early_stop:
            generated = x[P:end]
            if not (generated == mask_id).any() and (generated == eos_id).any():
                fired |= {"early stop"} if num_block < num_blocks - 1 else set()
                break
    return cut(x[P:P + s.gen_length], eos_id), fired


def assert_same_answer(ours: torch.Tensor, expected: torch.Tensor, gen_length: int, context=None,
                       eos_id: int = EOS) -> None:
    """``ours`` (``[gen_length]``, eos after the first eos) is the reference's cut answer."""
    assert ours.shape == (gen_length,)
    assert torch.equal(ours[:len(expected)], expected), (context, ours, expected)
    assert (ours[len(expected):] == eos_id).all(), (context, ours, expected)


# --- one step ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 2, 0.5), (0.7, 5, None), (1.0, None, 0.8),
                                                     (1.3, 6, 0.9), (1.0, 0, None)])
def test_sample_tokens_is_the_reference_sampling(temperature, top_k, top_p):
    """Same tokens, probabilities and generator state; at temperature 0 the filters are ignored (the argmax's
    probability is its unfiltered softmax); top_k 0 keeps every token."""
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    s = args(temperature=temperature, top_k=top_k, top_p=top_p)
    ours_g, ref_g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    token, prob = sample_tokens(logits.unsqueeze(0), s, ours_g)
    expected_token, expected_prob = ref_sample(logits, s, ref_g)
    assert torch.equal(token[0], expected_token) and torch.equal(prob[0], expected_prob)
    assert torch.equal(ours_g.get_state(), ref_g.get_state())


def test_choose_writes():
    """Fills above the threshold (strictly), else the most confident; edits only written, non-prompt positions
    whose token changed, strictly above the editing threshold."""
    M = MASK
    old = torch.tensor([[M, M, 5, 6], [9, M, M, 6], [3, 4, 5, 6]])
    candidate = torch.tensor([[3, 4, 5, 7], [8, 4, 4, 6], [3, 4, 5, 7]])
    probability = torch.tensor([[0.9, 0.95, 0.99, 0.6], [0.99, 0.3, 0.2, 0.99], [0.9, 0.9, 0.9, 0.5]])
    editable = torch.tensor([[True] * 4, [False, True, True, True], [True] * 4])  # row 1: position 0 is prompt
    s = args(threshold=0.9, editing_threshold=0.5)
    writes, edits = choose_writes(candidate, probability, old, editable, s, M)
    assert writes.tolist() == [[False, True, False, True], [False, True, False, False], [False] * 4]
    assert edits.any(1).tolist() == [True, False, False]
    # Fewer confident than num_to_transfer: the top num_to_transfer instead, at most the masks left.
    two = args(threshold=0.9, editing_threshold=1.5, num_to_transfer=2)
    writes, _ = choose_writes(candidate[:2], probability[:2], old[:2], editable[:2], two, M)
    assert writes.tolist() == [[True, True, False, False], [False, True, True, False]]
    one_left = torch.tensor([[3, M, 5, 6]])
    writes, _ = choose_writes(candidate[:1], probability[:1], one_left, editable[:1], two, M)
    assert writes.tolist() == [[False, True, False, False]]


# --- parity -----------------------------------------------------------------------------------------------------------

# name: (settings, stub scale, rules that must fire over the seeds, rules that must never fire)
ALWAYS = {"threshold", "fallback"}
PARITY = {
    "speed": (dict(gen_length=12, threshold=0.5, editing_threshold=0.0), 1.5, ALWAYS | {"edit", "settled"}, set()),
    "speed, 3 post steps": (dict(gen_length=10, threshold=0.5, editing_threshold=0.0, max_post_steps=3), 3.0,
                            ALWAYS | {"edit", "settled", "budget"}, set()),
    "quality": (dict(gen_length=10, threshold=0.7, editing_threshold=0.5), 3.0, ALWAYS | {"edit", "settled"},
                set()),
    "reference defaults": (dict(gen_length=14, denoise_block=8), 4.0, ALWAYS | {"edit", "settled"}, set()),
    "no post steps": (dict(gen_length=11, threshold=0.6, editing_threshold=0.3, max_post_steps=0), 3.0,
                      ALWAYS | {"edit", "budget"}, {"settled"}),
    "no edits": (dict(gen_length=12, threshold=0.5, editing_threshold=1.5), 3.0, ALWAYS | {"settled"},
                 {"edit", "budget"}),
    "one fill a step": (dict(gen_length=9, threshold=1.0, editing_threshold=0.4), 3.0,
                        {"fallback", "edit", "settled"}, {"threshold"}),
    "early stop": (dict(gen_length=14, threshold=0.7, editing_threshold=0.5, eos_early_stop=True), 3.0,
                   ALWAYS | {"edit", "early stop"}, set()),
    "early stop, block 8": (dict(gen_length=21, denoise_block=8, threshold=0.5, editing_threshold=0.0,
                                 eos_early_stop=True, max_post_steps=2), 3.0,
                            ALWAYS | {"edit", "budget", "early stop"}, set()),
    "greedy, filters ignored": (dict(gen_length=10, top_k=2, top_p=0.5, threshold=0.7, editing_threshold=0.5), 3.0,
                                ALWAYS | {"edit"}, set()),
    "two a step": (dict(gen_length=13, threshold=0.8, editing_threshold=0.6, num_to_transfer=2), 3.0,
                   ALWAYS | {"edit"}, set()),
    "sampled 0.7, top-k": (dict(gen_length=10, temperature=0.7, top_k=5, threshold=0.7, editing_threshold=0.5), 3.0,
                           ALWAYS | {"edit"}, set()),
    "sampled 1.0, top-p": (dict(gen_length=12, temperature=1.0, top_p=0.8, threshold=0.5, editing_threshold=0.0,
                                max_post_steps=3, eos_early_stop=True), 3.0,
                           ALWAYS | {"edit", "budget", "early stop"}, set()),
    "sampled 1.3, both, block 8": (dict(gen_length=19, denoise_block=8, temperature=1.3, top_k=6, top_p=0.9,
                                        threshold=0.6, editing_threshold=0.4), 3.0, ALWAYS | {"edit"}, set()),
}
SEEDS = range(10)


def args(**kw) -> LLaDA21GenerateArgs:
    return LLaDA21GenerateArgs(**{"denoise_block": 4, **kw})


def prompt_of(seed: int) -> torch.Tensor:
    """Lengths 3..8: some a multiple of the block (4, 8), some not."""
    return torch.randint(0, MASK, (1, 3 + seed % 6), generator=torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_the_reference_loop(name):
    config, scale, must, never = PARITY[name]
    s = args(**config)
    fired = set()
    for seed in SEEDS:
        prompt = prompt_of(seed)
        ours_model, spec_model = ContextStub(seed=seed, scale=scale), ContextStub(seed=seed, scale=scale)
        ours = generate(ours_model, prompt, MASK, EOS, s, torch.Generator().manual_seed(seed))
        expected, rules = spec_generate(spec_model, prompt, MASK, EOS, s, torch.Generator().manual_seed(seed))
        assert_same_answer(ours[0], expected, s.gen_length, seed)
        assert [ids.tolist() for *_, ids in ours_model.calls] == [ids.tolist() for *_, ids in spec_model.calls]
        fired |= rules
    # The seeds exercise what this configuration is for, and nothing it rules out.
    assert must <= fired and not never & fired, fired


# --- batches ----------------------------------------------------------------------------------------------------------


class PaddedStub(ContextStub):
    """:class:`ContextStub` that honours left padding as the real models do: padding columns (``attention_mask``
    False) are hidden from the context and positions come from ``position_ids``. Computed in float64, so that a
    padded row's logits equal its unpadded ones far below what could change a token or a draw."""

    def forward(self, input_ids, attention_blocks, logits_to_keep, maskable=None, attention_mask=None,
                position_ids=None):
        self.calls.append((input_ids.shape[1], attention_blocks, input_ids.clone()))
        batch, length = input_ids.shape
        block_of = torch.arange(length) // attention_blocks
        visible = (block_of.unsqueeze(0) <= block_of.unsqueeze(1)).double().expand(batch, length, length)
        if attention_mask is not None:
            visible = visible * attention_mask.unsqueeze(1).double()
        positions = torch.arange(length).expand(batch, length) if position_ids is None else position_ids
        context = visible @ self.embed.double()[input_ids] / visible.sum(-1, keepdim=True).clamp(min=1)
        logits = torch.tanh(context + self.place.double()[positions]) @ self.head.double()
        logits[..., MASK] = float("-inf")
        return SimpleNamespace(logits=logits[:, logits_to_keep])


BATCH_LENGTHS = (3, 9, 6, 1, 8, 5)  # first denoised blocks at columns 0, 8, 4, 0, 8, 4: rows padded by 0-2 blocks


def batch_prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (n,), generator=g).tolist() for n in BATCH_LENGTHS]


def rounds(model, first: int, block: int) -> Counter:
    """Calls per denoised block (0: the one holding the prompt's end), from the windows a model saw, for a row
    whose first denoised block starts at column ``first``."""
    return Counter((length - first) // block - 1 for length, _, _ in model.calls)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("early", [False, True])
def test_batch_rows_match_single_runs(temperature, early):
    """Left-padded rows with one generator each generate what they generate alone, and a row sits out the forwards
    it does not need: each block takes as many calls as its slowest row."""
    s = args(gen_length=13, threshold=0.6, editing_threshold=0.2, max_post_steps=3, eos_early_stop=early,
             temperature=temperature)
    prompts = batch_prompts()
    ids, lengths = left_pad(prompts, MASK, "cpu")
    model = PaddedStub(seed=5, scale=3.0)
    together = generate(model, ids, MASK, EOS, s, _generators(len(prompts)), lengths=lengths)
    singles, fired = [PaddedStub(seed=5, scale=3.0) for _ in prompts], []
    for row, (prompt, single, g, spec_g) in enumerate(zip(prompts, singles, _generators(len(prompts)),
                                                           _generators(len(prompts)))):
        alone = generate(single, torch.tensor([prompt]), MASK, EOS, s, [g])
        assert torch.equal(together[row], alone[0]), row
        expected, rules = spec_generate(PaddedStub(seed=5, scale=3.0), torch.tensor([prompt]), MASK, EOS, s, spec_g)
        assert_same_answer(alone[0], expected, s.gen_length, row)
        fired.append(rules)
    per_row = [rounds(single, n // 4 * 4, 4) for single, n in zip(singles, BATCH_LENGTHS)]
    batch = rounds(model, max(n // 4 * 4 for n in BATCH_LENGTHS), 4)
    assert batch == Counter({i: max(calls[i] for calls in per_row) for i in set().union(*per_row)})
    # Rows that edit, rows that stop early and rows that do not, together.
    assert any("edit" in rules for rules in fired)
    assert any(len(cut(row)) < s.gen_length for row in together)
    if early:
        assert {"early stop" in rules for rules in fired} == {True, False}


# --- a predicted mask token -------------------------------------------------------------------------------------------


class ScriptStub(nn.Module):
    """Logits from ``rule(block tokens) -> [(token, probability)]`` per position of the kept block, the rest of the
    mass spread over the other tokens. Unlike the other stubs, it may predict the mask token, as a real model's
    vocabulary allows (the reference masks nothing out of the argmax or the draw)."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, input_ids, attention_blocks, logits_to_keep, maskable=None, attention_mask=None,
                position_ids=None):
        self.calls.append((input_ids.shape[1], attention_blocks, input_ids.clone()))
        rows = []
        for block in input_ids[:, logits_to_keep].tolist():
            probs = []
            for token, confidence in self.rule(block):
                p = torch.full((VOCAB,), (1 - confidence) / (VOCAB - 2))
                p[MASK], p[token] = 0.0, confidence
                probs.append(p)
            rows.append(torch.stack(probs))
        return SimpleNamespace(logits=torch.stack(rows).log())


def mask_first(block: list[int]) -> list[tuple[int, float]]:
    """While the block is all masks, position 0 confidently predicts the mask token; then token 3."""
    first = MASK if all(t == MASK for t in block) else 3
    return [(first, 0.99), (4, 0.99), (5, 0.3), (6, 0.3)]


def mask_last_when_full(block: list[int]) -> list[tuple[int, float]]:
    """Once the block holds no mask, position 3 confidently predicts the mask token (an edit back to a mask)."""
    last = (MASK, 0.99) if MASK not in block else (6, 0.3)
    return [(3, 0.99), (4, 0.99), (5, 0.3), last]


@pytest.mark.parametrize("rule", [mask_first, mask_last_when_full])
def test_a_predicted_mask_token_is_decoded_again_as_in_the_reference(rule):
    """The reference counts the block's masks from its tokens at every step: a mask token written by a fill or an
    edit leaves the position masked, and a later step fills it; the answer holds no mask token. (A sampler that
    counts the fills it made instead believes the block unmasked too soon and ends it with a mask left.)"""
    s = args(gen_length=4, threshold=0.9, editing_threshold=0.5, max_post_steps=2)
    prompt = torch.tensor([[7, 8, 9, 10]])
    ours_model, spec_model = ScriptStub(rule), ScriptStub(rule)
    expected, _ = spec_generate(spec_model, prompt, MASK, NEVER, s)
    assert expected.tolist() == [3, 4, 5, 6]
    ours = generate(ours_model, prompt, MASK, NEVER, s)
    assert ours.tolist() == [[3, 4, 5, 6]]
    assert len(ours_model.calls) == len(spec_model.calls)


def test_llada2_recounts_masks_as_its_reference_too():
    """The same rule in LLaDA2.0's sampler: a position given the mask token is decoded again by a later step."""
    from tests.test_sampler_llada2 import spec_generate as spec_generate_20

    s = sampler_llada2.LLaDA2GenerateArgs(gen_length=4, denoise_block=4, steps=4, threshold=0.9, sampling="greedy")
    prompt = torch.tensor([[7, 8, 9, 10]])
    ours_model, spec_model = ScriptStub(mask_first), ScriptStub(mask_first)
    expected, _ = spec_generate_20(spec_model, prompt, MASK, NEVER, s, None)
    assert expected.tolist() == [3, 4, 5, 6]
    assert sampler_llada2.generate(ours_model, prompt, MASK, NEVER, s).tolist() == [[3, 4, 5, 6]]
    assert len(ours_model.calls) == len(spec_model.calls)


# --- editing off: LLaDA2.0's sampler ----------------------------------------------------------------------------------


def windows(model) -> dict[int, list[list[int]]]:
    """The windows a model saw, grouped by length (one group per block)."""
    out: dict[int, list[list[int]]] = {}
    for length, _, ids in model.calls:
        out.setdefault(length, []).append(ids[0].tolist())
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("post_steps", [0, 2])
def test_without_edits_a_block_decodes_as_llada2_with_one_token_a_step(threshold, post_steps):
    """Editing off and one token a step: LLaDA2.0's rule with a schedule share of 1 (steps = block) at temperature 0
    with greedy sampling (argmax; 2.1 takes the argmax of the logits, the same token). 2.0 ends a block when no
    mask is left; 2.1 then spends one more forward, which edits nothing, when it has post steps. 2.0 stops after a
    block that holds an eos, as 2.1's eos_early_stop does (every earlier position is decoded by then)."""
    old = sampler_llada2.LLaDA2GenerateArgs(gen_length=14, denoise_block=4, steps=4, threshold=threshold,
                                            sampling="greedy")
    new = args(gen_length=14, threshold=threshold, editing_threshold=1.5, max_post_steps=post_steps,
               eos_early_stop=True)
    stopped = 0
    for seed in range(8):
        prompt = prompt_of(seed)
        old_model, new_model = ContextStub(seed=seed, scale=3.0), ContextStub(seed=seed, scale=3.0)
        expected = sampler_llada2.generate(old_model, prompt, MASK, EOS, old)
        assert torch.equal(generate(new_model, prompt, MASK, EOS, new), expected), seed
        # Without the early stop 2.1 decodes the later blocks too, but the answer, cut at its eos, is the same.
        later = generate(ContextStub(seed=seed, scale=3.0), prompt, MASK, EOS, replace(new, eos_early_stop=False))
        assert torch.equal(later, expected), seed
        before, after = windows(old_model), windows(new_model)
        assert list(before) == list(after)
        for length in before:
            extra = after[length][len(before[length]):]
            assert after[length][:len(before[length])] == before[length]
            assert len(extra) == min(post_steps, 1) and all(MASK not in w[length - 4:] for w in extra)
        stopped += len(cut(expected[0])) < new.gen_length - 4
    assert stopped  # some seeds stop blocks early on an eos


# --- the sampler's options --------------------------------------------------------------------------------------------


def test_modes_and_overrides():
    assert MODES == {"speed": (0.5, 0.0), "quality": (0.7, 0.5)}
    default = make_sampler("llada2.1")
    assert isinstance(default, LLaDA21Sampler)
    s = default.settings
    assert (s.threshold, s.editing_threshold) == (0.7, 0.5)
    assert (s.max_post_steps, s.num_to_transfer, s.denoise_block, s.eos_early_stop, s.cache) == (16, 1, 32, False,
                                                                                                  "none")
    speed = make_sampler("llada2.1", {"sampler_mode": "speed"}).settings
    assert (speed.threshold, speed.editing_threshold) == (0.5, 0.0)
    both = make_sampler("llada2.1", {"sampler_mode": "speed", "threshold": 0.9, "editing_threshold": 2.0}).settings
    assert (both.threshold, both.editing_threshold) == (0.9, 2.0)
    # One override keeps the mode's other value.
    one = make_sampler("llada2.1", {"sampler_mode": "quality", "editing_threshold": 0.0}).settings
    assert (one.threshold, one.editing_threshold) == (0.7, 0.0)
    given = make_sampler("llada2.1", {"max_post_steps": 3, "early_stop": True, "denoise_block": 8,
                                      "temperature": 0.5}).settings
    assert (given.max_post_steps, given.eos_early_stop, given.denoise_block, given.temperature) == (3, True, 8, 0.5)


def test_steps_are_refused():
    with pytest.raises(RetrofitError, match="--steps 8 has no effect on the LLaDA2.1 sampler") as caught:
        make_sampler("llada2.1", {"steps": 8})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("options,scale", [
    ({"sampler_mode": "speed", "max_post_steps": 2}, 3.0),
    ({"sampler_mode": "quality"}, 3.0),
    ({"threshold": 1.0, "editing_threshold": 0.0, "max_post_steps": 3}, 1.5),
    ({"sampler_mode": "speed", "max_post_steps": 0, "temperature": 1.0}, 1.5),
])
def test_forwards_bound_the_calls_a_generation_takes(options, scale):
    sampler = make_sampler("llada2.1", {"gen_length": 10, "denoise_block": 4, **options})
    bound = sampler.forwards()
    s = sampler.settings
    assert bound.at_most and bound.cached == 0
    assert bound.full == (-(-10 // 4) + 1) * (4 + s.max_post_steps)
    calls = []
    for seed in range(4):
        prompts = batch_prompts(seed)
        for batch in [prompts] + [[prompt] for prompt in prompts]:  # together, and each prompt alone
            model = PaddedStub(seed=seed, scale=scale)
            sampler.generate(model, batch, MASK, NEVER, _generators(len(batch), seed))
            calls.append(len(model.calls))
    assert max(calls) <= bound.full, calls


def test_forwards_with_the_cache():
    """Per block: the refreshes (step 0, every cache_refresh steps) in full, the other steps cached."""
    for refresh, (full, cached) in {0: (1, 5), 2: (3, 3), 4: (2, 4)}.items():
        sampler = make_sampler("llada2.1", {"gen_length": 10, "denoise_block": 4, "max_post_steps": 2,
                                            "cache": "dual", "cache_refresh": refresh})
        bound = sampler.forwards()
        assert (bound.full, bound.cached, bound.at_most) == (4 * full, 4 * cached, True)


# --- the block cache on a real tiny model -----------------------------------------------------------------------------


class Counted:
    """A model wrapper counting full and cached forwards (a cached one computes only a span). It never predicts
    its mask token, as a trained checkpoint practically never does: a step that writes the mask token leaves the
    position masked (the reference decodes it again), the one case the plan's bound does not cover."""

    def __init__(self, model):
        self.model, self.full, self.cached = model, 0, 0

    def __call__(self, **kwargs):
        if kwargs.get("compute") is None:
            self.full += 1
        else:
            self.cached += 1
        out = self.model(**kwargs)
        out.logits[..., self.model.config.mask_token_id] = float("-inf")
        return out


@pytest.mark.parametrize("refresh", [0, 2])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_block_cache_generates_what_no_cache_does(refresh, temperature):
    """Under block-causal attention the finished blocks' keys never change: the dual cache is exact (fp64), for
    a batch of unequal prompts, rows sitting out included."""
    model = _model("llada2", ROUTERS["tc"], sharp=True)
    prompts, mask, eos = _prompts(model), model.config.mask_token_id, model.config.eos_token_id
    options = {"gen_length": 8, "denoise_block": 4, "sampler_mode": "speed", "max_post_steps": 4,
               "temperature": temperature}
    plain = make_sampler("llada2.1", options)
    cached = make_sampler("llada2.1", {**options, "cache": "dual", "cache_refresh": refresh})
    counted = Counted(model)
    expected = plain.generate(Counted(model), prompts, mask, eos, _generators(len(prompts)))
    assert torch.equal(cached.generate(counted, prompts, mask, eos, _generators(len(prompts))), expected)
    bound = cached.forwards()
    assert counted.cached and counted.full <= bound.full and counted.cached <= bound.cached


def test_parity_on_a_real_tiny_model():
    """The sampler against the reference loop on the tiny LLaDA2 model (fp64), speed mode: every changed
    prediction is written back, so the random model edits."""
    model = _model("llada2", ROUTERS["tc"], sharp=True)
    mask, eos = model.config.mask_token_id, model.config.eos_token_id
    s = args(gen_length=8, threshold=0.5, editing_threshold=0.0, max_post_steps=4)
    fired = set()
    for row, prompt in enumerate(_prompts(model)):
        ours = generate(model, torch.tensor([prompt]), mask, eos, s)
        expected, rules = spec_generate(model, torch.tensor([prompt]), mask, eos, s)
        assert_same_answer(ours[0], expected, s.gen_length, row, eos)
        fired |= rules
    assert "edit" in fired
