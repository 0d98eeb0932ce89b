"""The papers' claims judged at each study model's size.

Each study states its claims from its own results (:meth:`Study.claims`: a verdict and the numbers it rests on).
Every full report keeps its runs' results beside its README (``results.json``), so that the "tiny vs small"
section of the study READMEs and the main README's summary are made from the results of both sizes, not copied by
hand. ``python -m retrofit.studies.claims [--write README.md]`` prints (or writes) the summary table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from retrofit.io.writer import atomic_file
from retrofit.studies.base import Run, Scale, Study, beyond_spread, mean_spread, scale
from retrofit.studies.models import STUDY_MODELS

RESULTS_FILE = "results.json"
HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
SECTION = "<!-- sizes -->"  # encloses the "tiny vs small" section of a study README
SUMMARY = "<!-- claims -->"  # encloses the summary table in the main README


@dataclass(frozen=True)
class Claim:
    source: str  # whose claim: the paper, or retrofit for its own options
    claim: str  # as the source makes it, in one line
    verdict: str  # HELD, NOT_HELD or INCONCLUSIVE
    measured: str  # the numbers the verdict rests on

    @property
    def cell(self) -> str:
        """The verdict and its numbers, as one table cell."""
        return f"**{self.verdict}**: {self.measured}"


def lower(a: list[float], b: list[float]) -> str:
    """Whether ``a`` is lower than ``b`` (the claim), by the studies' rule for a difference
    (:func:`~retrofit.studies.base.beyond_spread`); inconclusive where the rule sees none."""
    if not beyond_spread(a, b):
        return INCONCLUSIVE
    return HELD if mean_spread(a)[0] < mean_spread(b)[0] else NOT_HELD


# --- results beside each report ------------------------------------------------------------------------------------


def save_results(out: Path, study: Study, results: dict[str, dict], runs: list[Run], size: Scale) -> Path:
    """Every run's result, in the study's order, as ``out/results.json`` (what the report was made from)."""
    record = {"study": study.name, "model": size.model.name, "scale": size.name,
              "runs": [{"id": run.id, "variant": run.variant, "seed": run.seed, "overrides": list(run.overrides),
                        "params": run.params, "result": results[run.id]} for run in runs]}
    path = out / RESULTS_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_results(path: Path) -> tuple[dict[str, dict], list[Run], Scale]:
    """The results, runs and scale a report was made from."""
    record = json.loads(path.read_text())
    runs = [Run(r["variant"], r["seed"], tuple(r["overrides"]), r["params"]) for r in record["runs"]]
    results = {r["id"]: r["result"] for r in record["runs"]}
    seeds = max(run.seed for run in runs) + 1
    return results, runs, scale(record["scale"] == "toy", seeds, record["model"])


def claims_by_model(study: Study, study_dir: Path) -> dict[str, list[Claim]]:
    """Each study model's claims from the results its full report left (a model not run yet is absent)."""
    found = {}
    for name, model in STUDY_MODELS.items():
        path = study_dir / model.folder / RESULTS_FILE
        if path.is_file():
            found[name] = study.claims(*load_results(path))
    return found


# --- the study READMEs' "tiny vs small" section ---------------------------------------------------------------------


def _model_column(name: str) -> str:
    model = STUDY_MODELS[name]
    return f"`{name}` ({model.experts} experts, top-{model.top_k})"


def section(study: Study, by_model: dict[str, list[Claim]]) -> list[str]:
    """The section: each claim's verdict and numbers at every size run, then what changed with the size."""
    names = list(by_model)
    lines = [SECTION, f"## {' vs '.join(STUDY_MODELS)}", ""]
    missing = [n for n in STUDY_MODELS if n not in by_model]
    if missing:
        lines += [f"Not run yet at {', '.join(missing)}: `{study.command} --model {missing[0]}` adds "
                  f"{'it' if len(missing) == 1 else 'them'} here.", ""]
    lines += ["| claim | " + " | ".join(map(_model_column, names)) + " |", "|---|" + "---|" * len(names)]
    first = by_model[names[0]]
    for i, claim in enumerate(first):
        cells = [by_model[n][i].cell for n in names]
        lines.append(f"| {claim.source}: {claim.claim} | " + " | ".join(cells) + " |")
    if len(names) > 1:
        lines.append("")
        for i, claim in enumerate(first):
            verdicts = [by_model[n][i].verdict for n in names]
            if len(set(verdicts)) == 1:
                lines.append(f"- {claim.claim} The same at {'both sizes' if len(names) == 2 else 'every size'}: "
                             f"{verdicts[0]}.")
            else:
                lines.append(f"- {claim.claim} Changed with the size: "
                             + ", ".join(f"{v} at `{n}`" for n, v in zip(names, verdicts)) + ".")
    return [*lines, "", SECTION]


def _between(text: str, marker: str, block: str) -> str:
    """``text`` with what its two ``marker`` lines enclose replaced by ``block`` (markers included in it)."""
    head, _, rest = text.partition(marker)
    return head + block + rest.partition(marker)[2]


def write_section(readme: Path, lines: list[str]) -> None:
    """Put ``lines`` in place of the README's section (after its last line when it has none)."""
    text = readme.read_text()
    block = "\n".join(lines)
    text = _between(text, SECTION, block) if SECTION in text else text.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_file(readme) as tmp:
        tmp.write_text(text)


def refresh_sections(study: Study, study_dir: Path) -> None:
    """The section of every model's README of this study, from every model's results."""
    by_model = claims_by_model(study, study_dir)
    if not by_model:
        return
    lines = section(study, by_model)
    for name in by_model:
        readme = study_dir / STUDY_MODELS[name].folder / "README.md"
        if readme.is_file():
            write_section(readme, lines)


# --- the main README's summary --------------------------------------------------------------------------------------


def summary_table(studies_dir: Path) -> str:
    """Markdown: every study's claims, with the verdict at each size, linked to the study README."""
    from retrofit.studies import STUDIES

    lines = ["| study | claim | " + " | ".join(map(_model_column, STUDY_MODELS)) + " |",
             "|---|---|" + "---|" * len(STUDY_MODELS)]
    for name, study in STUDIES.items():
        by_model = claims_by_model(study, studies_dir / name)
        if not by_model:
            continue
        for i, claim in enumerate(next(iter(by_model.values()))):
            cells = [by_model[m][i].cell if m in by_model else "not run" for m in STUDY_MODELS]
            lines.append(f"| [{name}](studies/{name}/README.md) | {claim.source}: {claim.claim} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(readme: Path, studies_dir: Path) -> None:
    text = readme.read_text()
    if text.count(SUMMARY) != 2:
        raise SystemExit(f"{readme}: needs two {SUMMARY} lines around the summary table")
    text = _between(text, SUMMARY, f"{SUMMARY}\n{summary_table(studies_dir)}\n{SUMMARY}")
    with atomic_file(readme) as tmp:
        tmp.write_text(text)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--write"] and len(argv) == 2:
        write_summary(Path(argv[1]), Path("studies"))
    elif not argv:
        print(summary_table(Path("studies")))
    else:
        raise SystemExit("usage: python -m retrofit.studies.claims [--write README.md]  (from the repository root)")


if __name__ == "__main__":
    main(sys.argv[1:])
