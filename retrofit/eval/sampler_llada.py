"""The LLaDA sampler (docs/algorithms.md §7): fill ``gen_length`` masks block by block, unmasking the most confident
positions of the current block, an equal share per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pydantic import Field

from retrofit.errors import RetrofitError
from retrofit.eval.sampler_base import Sampler, SamplerSettings


class LLaDASamplerSettings(SamplerSettings):
    """``retrofit eval``'s options of the LLaDA sampler (flags ``--gen-length``, ``--steps``, ...)."""

    type: Literal["llada"] = "llada"
    remasking: Literal["low_confidence", "random"] = Field(default="low_confidence", description=(
        "which masked positions a step unmasks: the most confident, or random ones"))


class LLaDASampler(Sampler):
    kind = "llada"
    display_name = "LLaDA"
    settings_class = LLaDASamplerSettings

    def arguments(self, options: LLaDASamplerSettings) -> "GenerateArgs":
        gen_length = options.gen_length
        return GenerateArgs(gen_length=gen_length, steps=options.steps or gen_length,
                            denoise_block=options.denoise_block or gen_length,
                            temperature=float(options.temperature), remasking=options.remasking)

    def generate(self, model, prompt, mask_id, eos_id, generator=None):
        return generate(model, prompt, mask_id, self.settings, generator)


@dataclass(frozen=True)
class GenerateArgs:
    """The arguments of :func:`generate`, resolved."""

    gen_length: int = 256
    steps: int = 256
    denoise_block: int = 256
    temperature: float = 0.0
    remasking: Literal["low_confidence", "random"] = "low_confidence"

    def check(self) -> None:
        if self.gen_length % self.denoise_block:
            raise RetrofitError(f"gen_length ({self.gen_length}) must be a multiple of the denoising block "
                                f"({self.denoise_block})")
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


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # Gumbel-max in float64, as LLaDA does: low precision Gumbel noise skews the sample.
    # Drawn where the generator lives (a CPU generator: the same numbers on every device).
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu").to(logits.device)
    return (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, mask_id: int, settings: GenerateArgs,
             generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
    """``prompt`` ``[B, P]`` (equal lengths) → ``[B, P + gen_length]`` with every mask filled."""
    settings.check()
    batch, start = prompt.shape
    x = torch.cat([prompt, torch.full((batch, settings.gen_length), mask_id, dtype=prompt.dtype,
                                      device=prompt.device)], dim=1)
    blocks = settings.gen_length // settings.denoise_block
    steps_per_block = settings.steps // blocks
    maskable = torch.zeros_like(x, dtype=torch.bool)
    maskable[:, start:] = True
    for block in range(blocks):
        lo, hi = start + block * settings.denoise_block, start + (block + 1) * settings.denoise_block
        schedule = transfer_schedule((x[:, lo:hi] == mask_id).sum(1).cpu(), steps_per_block)
        for step in range(steps_per_block):
            # Only the current block's positions can be unmasked at this step: score just those.
            masked = x[:, lo:hi] == mask_id
            # The mask ratio counts the generation region only (a prompt is never masked), and block routing
            # cuts its blocks where the denoising blocks begin.
            logits = model(input_ids=x, logits_to_keep=slice(lo, hi), maskable=maskable, block_start=start).logits
            candidate = gumbel_argmax(logits, settings.temperature, generator)
            if settings.remasking == "low_confidence":
                confidence = F.softmax(logits.float(), dim=-1).gather(-1, candidate.unsqueeze(-1)).squeeze(-1)
            else:
                confidence = torch.rand(masked.shape, generator=generator,
                                        device=generator.device if generator is not None else "cpu").to(x.device)
            confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
            for row in range(batch):
                count = int(schedule[row, step])
                if count:
                    chosen = confidence[row].topk(count).indices
                    x[row, lo + chosen] = candidate[row, chosen]
            if on_step:
                on_step()
    return x


def apply_stop(text: str, stops: list[str]) -> str:
    """Cut the decoded text at the first stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]
