"""What every denoising sampler is: a settings class (the options a user gives, validated; the command line's
sampler flags are generated from these classes, :mod:`retrofit.eval.samplers`) and a :class:`Sampler` that turns
them into its algorithm's arguments and generates. A new sampler is one module with its settings class and its
``Sampler`` subclass, plus one ``register_sampler`` line in ``samplers.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from retrofit.errors import RetrofitError
from retrofit.eval.padding import lay_out


class SamplerSettings(BaseModel):
    """The options every sampler takes; a sampler's own class adds its own. ``None`` leaves a value to the
    sampler (its default, derived from ``gen_length`` where it says so)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    gen_length: int = Field(default=256, ge=1, description="tokens to generate")
    steps: int | None = Field(default=None, ge=1, description="denoising steps of the whole generation (default: "
                                                              "gen-length)")
    denoise_block: int | None = Field(default=None, ge=1, description="tokens per denoising block, generated left "
                                                                      "to right (default: gen-length)")
    temperature: float = Field(default=0.0, ge=0, description="sampling temperature (0: greedy)")


@dataclass(frozen=True)
class Forwards:
    """Forwards a run takes: ``full`` ones over the whole sequence, ``cached`` ones over a block (a key/value
    cache); ``at_most``: an upper bound (threshold decoding, early stops end sooner)."""

    full: int = 0
    cached: int = 0
    at_most: bool = False

    def describe(self) -> str:
        total = f"{'at most ' if self.at_most else ''}{self.full + self.cached:,} forwards"
        return total + (f" ({self.cached:,} of them block-only)" if self.cached else "")


def check_cache_options(cache: str, refresh: int) -> None:
    """``--cache-refresh`` means nothing without a cache: say so rather than ignore it."""
    if refresh and cache == "none":
        raise RetrofitError(f"--cache-refresh {refresh} has no effect without a cache; add --cache dual (or "
                            "prefix), or leave --cache-refresh out")


def refreshes(step: int, cache: str, refresh: int) -> bool:
    """Whether step ``step`` of a block (from 0) runs the whole sequence (and records the cache): every step
    without a cache; with one, the block's first step and every ``refresh`` steps (0: none more)."""
    return cache == "none" or step == 0 or (refresh > 0 and step % refresh == 0)


def block_forwards(steps: int, cache: str, refresh: int) -> tuple[int, int]:
    """(full, cached) forwards of a block denoised in ``steps`` steps, by the samplers' own rule."""
    full = sum(refreshes(step, cache, refresh) for step in range(steps))
    return full, steps - full


class Sampler:
    """A registered sampler. ``settings`` holds its algorithm's arguments, resolved from the user's options and
    checked (they are what an evaluation record names)."""

    kind: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # for messages, e.g. "LLaDA2.0"
    settings_class: ClassVar[type[SamplerSettings]] = SamplerSettings
    # Why another sampler's option does not apply to this one, where a reason says more than whose option it is.
    unsupported: ClassVar[dict[str, str]] = {}

    def __init__(self, options: SamplerSettings):
        self.settings = self.arguments(options)
        self.settings.check()

    @property
    def name(self) -> str:
        return self.kind

    @property
    def gen_length(self) -> int:
        return self.settings.gen_length

    @property
    def denoise_block(self) -> int:
        return self.settings.denoise_block

    def forwards(self) -> Forwards | None:
        """The forwards one batch of prompts takes (None: not known, so a run's plan counts only the others)."""
        return None

    def arguments(self, options: SamplerSettings) -> Any:
        """The algorithm's own arguments from the user's options."""
        raise NotImplementedError

    def generate(self, model, prompts: list[list[int]], mask_id: int, eos_id: int,
                 generators: list[torch.Generator] | None = None, device="cpu") -> torch.Tensor:
        """The ``gen_length`` tokens generated after each prompt, ``[batch, gen_length]`` on ``device``. Prompts of
        any lengths run as one batch (:func:`left_pad`), each row computing what it would alone; ``generators``
        holds one per prompt, so a row's draws never depend on its batch either."""
        raise NotImplementedError


def left_pad(prompts: list[list[int]], fill: int, device) -> tuple[torch.Tensor, list[int] | None]:
    """``[batch, longest]`` with each prompt at the right end of its row, and the prompts' lengths (None when
    they are all equal, so an unpadded batch runs exactly as before: no attention mask, no positions)."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = lay_out(prompts, [width - n for n in lengths], width, fill, device)
    return ids, None if len(set(lengths)) == 1 else lengths
