"""What every study shares: its scale, its runs, and the seeds' statistics (run_study, in
:mod:`retrofit.studies.runner`, executes them).

A study is a question (``studies/<name>/README.md`` answers it), a base recipe (``studies/<name>/recipe.yaml``)
and a list of :class:`Run`: a variant (one row of the table) at one seed, as overrides of the recipe. Each run
writes ``<work>/<run id>/result.json`` once it is complete; running the study again skips completed runs and
resumes an interrupted fine-tuning from its last checkpoint, so a long study survives an interruption. The report
is rebuilt from all results at the end, and the results are kept beside it (``results.json``): the claims and the
comparison between study models are made from those (:mod:`retrofit.studies.claims`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from retrofit.studies.models import STUDY_MODELS, StudyModel


@dataclass(frozen=True)
class Scale:
    """How big a study runs: ``full`` for the committed README, ``toy`` for the test that keeps it working."""

    name: str
    seeds: int
    overrides: tuple[str, ...] = ()  # recipe overrides every fine-tuning run of the study gets
    model: StudyModel = STUDY_MODELS["tiny"]

    def command(self, study: "Study") -> str:
        """The study's command as its README states it."""
        return (f"{study.command}{'' if self.model.name == 'tiny' else ' --model ' + self.model.name}"
                f"{' --toy' if self.toy else ''}")

    def work_folder(self, study: "Study") -> str:
        """Where the command keeps its runs, relative to the repository root."""
        model = "" if self.model.name == "tiny" else f"-{self.model.name}"
        return f"out/studies{model}{'-toy' if self.toy else ''}/{study.name}/"

    @property
    def toy(self) -> bool:
        return self.name == "toy"


TOY_OVERRIDES = ("optim.max_steps=2", "optim.warmup_steps=0", "data.max_examples=32", "heldout.data.max_examples=4",
                 "heldout.every=1", "heldout.samples=1", "checkpoint.every=1", "logging.every=1")


def scale(toy: bool, seeds: int | None = None, model: str = "tiny") -> Scale:
    """``model``: a name of :data:`STUDY_MODELS`; every fine-tuning starts from it (the recipes name tiny)."""
    chosen = STUDY_MODELS[model]
    source = () if model == "tiny" else (f"model.source={chosen.source}",)
    if toy:
        return Scale("toy", seeds or 1, (*source, *TOY_OVERRIDES), chosen)
    return Scale("full", seeds or 3, source, chosen)


@dataclass(frozen=True)
class Run:
    variant: str  # one row of the study's table; the seeds of a variant are averaged
    seed: int
    overrides: tuple[str, ...] = ()
    params: dict = field(default_factory=dict, hash=False)  # anything else the study's execute() reads

    @property
    def id(self) -> str:
        return f"{self.variant}-seed{self.seed}"


class Study:
    """One study: subclasses name it, list its runs, execute one, and write the README from all results."""

    name: str = ""
    title: str = ""
    command: str = ""  # the exact command, as the README states it

    def runs(self, scale: Scale) -> list[Run]:
        raise NotImplementedError

    def execute(self, run: Run, study_dir: Path, work: Path, scale: Scale, progress: Callable) -> dict:
        raise NotImplementedError

    def report(self, results: dict[str, dict], runs: list[Run], out: Path, scale: Scale) -> Path:
        raise NotImplementedError

    def claims(self, results: dict[str, dict], runs: list[Run], scale: Scale) -> list:
        """The claims this study tests (:class:`retrofit.studies.claims.Claim`), judged from its results: the
        same list, in the same order, at every scale and model."""
        raise NotImplementedError


def by_variant(results: dict[str, dict], runs: list[Run]) -> dict[str, list[dict]]:
    """Results grouped by variant, in the order the study lists its runs."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(run.variant, []).append(results[run.id])
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float], digits: int = 3) -> str:
    """``mean ± std (n)`` of the seeds, or the one value."""
    mean, std = mean_spread(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def beyond_spread(a: list[float], b: list[float]) -> bool | None:
    """The studies' one rule for a difference between two sets of seeds: their means lie further apart than the
    larger seed spread. None when neither side has two seeds to give a spread (one seed never decides)."""
    if max(len(a), len(b)) < 2:
        return None
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    return abs(ma - mb) > max(sa, sb)


def verdict(a: list[float], b: list[float]) -> str:
    """Whether the seeds ``a`` end lower than ``b``, in words (:func:`beyond_spread`)."""
    beyond = beyond_spread(a, b)
    if beyond is None:
        return "one seed, no spread to judge the difference by"
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    noise = max(sa, sb)
    if not beyond:
        return f"no difference beyond the seeds' spread ({noise:.3f})"
    return f"{'lower' if ma < mb else 'higher'} by {abs(ma - mb):.3f}, more than the seeds' spread ({noise:.3f})"


def seeds_text(n: int) -> str:
    """The seeds a study ran, as its README states them (``optim.seed`` 0..n-1)."""
    return "seed 0" if n == 1 else f"{n} seeds (optim.seed 0 to {n - 1})"
