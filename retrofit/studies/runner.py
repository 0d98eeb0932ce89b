"""A study's execution: every run not yet complete (a study resumes where it stopped), then its report, its
results kept beside it and the claims sections made from them (:mod:`retrofit.studies.claims`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from retrofit.errors import RetrofitError
from retrofit.io.writer import atomic_file
from retrofit.studies import claims
from retrofit.studies.base import Scale, Study

RESULT_FILE = "result.json"


def run_study(study: Study, study_dir: Path, work: Path, out: Path, scale: Scale,
              progress: Callable | None = None) -> Path:
    """Every run not yet complete, then the report into ``out``. ``progress(done, total, run, detail)``."""
    recipe = study_dir / "recipe.yaml"
    if not recipe.is_file():
        raise RetrofitError(f"study {study.name}: {recipe} not found (run from the repository root, or pass "
                            "--studies-dir)")
    runs = study.runs(scale)
    results = {}
    for i, run in enumerate(runs):
        path = work / run.id / RESULT_FILE
        if path.is_file():  # completed before: a study resumes where it stopped
            results[run.id] = json.loads(path.read_text())
            continue

        def step(detail: str, i=i, run=run) -> None:
            if progress:
                progress(i, len(runs), run, detail)

        step("starting")
        result = study.execute(run, study_dir, work / run.id, scale, step)
        result.update(variant=run.variant, seed=run.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        results[run.id] = result
    if progress:
        progress(len(runs), len(runs), None, "report")
    readme = study.report(results, runs, out, scale)
    claims.save_results(out, study, results, runs, scale)
    if scale.toy:  # a toy report stands alone: its own claims only, never the committed READMEs
        claims.write_section(readme, claims.section(study, {scale.model.name: study.claims(results, runs, scale)}))
    else:
        claims.refresh_sections(study, study_dir)
    return readme
