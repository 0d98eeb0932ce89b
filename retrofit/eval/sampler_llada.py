"""The LLaDA sampler (docs/algorithms.md §7): fill ``gen_length`` masks block by block, unmasking the most confident
positions of the current block, an equal share per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pydantic import Field

from retrofit.errors import RetrofitError
from retrofit.eval.padding import RowLayout, block_logits, row_generators
from retrofit.eval.sampler_base import (Forwards, Sampler, SamplerSettings, block_forwards, check_cache_options,
                                        left_pad, refreshes)
from retrofit.models.kv_cache import BlockCache


class LLaDASamplerSettings(SamplerSettings):
    """``retrofit eval``'s options of the LLaDA sampler (flags ``--gen-length``, ``--steps``, ...)."""

    type: Literal["llada"] = "llada"
    remasking: Literal["low_confidence", "random"] = Field(default="low_confidence", description=(
        "which masked positions a step unmasks: the most confident, or random ones"))
    # The flags' help is these descriptions: they speak for LLaDA2.0's threshold and cache too.
    cache: Literal["none", "prefix", "dual"] = Field(default="none", description=(
        "key/value cache, refreshed at each block's start: none (exact; every step runs the whole sequence), prefix "
        "(Fast-dLLM: a step runs the current block and what follows it), dual (a step runs the current block "
        "only); llada2's block-causal attention needs no suffix, so both run the block there"))
    cache_refresh: int = Field(default=0, ge=0, description=(
        "with a cache, also refresh it every this many steps inside a block (0: only at the block's start)"))
    threshold: float | None = Field(default=None, gt=0, le=1, description=(
        "parallel decoding: each step accepts every masked position of the current block at least this confident "
        "(llada2, llada2.1: above it), at least one (default: llada none, each step its equal share; llada2 0.95, "
        "with the schedule's share when fewer are confident; llada2.1 its --sampler-mode's)"))


class LLaDASampler(Sampler):
    kind = "llada"
    display_name = "LLaDA"
    settings_class = LLaDASamplerSettings

    def arguments(self, options: LLaDASamplerSettings) -> "GenerateArgs":
        gen_length = options.gen_length
        check_cache_options(options.cache, options.cache_refresh)
        if options.threshold is not None and options.steps is not None:
            raise RetrofitError(f"--steps {options.steps} has no effect with --threshold on the LLaDA sampler (each "
                                "block is decoded until done, at least one position per step); give one of them")
        return GenerateArgs(gen_length=gen_length, steps=options.steps or gen_length,
                            denoise_block=options.denoise_block or gen_length,
                            temperature=float(options.temperature), remasking=options.remasking,
                            threshold=options.threshold, cache=options.cache, cache_refresh=options.cache_refresh)

    def generate(self, model, prompts, mask_id, eos_id, generators=None, device="cpu"):
        ids, lengths = left_pad(prompts, mask_id, device)
        return generate(model, ids, mask_id, self.settings, generators, lengths=lengths)[:, ids.shape[1]:]

    def forwards(self) -> Forwards:
        s = self.settings
        blocks = s.gen_length // s.denoise_block
        steps = s.denoise_block if s.threshold is not None else s.steps // blocks  # threshold: at most one each
        full, cached = block_forwards(steps, s.cache, s.cache_refresh)
        return Forwards(blocks * full, blocks * cached, at_most=s.threshold is not None)


@dataclass(frozen=True)
class GenerateArgs:
    """The arguments of :func:`generate`, resolved."""

    gen_length: int = 256
    steps: int = 256
    denoise_block: int = 256
    temperature: float = 0.0
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: float | None = None  # None: the schedule; else Fast-dLLM's parallel decoding (steps unused)
    cache: Literal["none", "prefix", "dual"] = "none"
    cache_refresh: int = 0  # steps between refreshes inside a block (0: at the block's start only)

    def refreshes(self, step: int) -> bool:
        """Whether step ``step`` of a block (from 0) runs the whole sequence and records the cache."""
        return refreshes(step, self.cache, self.cache_refresh)

    def check(self) -> None:
        if self.gen_length % self.denoise_block:
            raise RetrofitError(f"gen_length ({self.gen_length}) must be a multiple of the denoising block "
                                f"({self.denoise_block})")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise RetrofitError(f"threshold ({self.threshold}) must be in (0, 1]")
        blocks = self.gen_length // self.denoise_block
        if self.steps % blocks or self.steps < blocks:
            raise RetrofitError(f"steps ({self.steps}) must be a positive multiple of the number of blocks ({blocks})")


def transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """How many positions each step of a block unmasks: an equal share, the remainder to the first steps."""
    base = masked_count // steps
    schedule = base.unsqueeze(1).repeat(1, steps)
    remainder = masked_count % steps
    schedule += torch.arange(steps).unsqueeze(0) < remainder.unsqueeze(1)
    return schedule


def uniform(shape, generator, dtype=torch.float32) -> torch.Tensor:
    """Uniform draws of ``shape`` on the generator's device (a CPU generator: the same numbers on every device);
    with one generator per row (a list), each row's from its own, so a row draws what it would alone."""
    if isinstance(generator, list):
        return torch.stack([uniform(shape[1:], g, dtype) for g in generator])
    return torch.rand(shape, generator=generator, dtype=dtype, device=generator.device if generator is not None else "cpu")


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # Gumbel-max in float64, as LLaDA does: low precision Gumbel noise skews the sample.
    noise = uniform(logits.shape, generator, torch.float64).to(logits.device)
    return (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(-1)


def threshold_transfers(confidence: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's parallel decoding: every masked position at least ``threshold`` confident, and each row's most
    confident masked position whatever its confidence (at least one per step)."""
    # topk, as Fast-dLLM and the schedule pick: among equal confidences the same position as they would
    best = torch.zeros_like(masked).scatter(-1, confidence.topk(1, dim=-1).indices, True)
    return masked & (best | (confidence >= threshold))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, mask_id: int, settings: GenerateArgs, generator=None, on_step=None,
             lengths: list[int] | None = None) -> torch.Tensor:
    """``prompt`` ``[B, P]`` → ``[B, P + gen_length]`` with every mask filled. ``lengths``: each row's prompt
    length when the rows are left-padded to P (row b's prompt is its last ``lengths[b]`` columns); every row
    then generates what it would alone. ``generator``: one, or a list of one per row."""
    settings.check()
    batch, start = prompt.shape
    x = torch.cat([prompt, torch.full((batch, settings.gen_length), mask_id, dtype=prompt.dtype,
                                      device=prompt.device)], dim=1)
    layout = RowLayout(tuple(start - n for n in lengths) if lengths is not None else (0,) * batch)
    generators = row_generators(generator, batch)
    blocks = settings.gen_length // settings.denoise_block
    steps_per_block = settings.steps // blocks
    # The mask ratio counts the generation region only (a prompt is never masked), and block routing cuts its
    # blocks where the denoising blocks begin.
    maskable = torch.zeros_like(x, dtype=torch.bool)
    maskable[:, start:] = True

    cache = BlockCache() if settings.cache != "none" else None

    def step(lo: int, hi: int, rows: list[int] | None, choose, index: int) -> None:
        # Only the current block's positions can be unmasked at this step: score just those.
        picked = x if rows is None else x[rows]
        masked = picked[:, lo:hi] == mask_id
        # Cached steps run the current block (and, under the prefix cache, what follows it).
        logits = block_logits(model, x, layout, rows, slice(lo, hi), cache, settings.refreshes(index),
                              None if settings.cache == "dual" else x.shape[1], maskable=maskable, block_start=start)
        draws = generators if rows is None or generators is None else [generators[r] for r in rows]
        candidate = gumbel_argmax(logits, settings.temperature, draws if draws is not None else generator)
        if settings.remasking == "low_confidence":
            confidence = F.softmax(logits.float(), dim=-1).gather(-1, candidate.unsqueeze(-1)).squeeze(-1)
        else:
            confidence = uniform(masked.shape, draws if draws is not None else generator).to(x.device)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
        chosen = choose(confidence, masked)
        block = torch.where(chosen, candidate, picked[:, lo:hi])
        if rows is None:
            x[:, lo:hi] = block
        else:
            x[rows, lo:hi] = block
        if on_step:
            on_step()

    for b in range(blocks):
        lo, hi = start + b * settings.denoise_block, start + (b + 1) * settings.denoise_block
        if settings.threshold is None:
            schedule = transfer_schedule((x[:, lo:hi] == mask_id).sum(1).cpu(), steps_per_block)
            for s in range(steps_per_block):
                step(lo, hi, None, lambda confidence, masked, s=s: scheduled_transfers(confidence, schedule[:, s]), s)
        else:
            # Until the block is decoded, at least one position per step; rows already done sit out.
            s = 0
            while rows := [r for r, left in enumerate((x[:, lo:hi] == mask_id).any(1).tolist()) if left]:
                step(lo, hi, None if len(rows) == batch else rows,
                     lambda confidence, masked: threshold_transfers(confidence, masked, settings.threshold), s)
                s += 1
    return x


def scheduled_transfers(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``counts[b]`` most confident positions of each row b (LLaDA's schedule)."""
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    for row, count in enumerate(counts.tolist()):
        if count:
            chosen[row, confidence[row].topk(count).indices] = True
    return chosen


def apply_stop(text: str, stops: list[str]) -> str:
    """Cut the decoded text at the first stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]
