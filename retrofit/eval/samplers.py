"""The denoising samplers by the name a model family gives (``ModelFamily.sampler``), behind one call.

``llada``: LLaDA's sampler (sampler.py): the generation region in ``denoise_block`` blocks after the prompt,
``steps`` in all, low-confidence (or random) remasking, bidirectional attention. ``llada2``: LLaDA2.0's
block-diffusion sampler (sampler_llada2.py): blocks counted from position 0, block-causal attention, ``threshold``
acceptance with the schedule as a fallback. ``--steps`` means the steps of the whole generation for both; the
LLaDA2.0 sampler spends ``steps · denoise_block / gen_length`` of them on each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrofit.errors import RetrofitError, at_least_one
from retrofit.eval import sampler as llada
from retrofit.eval import sampler_llada2 as llada2


@dataclass(frozen=True)
class Sampler:
    name: str
    settings: llada.SamplerSettings | llada2.LLaDA2SamplerSettings

    @property
    def gen_length(self) -> int:
        return self.settings.gen_length

    @property
    def denoise_block(self) -> int:
        return self.settings.denoise_block

    def generate(self, model, prompt: torch.Tensor, mask_id: int, eos_id: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``prompt`` ``[batch, P]`` → ``[batch, gen_length]`` generated tokens."""
        if self.name == "llada2":
            return llada2.generate(model, prompt, mask_id, eos_id, self.settings, generator)
        return llada.generate(model, prompt, mask_id, self.settings, generator)


def check_sampler_numbers(gen_length, steps=None, denoise_block=None, temperature=0.0, threshold=None) -> None:
    """Each sampler number in its range (before anything slow starts: the CLI calls this first too)."""
    at_least_one(gen_length=gen_length, steps=steps, denoise_block=denoise_block)
    if float(temperature) < 0:
        raise RetrofitError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if threshold is not None and not 0 < float(threshold) <= 1:
        raise RetrofitError(f"--threshold {threshold}: a confidence, above 0 and at most 1 (LLaDA2.0 uses 0.95)")


def make_sampler(name: str, gen_length: int, steps: int | None, denoise_block: int | None, temperature: float,
                 remasking: str = "low_confidence", threshold: float | None = None,
                 sampling: str | None = None) -> Sampler:
    """The family's sampler with the evaluation's settings, checked; options of the other sampler are refused."""
    check_sampler_numbers(gen_length, steps, denoise_block, temperature, threshold)
    denoise_block = int(denoise_block or gen_length)
    steps = int(steps or gen_length)
    if name == "llada":
        if threshold is not None or sampling is not None:
            raise RetrofitError("--threshold and --sampling are options of the LLaDA2.0 sampler; this model family "
                                "samples with LLaDA's")
        settings = llada.SamplerSettings(gen_length=gen_length, steps=steps, denoise_block=denoise_block,
                                         temperature=float(temperature), remasking=remasking)
    elif name == "llada2":
        if remasking != "low_confidence":
            raise RetrofitError(f"--remasking {remasking}: the LLaDA2.0 sampler remasks by confidence only")
        per_block = max(1, steps * denoise_block // gen_length)
        options = {k: v for k, v in (("threshold", threshold), ("sampling", sampling)) if v is not None}
        settings = llada2.LLaDA2SamplerSettings(gen_length=gen_length, denoise_block=denoise_block, steps=per_block,
                                                temperature=float(temperature), **options)
    else:
        raise RetrofitError(f"no sampler named {name!r}")
    settings.check()
    return Sampler(name, settings)
