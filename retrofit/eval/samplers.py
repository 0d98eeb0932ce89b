"""The sampler registry: a model family names its sampler (``ModelFamily.sampler``), the registry holds each
sampler's class, and the command line's sampler flags are generated from their settings classes (as the router
flags are from the routers'), so ``retrofit eval`` and ``retrofit inspect`` take the same flags with one default.

``llada``: LLaDA's sampler (sampler_llada.py): the generation region in ``denoise_block`` blocks after the
prompt, ``steps`` in all, low-confidence (or random) remasking, bidirectional attention. ``llada2``: LLaDA2.0's
block-diffusion sampler (sampler_llada2.py): blocks counted from position 0, block-causal attention,
``threshold`` acceptance with the schedule as a fallback. ``llada2.1``: LLaDA2.1's token-editing sampler
(sampler_llada21.py): LLaDA2.0's layout, and already-written tokens rewritten when the model changes its mind
(``--sampler-mode speed|quality``); a family names it among its ``alternative_samplers``, ``--sampler`` picks it. ``--steps`` means the steps of the whole generation
for both; the LLaDA2.0 sampler spends ``steps · denoise_block / gen_length`` of them on each block. Both take
``--threshold`` (LLaDA's: Fast-dLLM's parallel decoding, off by default) and ``--cache`` (the block-wise
key/value cache, :mod:`retrofit.models.kv_cache`), and both generate prompts of any lengths as one batch
(:mod:`retrofit.eval.padding`).

A new sampler is one module (its settings class and its :class:`~retrofit.eval.sampler_base.Sampler` subclass)
and one ``register_sampler`` line below; ``tests/test_sampler_seam.py`` proves it with a toy sampler.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from retrofit.errors import RetrofitError
from retrofit.eval.sampler_base import Sampler, SamplerSettings
from retrofit.eval.sampler_llada import LLaDASampler
from retrofit.eval.sampler_llada2 import LLaDA2Sampler
from retrofit.eval.sampler_llada21 import LLaDA21Sampler
from retrofit.flags import Flag, add_to_registry, flag_of, settings_flags

SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Make ``cls`` the sampler of the families that name its ``kind``, with its settings as flags."""
    return add_to_registry(SAMPLERS, cls)


register_sampler(LLaDASampler)
register_sampler(LLaDA2Sampler)
register_sampler(LLaDA21Sampler)


def sampler_flags() -> list[Flag]:
    """Every registered sampler's settings as flags; a name shared by samplers is one flag."""
    return settings_flags({kind: cls.settings_class for kind, cls in SAMPLERS.items()}, "sampler")


def make_sampler(kind: str, given: dict[str, Any] | None = None, alternatives: tuple[str, ...] = ()) -> Sampler:
    """The ``kind`` sampler with the options a user gave (flag dest → value; None: not given). An option of another
    sampler is refused in one line, naming whose it is (and ``--sampler`` where it is one of the model family's
    ``alternatives``); a value out of range names its flag."""
    if kind not in SAMPLERS:
        raise RetrofitError(f"no sampler named {kind!r}; registered: {', '.join(SAMPLERS)}")
    return SAMPLERS[kind](settings_of(kind, given or {}, alternatives))


def settings_of(kind: str, given: dict[str, Any], alternatives: tuple[str, ...] = ()) -> SamplerSettings:
    flags = {f.dest: f for f in sampler_flags()}
    data: dict[str, Any] = {"type": kind}
    for dest, value in given.items():
        if value is None:
            continue
        if dest not in flags:
            raise RetrofitError(f"unknown sampler option {dest!r}; the samplers' options are {', '.join(flags)}")
        flag = flags[dest]
        if kind not in flag.owners:
            raise RetrofitError(_foreign(kind, flag, value, flags, alternatives))
        data[dest] = flag.typed(value)
    try:
        return SAMPLERS[kind].settings_class.model_validate(data)
    except ValidationError as exc:  # named by the flag the user typed
        err = exc.errors()[0]
        where = flag_of(list(flags.values()), err["loc"])
        raise RetrofitError(f"{where} {err.get('input')}: {err['msg'].removeprefix('Value error, ').lower()}") \
            from None


def _foreign(kind: str, flag: Flag, value, flags: dict[str, Flag], alternatives: tuple[str, ...]) -> str:
    """Why an option of another sampler does not apply to ``kind``'s: the sampler's own reason where it gives one,
    else which sampler's options these are."""
    reason = SAMPLERS[kind].unsupported.get(flag.dest)
    if reason:
        return f"{flag.flag} {value}: {reason}"
    same = [f.flag for f in flags.values() if f.owners == flag.owners]
    whose = "/".join(SAMPLERS[owner].display_name for owner in flag.owners)
    verb = "is an option" if len(same) == 1 else "are options"
    named = same[0] if len(same) == 1 else f"{', '.join(same[:-1])} and {same[-1]}"
    other = next((owner for owner in flag.owners if owner in alternatives), None)
    return (f"{named} {verb} of the {whose} sampler; this run samples with {SAMPLERS[kind].display_name}'s"
            + (f" (add --sampler {other} to use {SAMPLERS[other].display_name}'s)" if other else ""))


def check_sampler_options(given: dict[str, Any]) -> None:
    """Each given option in its range for every sampler that has it (before any slow work: the model, hence its
    sampler, is not known yet)."""
    flags = {f.dest: f for f in sampler_flags()}
    for kind in SAMPLERS:
        settings_of(kind, {k: v for k, v in given.items() if v is not None and kind in flags[k].owners})
