"""The LLaDA2.0 block-diffusion sampler: the prompt and ``gen_length`` masks are laid out in blocks
counted from position 0, and each block from the one holding the prompt's end is denoised in at most ``steps``
steps. Every step runs the whole window up to the block's end, because the model attends block-causally (§3.4).
A step accepts every masked position whose confidence is above ``threshold``. When fewer than the schedule's share
are that confident, it accepts the share's most confident positions instead.

Batches: the reference decodes one prompt. Here every row picks its own positions. A row stops when its own stop
condition holds: the eos early stop, or an eos in a finished block. The batch stops when every row has stopped.

Written from the public ``generate`` of LLaDA2.0's Hub modeling file (as copied in ZHZisZZ/dllm @ d8cc119,
``dllm/pipelines/llada2/models/modeling_llada2_moe.py``, and in fscdc/dMoE's ``evaluations/models/``); "§" below
names the section of docs/llada2-reference-notes.md (5.1 arguments, 5.2 algorithm, 5.3 sampling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pydantic import Field

from retrofit.errors import RetrofitError
from retrofit.eval.padding import RowLayout, block_logits, lay_out, row_generators, take_rows
from retrofit.eval.sampler_base import (Forwards, Sampler, SamplerSettings, block_forwards, check_cache_options,
                                        left_pad, refreshes)
from retrofit.models.kv_cache import BlockCache


class LLaDA2SamplerSettings(SamplerSettings):
    """``retrofit eval``'s options of the LLaDA2.0 sampler. ``--steps`` counts the whole generation, as for LLaDA's
    sampler, and is spread over the blocks."""

    type: Literal["llada2"] = "llada2"
    threshold: float | None = Field(default=None, gt=0, le=1, description=(
        "accept every position more confident than this at each step (default 0.95)"))
    cache: Literal["none", "prefix", "dual"] = Field(default="none", description=(
        "key/value cache of the finished blocks (exact under block-causal attention): prefix and dual both run "
        "the current block only"))
    cache_refresh: int = Field(default=0, ge=0, description="also refresh the cache every this many steps")
    early_stop: bool = Field(default=False, description=(
        "stop a row once its answer is decoded up to an eos (the reference's eos_early_stop; llada2.1 checks "
        "after each block)"))
    sampling: Literal["reference", "greedy"] | None = Field(default=None, description=(
        "at temperature 0: reference (draw from the softmax, as the published generate() does; the default) or "
        "greedy (argmax)"))


class LLaDA2Sampler(Sampler):
    kind = "llada2"
    display_name = "LLaDA2.0"
    unsupported = {"remasking": "the LLaDA2.0 sampler remasks by confidence only"}
    settings_class = LLaDA2SamplerSettings

    def arguments(self, options: LLaDA2SamplerSettings) -> "LLaDA2GenerateArgs":
        gen_length = options.gen_length
        check_cache_options(options.cache, options.cache_refresh)
        block, steps = options.denoise_block or gen_length, options.steps or gen_length
        chosen = {k: v for k, v in (("threshold", options.threshold), ("sampling", options.sampling)) if v is not None}
        return LLaDA2GenerateArgs(gen_length=gen_length, denoise_block=block, steps=max(1, steps * block // gen_length),
                                  temperature=float(options.temperature), cache=options.cache,
                                  cache_refresh=options.cache_refresh, eos_early_stop=options.early_stop, **chosen)

    def generate(self, model, prompts, mask_id, eos_id, generators=None, device="cpu"):
        ids, lengths = left_pad(prompts, mask_id, device)
        return self.decode(model, ids, mask_id, eos_id, self.settings, generators, lengths=lengths)

    @staticmethod
    def decode(*args, **kwargs) -> torch.Tensor:
        return generate(*args, **kwargs)

    def forwards(self) -> Forwards:
        # Blocks from the one holding the prompt's end: gen_length / block of them, one more when the prompt
        # ends inside a block; each in at most block_steps steps (the threshold, the stops end sooner).
        s = self.settings
        blocks = -(-s.gen_length // s.denoise_block) + 1
        full, cached = block_forwards(s.block_steps, s.cache, s.cache_refresh)
        return Forwards(blocks * full, blocks * cached, at_most=True)


@dataclass(frozen=True)
class BlockDiffusionArgs:
    """The arguments both LLaDA2.x ``generate`` functions take (with the reference defaults), their cache and the
    checks they share."""

    gen_length: int = 2048
    denoise_block: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    threshold: float = 0.95
    eos_early_stop: bool = False
    cache: Literal["none", "prefix", "dual"] = "none"  # prefix and dual: the same here (no suffix in the window)
    cache_refresh: int = 0

    def refreshes(self, step: int) -> bool:
        """Whether step ``step`` of a block (from 0) runs the whole window and records the cache."""
        return refreshes(step, self.cache, self.cache_refresh)

    def check(self) -> None:
        for name in ("gen_length", "denoise_block"):
            if getattr(self, name) < 1:
                raise RetrofitError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.temperature < 0:
            raise RetrofitError(f"temperature ({self.temperature}) must not be negative")
        if not 0 < self.threshold <= 1:
            raise RetrofitError(f"threshold ({self.threshold}) must be in (0, 1]")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RetrofitError(f"top_p ({self.top_p}) must be in (0, 1], or None to keep every token")
        if self.top_k is not None and self.top_k < 1:
            raise RetrofitError(f"top_k ({self.top_k}) must be at least 1, or None to keep every token")


@dataclass(frozen=True)
class LLaDA2GenerateArgs(BlockDiffusionArgs):
    """The reference ``generate`` arguments (spec §5.1). ``sampling="reference"`` keeps the Hub code's quirk (§5.3):
    at temperature 0 it still draws from the untempered softmax. ``"greedy"`` takes the argmax at temperature 0.
    The two agree at any temperature above 0."""
    steps: int = 32
    minimal_topk: int = 1
    sampling: Literal["reference", "greedy"] = "reference"

    def check(self) -> None:
        super().check()
        for name in ("steps", "minimal_topk"):
            if getattr(self, name) < 1:
                raise RetrofitError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.minimal_topk > self.gen_length:
            raise RetrofitError(f"minimal_topk ({self.minimal_topk}) must not exceed gen_length ({self.gen_length}): "
                                "it would leave no denoising steps")
        if self.sampling not in ("reference", "greedy"):
            raise RetrofitError(f"sampling ({self.sampling!r}) must be 'reference' or 'greedy'")

    @property
    def block_steps(self) -> int:
        """Steps per block. The reference caps them so that each step can still unmask ``minimal_topk`` tokens."""
        return min(self.steps, self.gen_length // self.minimal_topk)


def transfer_schedule(block_length: int, steps: int) -> torch.Tensor:
    """How many positions each step must unmask at least: an equal share of the block, the remainder to the first
    steps. The shares sum to the block, so a block always finishes within ``steps`` steps."""
    schedule = torch.full((steps,), block_length // steps, dtype=torch.long)
    schedule[:block_length % steps] += 1
    return schedule


def keep_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Logits below the k-th largest set to −inf. Ties with the k-th are kept, as in the reference."""
    if k is None:
        return logits
    kth = logits.topk(min(k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: the most probable tokens until their mass passes ``p``; the first token always stays."""
    if p is None or p >= 1:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    beyond = ordered.softmax(-1).cumsum(-1) > p
    # Shift right by one: the token that carries the mass past p is itself kept.
    beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1)
    return logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One ``torch.multinomial`` draw per row of ``probs`` (``generator``: one, or a list of one per batch row). The draw runs on the generator's device: a CPU
    generator cannot drive a CUDA multinomial. ``generator=None`` after ``torch.manual_seed`` draws from the global
    RNG of ``probs``' device, as the reference does."""
    if isinstance(generator, list):  # one generator per row: each row draws what it would alone
        return torch.stack([draw(row, g) for row, g in zip(probs, generator)])
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:
        flat = flat.to(generator.device)
    return torch.multinomial(flat, 1, generator=generator).to(probs.device).view(probs.shape[:-1])


def sample_tokens(logits: torch.Tensor, settings: LLaDA2GenerateArgs, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, probability)`` per position (spec §5.3). Temperature divides only when it is neither 0 nor 1.
    Then come top-k, top-p and the softmax. The token is drawn from that softmax, or taken as its argmax when
    ``sampling="greedy"`` and the temperature is 0. The probability is the token's confidence."""
    if settings.temperature > 0 and settings.temperature != 1:
        logits = logits / settings.temperature
    probs = F.softmax(keep_top_p(keep_top_k(logits, settings.top_k), settings.top_p), dim=-1)
    if settings.sampling == "greedy" and settings.temperature == 0:
        token = probs.argmax(-1)
    else:
        token = draw(probs, generator)
    return token, probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def choose_transfers(confidence: torch.Tensor, active: torch.Tensor, share: int, threshold: float) -> torch.Tensor:
    """Which positions of each row to unmask this step. If at least ``share`` are confident above ``threshold``
    (strictly), all of them; otherwise the ``share`` most confident, or every active one if fewer are left
    (``confidence`` is -inf where not active). ``torch.topk`` per row keeps the reference's choice among equal
    confidences. Decided on the device: no transfer to the host."""
    confident = confidence > threshold
    top = confidence.topk(min(share, confidence.shape[1]), dim=1).indices
    most = torch.zeros_like(active).scatter(1, top, True) & active
    return torch.where(confident.sum(1, keepdim=True) >= share, confident, most)


def early_stopped(written: torch.Tensor, mask_id: int, eos_id: int, window: torch.Tensor, starts: torch.Tensor,
                  prompt_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that meet the reference's eos early stop (spec §5.2 step 4), and which of them stop with no answer.
    Row b's tokens start at column ``starts[b]`` and its prompt ends at ``prompt_ends[b]`` (``[batch, 1]``). A row
    meets the stop when this step wrote an eos and every position from the prompt's end to the first eos of the
    window is decoded. The reference looks for that eos in the whole window, the prompt included. When the prompt
    holds an eos, the decoded check is vacuous and the reference returns only the prompt, an empty answer. Decided
    on the device: no transfer to the host."""
    columns = torch.arange(window.shape[1], device=window.device)
    eos = (window == eos_id) & (columns >= starts)
    # argmax gives the first of equal maxima: the first eos; a row without one has nothing before "the end"
    first = torch.where(eos.any(1), eos.int().argmax(1), window.shape[1]).unsqueeze(1)
    undecoded = ((window == mask_id) & (columns >= prompt_ends) & (columns < first)).any(1)
    stopped = (written == eos_id).any(1) & ~undecoded
    return stopped, stopped & (first < prompt_ends).squeeze(1)


def finish(x: torch.Tensor, prompt_ends: list[int], gen_length: int, eos_id: int, empty: torch.Tensor) -> torch.Tensor:
    """The first ``gen_length`` generated tokens of each row (from its prompt's end), everything after the first
    eos set to eos. The reference instead cuts its single row just after that eos. Filling with eos keeps a batch
    rectangular, and cutting at the first eos gives back the reference's answer. Rows that stopped with an empty
    answer are all eos."""
    out = torch.stack([x[row, end:end + gen_length] for row, end in enumerate(prompt_ends)])
    out = out.masked_fill((out == eos_id).cumsum(1) > 0, eos_id)
    return out.masked_fill(empty.to(out.device).unsqueeze(1), eos_id)  # no boolean index: no synchronisation


def denoised_block(window: torch.Tensor, block: int) -> torch.Tensor:
    """``[batch, width]`` bool, True on the window's last ``block`` columns: the block being denoised. Its mask ratio
    is what capacity schedules read, and routing statistics count the experts its tokens use (dMoE's expert
    count)."""
    current = torch.zeros_like(window, dtype=torch.bool)
    current[:, -block:] = True
    return current


def lay_out_blocks(prompt: torch.Tensor, lengths: list[int] | None, block: int, gen_length: int, mask_id: int):
    """The prompts (left-padded ``[batch, P]``, row b's prompt its last ``lengths[b]`` columns) and ``gen_length``
    masks after each, laid out for block diffusion: ``(x, layout, start, prompt_ends, rounds)``. A row's blocks
    count from its own first token. Padding each row by whole blocks, so that every row's first denoised block (the
    one holding its prompt's end) starts at column ``start``, keeps the block boundaries at the same columns in
    every row: one window and one current block serve the whole batch. ``rounds``: the blocks each row denoises."""
    batch, width = prompt.shape
    lengths = [width] * batch if lengths is None else list(lengths)
    firsts = [n // block * block for n in lengths]
    start = max(firsts)
    pads = [start - first for first in firsts]
    rounds = [-(-(n + gen_length) // block) - n // block for n in lengths]
    host = prompt.tolist()
    x = lay_out([row[width - n:] for row, n in zip(host, lengths)], pads, start + max(rounds) * block, mask_id,
                prompt.device)
    return x, RowLayout(tuple(pads)), start, [pad + n for pad, n in zip(pads, lengths)], rounds


@torch.no_grad()
def generate(model, prompt: torch.Tensor, mask_id: int, eos_id: int, settings: LLaDA2GenerateArgs,
             generator=None, on_step=None, lengths: list[int] | None = None) -> torch.Tensor:
    """``prompt`` ``[batch, P]`` → ``[batch, gen_length]`` generated tokens (spec §5.2). ``lengths``: each row's
    prompt length when the rows are left-padded to P (row b's prompt is its last ``lengths[b]`` columns);
    ``generator``: one, or a list of one per row (each row then draws what it would alone).

    The model builds the block-causal mask itself from ``attention_blocks``, with blocks counted from position 0.
    So a prompt is not padded into whole blocks: the first denoised block holds the prompt's last ``P mod B``
    tokens, and they attend both ways with the first generated tokens, as in the reference. A row stops at the eos
    early stop (``eos_early_stop``), or after a block that leaves an eos in its generated region. A stopped row
    keeps its tokens and sits out the next forwards; its answer cannot change, since every position before its eos
    is decoded. The batch stops when every row has stopped, like the reference's single row."""
    settings.check()
    batch = prompt.shape[0]
    block, steps = settings.denoise_block, settings.block_steps
    x, layout, start, prompt_ends, rounds = lay_out_blocks(prompt, lengths, block, settings.gen_length, mask_id)
    # Where each row's tokens start and its prompt ends, ``[batch, 1]`` on the device, for the early stop
    starts, ends = (torch.tensor(c).unsqueeze(1).to(x.device, non_blocking=True) for c in (layout.pads, prompt_ends))
    generated = torch.arange(x.shape[1], device=x.device) >= ends
    generators = row_generators(generator, batch)
    schedule = transfer_schedule(block, steps).tolist()
    cache = BlockCache() if settings.cache != "none" else None
    stopped = [False] * batch
    empty = torch.zeros(batch, dtype=torch.bool)
    for current in range(max(rounds)):
        end = start + (current + 1) * block
        window, tokens = x[:, :end], x[:, end - block:end]  # views: writes land in x
        stopped = [gone or current >= count for gone, count in zip(stopped, rounds)]  # past its last block
        current_block = denoised_block(window, block)
        # Masks left per row, on the host: whether a row needs a step is known without asking the device.
        remaining = (tokens == mask_id).sum(1).cpu().tolist()
        for step in range(steps):
            rows = [b for b in range(batch) if not stopped[b] and remaining[b]]
            if not rows:
                break
            some = None if len(rows) == batch else rows
            active = tokens == mask_id if some is None else tokens[rows] == mask_id
            logits = block_logits(model, window, layout, some, slice(end - block, end), cache,
                                  settings.refreshes(step), maskable=current_block, attention_blocks=block)
            draws = generator if generators is None else [generators[b] for b in rows]
            candidate, probability = sample_tokens(logits.float(), settings, draws)
            confidence = probability.masked_fill(~active, float("-inf"))
            chosen = choose_transfers(confidence, active, schedule[step], settings.threshold)
            decoded = torch.where(chosen, candidate, tokens if some is None else tokens[rows])
            if some is None:
                tokens.copy_(decoded)  # no boolean indexing: no synchronisation
            else:
                tokens[rows] = decoded
            # The step's one transfer to the host: each row's masks, counted again as the reference does each step
            # (a position given the mask token stays masked), and the eos early stop's verdicts.
            found = [(decoded == mask_id).sum(1)]
            if settings.eos_early_stop:
                written = candidate.masked_fill(~chosen, mask_id)
                found += early_stopped(written, mask_id, eos_id, *take_rows(some, window, starts, ends))
            left, *verdicts = torch.stack([f.long() for f in found]).cpu().tolist()
            for b, count in zip(rows, left):
                remaining[b] = count
            if on_step:
                on_step()
            if verdicts:
                for b, hit, none in zip(rows, *verdicts):
                    stopped[b] = stopped[b] or bool(hit)
                    empty[b] = bool(empty[b]) or bool(none)
                if all(stopped):
                    return finish(x, prompt_ends, settings.gen_length, eos_id, empty)
        # The block-level stop looks up to the block's end, which can run past gen_length.
        ended = ((window == eos_id) & generated[:, :end]).any(1).cpu().tolist()
        stopped = [gone or hit for gone, hit in zip(stopped, ended)]
        if all(stopped):
            break
    return finish(x, prompt_ends, settings.gen_length, eos_id, empty)
