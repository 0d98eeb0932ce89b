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
from retrofit.eval.sampler_base import Sampler, SamplerSettings


class LLaDA2SamplerSettings(SamplerSettings):
    """``retrofit eval``'s options of the LLaDA2.0 sampler. ``--steps`` counts the whole generation, as for LLaDA's
    sampler, and is spread over the blocks."""

    type: Literal["llada2"] = "llada2"
    threshold: float | None = Field(default=None, gt=0, le=1, description=(
        "accept every position more confident than this at each step (default 0.95)"))
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
        block, steps = options.denoise_block or gen_length, options.steps or gen_length
        chosen = {k: v for k, v in (("threshold", options.threshold), ("sampling", options.sampling)) if v is not None}
        return LLaDA2GenerateArgs(gen_length=gen_length, denoise_block=block, steps=max(1, steps * block // gen_length),
                                  temperature=float(options.temperature), **chosen)

    def generate(self, model, prompt, mask_id, eos_id, generator=None):
        return generate(model, prompt, mask_id, eos_id, self.settings, generator)


@dataclass(frozen=True)
class LLaDA2GenerateArgs:
    """The reference ``generate`` arguments (spec §5.1). ``sampling="reference"`` keeps the Hub code's quirk (§5.3):
    at temperature 0 it still draws from the untempered softmax. ``"greedy"`` takes the argmax at temperature 0.
    The two agree at any temperature above 0."""
    gen_length: int = 2048
    denoise_block: int = 32
    steps: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    threshold: float = 0.95
    minimal_topk: int = 1
    eos_early_stop: bool = False
    sampling: Literal["reference", "greedy"] = "reference"

    def check(self) -> None:
        for name in ("gen_length", "denoise_block", "steps", "minimal_topk"):
            if getattr(self, name) < 1:
                raise RetrofitError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.minimal_topk > self.gen_length:
            raise RetrofitError(f"minimal_topk ({self.minimal_topk}) must not exceed gen_length ({self.gen_length}): "
                                "it would leave no denoising steps")
        if self.temperature < 0:
            raise RetrofitError(f"temperature ({self.temperature}) must not be negative")
        if not 0 < self.threshold <= 1:
            raise RetrofitError(f"threshold ({self.threshold}) must be in (0, 1]")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RetrofitError(f"top_p ({self.top_p}) must be in (0, 1], or None to keep every token")
        if self.top_k is not None and self.top_k < 1:
            raise RetrofitError(f"top_k ({self.top_k}) must be at least 1, or None to keep every token")
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


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One ``torch.multinomial`` draw per row of ``probs``. The draw runs on the generator's device: a CPU
    generator cannot drive a CUDA multinomial. ``generator=None`` after ``torch.manual_seed`` draws from the global
    RNG of ``probs``' device, as the reference does."""
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:
        flat = flat.to(generator.device)
    return torch.multinomial(flat, 1, generator=generator).to(probs.device).view(probs.shape[:-1])


def sample_tokens(logits: torch.Tensor, settings: LLaDA2GenerateArgs,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
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


def choose_transfers(confidence: torch.Tensor, active: torch.Tensor, share: int, threshold: float,
                     active_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Which positions of each row to unmask this step, and how many per row. If at least ``share`` are confident
    above ``threshold`` (strictly), take all of them. Otherwise take the ``share`` most confident, or every active
    one if fewer are left. ``torch.topk`` per row keeps the reference's choice among equal confidences.

    The counts the choice depends on come to the host in one transfer (the active counts too, unless the caller
    keeps them, as :func:`generate` does): one synchronisation per step on a GPU, not two per row."""
    confident = confidence > threshold
    counts = (confident.sum(1) if active_counts is not None else
              torch.stack([confident.sum(1), active.sum(1)])).cpu().tolist()
    confident_counts, active_counts = (counts, active_counts) if active_counts is not None else counts
    chosen = torch.zeros_like(active)
    taken = []
    for row, (sure, left) in enumerate(zip(confident_counts, active_counts)):
        if sure >= share:
            chosen[row] = confident[row]
            taken.append(sure)
        else:
            chosen[row, confidence[row].topk(min(share, left)).indices] = True
            taken.append(min(share, left))
    return chosen, taken


def early_stopped(window: torch.Tensor, written: torch.Tensor, mask_id: int, eos_id: int,
                  prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that meet the reference's eos early stop (spec §5.2 step 4), and which of them stop with no answer.
    A row meets it when this step wrote an eos and every position from the prompt's end to the first eos of the
    window is decoded. The reference looks for that eos in the whole window, the prompt included. When the prompt
    holds an eos, the decoded check is vacuous and the reference returns only the prompt, an empty answer."""
    batch = window.shape[0]
    stopped = torch.zeros(batch, dtype=torch.bool)
    empty = torch.zeros(batch, dtype=torch.bool)
    for row in range(batch):
        if not bool((written[row] == eos_id).any()):
            continue
        first = int((window[row] == eos_id).nonzero()[0, 0])
        if bool((window[row, prompt_length:first] != mask_id).all()):
            stopped[row], empty[row] = True, first < prompt_length
    return stopped, empty


def finish(x: torch.Tensor, prompt_length: int, gen_length: int, eos_id: int, empty: torch.Tensor) -> torch.Tensor:
    """The first ``gen_length`` generated tokens of each row, with everything after the first eos set to eos.
    The reference instead cuts its single row just after that eos. Filling with eos keeps a batch rectangular, and
    cutting at the first eos gives back the reference's answer. Rows that stopped with an empty answer are all eos."""
    out = x[:, prompt_length:prompt_length + gen_length].clone()
    out = out.masked_fill((out == eos_id).cumsum(1) > 0, eos_id)
    out[empty.to(out.device)] = eos_id
    return out


@torch.no_grad()
def generate(model, prompt: torch.Tensor, mask_id: int, eos_id: int, settings: LLaDA2GenerateArgs,
             generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
    """``prompt`` ``[batch, P]`` (equal lengths, no padding) → ``[batch, gen_length]`` generated tokens (spec §5.2).

    The model builds the block-causal mask itself from ``attention_blocks``, with blocks counted from position 0.
    So the prompt is not padded: the first denoised block holds the prompt's last ``P mod B`` tokens, and they
    attend both ways with the first generated tokens, as in the reference. A row stops at the eos early stop
    (``eos_early_stop``), or after a block that leaves an eos in its generated region. A stopped row keeps its tokens
    and is no longer written; its answer cannot change, since every position before its eos is decoded. The batch
    stops when every row has stopped, like the reference's single row."""
    settings.check()
    batch, prompt_length = prompt.shape
    block, steps = settings.denoise_block, settings.block_steps
    blocks = -(-(prompt_length + settings.gen_length) // block)
    x = torch.full((batch, blocks * block), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_length] = prompt
    schedule = transfer_schedule(block, steps).tolist()
    stopped = torch.zeros(batch, dtype=torch.bool, device=x.device)
    stopped_host = [False] * batch  # the same, on the host
    empty = torch.zeros(batch, dtype=torch.bool)
    for current in range(prompt_length // block, blocks):
        end = (current + 1) * block
        window, tokens = x[:, :end], x[:, end - block:end]  # views: writes land in x
        # The block being denoised: its mask ratio is what capacity schedules read, and routing statistics count
        # the experts its tokens use (dMoE's expert count).
        current_block = torch.zeros_like(window, dtype=torch.bool)
        current_block[:, end - block:] = True
        # Masks left per row, kept on the host from here on (one transfer per block): whether a step is needed and
        # how many positions a row can still give are then known without asking the device.
        remaining = (tokens == mask_id).sum(1).cpu().tolist()
        for step in range(steps):
            left = [0 if gone else count for gone, count in zip(stopped_host, remaining)]
            if not any(left):
                break
            active = (tokens == mask_id) & ~stopped.unsqueeze(1)
            logits = model(input_ids=window, attention_blocks=block, logits_to_keep=slice(-block, None),
                           maskable=current_block).logits
            candidate, probability = sample_tokens(logits.float(), settings, generator)
            confidence = probability.masked_fill(~active, float("-inf"))
            chosen, taken = choose_transfers(confidence, active, schedule[step], settings.threshold, left)
            remaining = [count - took for count, took in zip(remaining, taken)]
            tokens.copy_(torch.where(chosen, candidate, tokens))  # no boolean indexing: no synchronisation
            if on_step:
                on_step()
            if settings.eos_early_stop:
                written = candidate.masked_fill(~chosen, mask_id)
                now, now_empty = early_stopped(window, written, mask_id, eos_id, prompt_length)
                stopped |= now.to(x.device)
                stopped_host = [a or b for a, b in zip(stopped_host, now.tolist())]
                empty |= now_empty
                if all(stopped_host):
                    return finish(x, prompt_length, settings.gen_length, eos_id, empty)
        # The block-level stop looks up to the block's end, which can run past gen_length.
        stopped |= (x[:, prompt_length:end] == eos_id).any(1)
        stopped_host = stopped.cpu().tolist()
        if all(stopped_host):
            break
    return finish(x, prompt_length, settings.gen_length, eos_id, empty)
