"""LLaDA2.1's token-editing sampler: block diffusion as LLaDA2.0's (blocks counted from position 0, block-causal
attention, each block from the one holding the prompt's end), with two kinds of writes per step:

- mask to token: every masked position of the block more confident than ``threshold`` (strictly); when fewer
  than ``num_to_transfer`` are, the most confident ``num_to_transfer`` instead;
- token to token (editing): every already-written, non-prompt position of the block whose prediction changed and
  is more confident than ``editing_threshold`` is overwritten.

A block ends at the first step that starts with no mask and edits nothing; after its masks are gone it gets at
most ``max_post_steps`` more forwards. ``--steps`` means nothing here (no schedule). At temperature 0 the token is
the argmax of the logits (top-k/top-p ignored), its confidence its softmax probability. The published modes
(``MODES``): speed (threshold 0.5, editing 0.0: every changed prediction is written) and quality (0.7, 0.5).

Batches: each row keeps its own block state (masks left, post steps, done) and sits out the forwards it does not
need; rows are padded by whole blocks, as for LLaDA2.0 (:mod:`retrofit.eval.sampler_llada2`).

Written from the public ``generate`` of LLaDA2.1's Hub modeling file, as copied in ZHZisZZ/dllm @ 62ebe4f
(``dllm/pipelines/llada21/models/modeling_llada21_moe.py``); the modes from SGLang's ``JointThreshold``
(sgl-project/sglang#18171, inclusionAI's serving path) and the diffusers LLaDA2 pipeline's defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from retrofit.errors import RetrofitError
from retrofit.eval.padding import block_logits, row_generators
from retrofit.eval.sampler_base import SamplerSettings, check_cache_options
from retrofit.eval.sampler_llada2 import (BlockDiffusionArgs, LLaDA2Sampler, choose_transfers, denoised_block, draw,
                                          finish, keep_top_k, keep_top_p, lay_out_blocks)
from retrofit.models.kv_cache import BlockCache

# (threshold, editing_threshold) of the published decoding modes.
MODES = {"speed": (0.5, 0.0), "quality": (0.7, 0.5)}


class LLaDA21SamplerSettings(SamplerSettings):
    """``retrofit eval``'s options of the LLaDA2.1 sampler."""

    type: Literal["llada2.1"] = "llada2.1"
    sampler_mode: Literal["speed", "quality"] = Field(default="quality", description=(
        "decoding mode: speed (threshold 0.5, every changed prediction written back) or quality "
        "(threshold 0.7, edits above 0.5); --threshold and --editing-threshold override its values"))
    threshold: float | None = Field(default=None, gt=0, le=1)
    editing_threshold: float | None = Field(default=None, ge=0, description=(
        "token editing: a written token whose prediction changed is replaced when the new one is more confident "
        "than this (0: always; above 1: never)"))
    max_post_steps: int = Field(default=16, ge=0, description=(
        "forwards a block may still take for edits once it holds no mask"))
    cache: Literal["none", "prefix", "dual"] = "none"
    cache_refresh: int = Field(default=0, ge=0)
    early_stop: bool = False


class LLaDA21Sampler(LLaDA2Sampler):
    """LLaDA2.0's sampler class (its batching and plan) with LLaDA2.1's settings and decoding."""

    kind = "llada2.1"
    display_name = "LLaDA2.1"
    settings_class = LLaDA21SamplerSettings
    unsupported = {"remasking": "the LLaDA2.1 sampler remasks by confidence only",
                   "sampling": "the LLaDA2.1 sampler takes the argmax at temperature 0"}

    def arguments(self, options: LLaDA21SamplerSettings) -> "LLaDA21GenerateArgs":
        if options.steps is not None:
            raise RetrofitError(f"--steps {options.steps} has no effect on the LLaDA2.1 sampler: each block is "
                                "decoded until it holds no mask and no edit; leave --steps out")
        check_cache_options(options.cache, options.cache_refresh)
        threshold, editing = MODES[options.sampler_mode]
        return LLaDA21GenerateArgs(
            gen_length=options.gen_length, denoise_block=options.denoise_block or 32,
            temperature=float(options.temperature),
            threshold=threshold if options.threshold is None else options.threshold,
            editing_threshold=editing if options.editing_threshold is None else options.editing_threshold,
            max_post_steps=options.max_post_steps, eos_early_stop=options.early_stop, cache=options.cache,
            cache_refresh=options.cache_refresh)

    @staticmethod
    def decode(*args, **kwargs) -> torch.Tensor:
        return generate(*args, **kwargs)


@dataclass(frozen=True)
class LLaDA21GenerateArgs(BlockDiffusionArgs):
    """The reference ``generate`` arguments and defaults (``steps`` and ``minimal_topk`` left out: unused; top-k
    of 0 or less keeps every token, as the reference's)."""

    editing_threshold: float = 0.9
    max_post_steps: int = 16
    num_to_transfer: int = 1

    @property
    def block_steps(self) -> int:
        """Forwards a block takes at most: one per ``num_to_transfer`` of its positions while masks remain (each
        fills at least that many), then the post steps. Unless the model predicts its own mask token: that
        position stays masked and is decoded again, as in the reference (trained checkpoints practically never
        predict it)."""
        return -(-self.denoise_block // self.num_to_transfer) + self.max_post_steps

    def check(self) -> None:
        super().check() if not (self.top_k is not None and self.top_k <= 0) else \
            BlockDiffusionArgs.check(replace(self, top_k=None))
        if self.num_to_transfer < 1:
            raise RetrofitError(f"num_to_transfer ({self.num_to_transfer}) must be at least 1")
        if self.max_post_steps < 0:
            raise RetrofitError(f"max_post_steps ({self.max_post_steps}) must not be negative")
        if self.editing_threshold < 0:
            raise RetrofitError(f"editing_threshold ({self.editing_threshold}) must not be negative")


def sample_tokens(logits: torch.Tensor, settings: LLaDA21GenerateArgs, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, probability)`` per position. Temperature 0: the argmax of the logits and its softmax probability
    (no filter). Otherwise temperature (when not 1), top-k, top-p, softmax, one draw."""
    if settings.temperature == 0:
        token = logits.argmax(-1)
        return token, F.softmax(logits, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
    if settings.temperature != 1:
        logits = logits / settings.temperature
    top_k = settings.top_k if settings.top_k and settings.top_k > 0 else None  # the reference: k <= 0 keeps all
    probs = F.softmax(keep_top_p(keep_top_k(logits, top_k), settings.top_p), dim=-1)
    token = draw(probs, generator)
    return token, probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def choose_writes(candidate: torch.Tensor, probability: torch.Tensor, old: torch.Tensor, editable: torch.Tensor,
                  settings: LLaDA21GenerateArgs, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of each row this step writes, and which of them are edits. ``editable``: the block's
    non-prompt positions. Decided on the device: no transfer to the host."""
    active = old == mask_id
    confidence = probability.masked_fill(~active, float("-inf"))
    fills = choose_transfers(confidence, active, settings.num_to_transfer, settings.threshold)
    edits = ~active & editable & (probability > settings.editing_threshold) & (candidate != old)
    return fills | edits, edits


@torch.no_grad()
def generate(model, prompt: torch.Tensor, mask_id: int, eos_id: int, settings: LLaDA21GenerateArgs, generator=None,
             on_step=None, lengths: list[int] | None = None) -> torch.Tensor:
    """``prompt`` ``[batch, P]`` → ``[batch, gen_length]`` generated tokens, each row cut after its first eos (the
    rest set to eos). ``lengths``: each row's prompt length when the rows are left-padded to P; ``generator``: one,
    or a list of one per row."""
    settings.check()
    batch, block = prompt.shape[0], settings.denoise_block
    x, layout, start, prompt_ends, rounds = lay_out_blocks(prompt, lengths, block, settings.gen_length, mask_id)
    columns = torch.arange(x.shape[1], device=x.device)
    prompt_part = columns < torch.tensor(prompt_ends, device=x.device).unsqueeze(1)
    generators = row_generators(generator, batch)
    cache = BlockCache() if settings.cache != "none" else None
    stopped = [False] * batch
    for current in range(max(rounds)):
        end = start + (current + 1) * block
        window, tokens = x[:, :end], x[:, end - block:end]  # views: writes land in x
        stopped = [gone or current >= count for gone, count in zip(stopped, rounds)]
        current_block = denoised_block(window, block)
        editable = ~prompt_part[:, end - block:end]
        masks_left = (tokens == mask_id).sum(1).cpu().tolist()
        post_steps, done = [0] * batch, list(stopped)
        step = 0
        while True:
            for b in range(batch):  # the reference counts a post step before its forward, and stops past the budget
                if not done[b] and not masks_left[b]:
                    post_steps[b] += 1
                    done[b] = post_steps[b] > settings.max_post_steps
            rows = [b for b in range(batch) if not done[b]]
            if not rows:
                break
            some = None if len(rows) == batch else rows
            old = tokens.clone() if some is None else tokens[rows]
            logits = block_logits(model, window, layout, some, slice(end - block, end), cache,
                                  settings.refreshes(step), maskable=current_block, attention_blocks=block)
            draws = generator if generators is None else [generators[b] for b in rows]
            candidate, probability = sample_tokens(logits.float(), settings, draws)
            writes, edits = choose_writes(candidate, probability, old, editable[rows], settings, mask_id)
            decoded = torch.where(writes, candidate, old)
            if some is None:
                tokens.copy_(decoded)
            else:
                tokens[rows] = decoded
            # Masks are counted again, as the reference does each step: a write may itself be the mask token.
            # One transfer to the host per step.
            masks_now, edited = torch.stack([(decoded == mask_id).sum(1), edits.sum(1)]).cpu().tolist()
            for b, left, changed in zip(rows, masks_now, edited):
                done[b] = not masks_left[b] and not changed  # a step that began unmasked and edited nothing
                masks_left[b] = left
            step += 1
            if on_step:
                on_step()
        if settings.eos_early_stop:
            answered = _answered(window, ~prompt_part[:, :end], mask_id, eos_id).cpu().tolist()  # once a block
            stopped = [gone or hit for gone, hit in zip(stopped, answered)]
        if all(stopped):
            break
    return finish(x, prompt_ends, settings.gen_length, eos_id, torch.zeros(batch, dtype=torch.bool))


def _answered(window: torch.Tensor, generated: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """The reference's early stop after a block, per row: the generated part (``generated``) holds no mask and an
    eos. Decided on the device."""
    return ~((window == mask_id) & generated).any(1) & ((window == eos_id) & generated).any(1)
