"""The studies' claims: each verdict from the numbers, the results kept beside the reports, the "tiny vs small"
section and the main README's summary made from them (and kept equal to what is committed)."""

from __future__ import annotations

import pytest

from retrofit.studies import STUDIES
from retrofit.studies.base import Run, scale
from retrofit.studies.claims import (HELD, INCONCLUSIVE, NOT_HELD, SECTION, SUMMARY, Claim, claims_by_model, load_results,
                                     lower, save_results, section, summary_table, write_section)
from retrofit.studies.models import STUDY_MODELS
from tests.helpers import REPO


def test_lower_needs_a_difference_beyond_the_seeds_spread():
    assert lower([1.0, 1.1, 0.9], [2.0]) == HELD
    assert lower([2.0, 2.1, 1.9], [1.0]) == NOT_HELD
    assert lower([1.0, 1.2, 0.8], [1.1, 1.1, 1.1]) == INCONCLUSIVE  # 0.1 apart, spread 0.2
    assert lower([1.0], [2.0]) == INCONCLUSIVE  # one seed each: no spread to judge by


def curve(*losses, step=50, tokens=1000):
    return [{"step": i * step, "tokens": i * tokens, "loss": loss, "train_s": i} for i, loss in enumerate(losses)]


def runs_and_results(rows: dict[str, list[dict]]):
    """Runs (variant, seed) and their results from {variant: [result per seed]}."""
    runs = [Run(variant, seed) for variant, seeds in rows.items() for seed in range(len(seeds))]
    results = {Run(v, i).id: r for v, seeds in rows.items() for i, r in enumerate(seeds)}
    return results, runs


def test_from_scratch_claim_is_paired_by_initialisation():
    study, size = STUDIES["from-scratch"], scale(False, 3, "small")
    tc = [{"curve": curve(7.0, 5.0 + d)} for d in (0.0, 0.3, -0.2)]
    faster = [{"curve": curve(7.0, 4.9 + d)} for d in (0.0, 0.3, -0.2)]  # 0.1 lower in every pair
    claim, = study.claims(*runs_and_results({"tc+balance": tc, "ec": faster}), size)
    assert claim.verdict == HELD and "-0.100 ± 0.000" in claim.measured and "3 of 3" in claim.measured
    mixed = [{"curve": curve(7.0, 5.0 + d)} for d in (0.1, 0.2, -0.3)]
    assert study.claims(*runs_and_results({"tc+balance": tc, "ec": mixed}), size)[0].verdict == INCONCLUSIVE


def test_schedules_claim_compares_linear_reverse_with_the_best_other_schedule():
    study, size = STUDIES["schedules"], scale(False, 2, "small")
    finals = {"constant": (4.20, 4.21), "linear": (4.30, 4.31), "linear-reverse": (4.10, 4.11), "cosine": (4.15, 4.16)}
    rows = {v: [{"curve": curve(5.0, x)} for x in xs] for v, xs in finals.items()}
    claim, = study.claims(*runs_and_results(rows), size)
    assert claim.verdict == HELD and "ranked 1 of 4" in claim.measured and "runner-up cosine" in claim.measured
    rows["cosine"] = [{"curve": curve(5.0, x)} for x in (4.00, 4.01)]
    claim, = study.claims(*runs_and_results(rows), size)
    assert claim.verdict == NOT_HELD and "ranked 2 of 4" in claim.measured and "best cosine" in claim.measured


def test_convergence_claims_reach_within_the_spread():
    study, size = STUDIES["convergence"], scale(False, 2, "tiny")
    rows = {"tc": [{"curve": curve(4.0, 4.01)}] * 2, "ec": [{"curve": curve(4.5, x)} for x in (4.3, 4.31)],
            "ec+distill": [{"curve": curve(4.5, x)} for x in (4.2, 4.21)],
            "ec+lora": [{"curve": curve(4.5, x)} for x in (4.1, 4.11)],
            "ec+lora+distill": [{"curve": curve(4.5, x)} for x in (3.99, 4.02)]}  # 4.005 ± 0.021: within
    reach, distill = study.claims(*runs_and_results(rows), size)
    assert reach.verdict == HELD and "ec+lora+distill" in reach.measured and "99% of the 0.500" in reach.measured
    assert distill.verdict == HELD
    rows["ec+lora+distill"] = [{"curve": curve(4.5, x)} for x in (4.2, 4.21)]
    reach, distill = study.claims(*runs_and_results(rows), size)
    assert reach.verdict == NOT_HELD and distill.verdict == NOT_HELD and "ec+lora" in reach.measured


def test_block_claims_need_three_times_fewer_experts_and_half_the_gap_back():
    study, size = STUDIES["block-tradeoff"], scale(False, 2, "small")
    runs = [Run("tc", 0), Run("p0.6-g16", 0, params={"p": 0.6, "guard": 16}),
            Run("p0.6-g8", 0, params={"p": 0.6, "guard": 8})]
    results = {"tc-seed0": {"loss": 4.0, "unique_per_block": 48.0},
               "p0.6-g16-seed0": {"loss": 4.04, "unique_per_block": 16.0, "p": 0.6, "guard": 16},  # 3x, +1%
               "p0.6-g8-seed0": {"loss": 4.4, "unique_per_block": 8.0, "p": 0.6, "guard": 8}}
    for seed, loss in enumerate((4.1, 4.14)):  # from +10% to +3%: 70% of the gap, beyond the spread
        runs.append(Run("p0.6-g8-routers", seed, params={"p": 0.6, "guard": 8, "mode": "routers"}))
        results[f"p0.6-g8-routers-seed{seed}"] = {"loss": loss, "unique_per_block": 8.0, "p": 0.6, "guard": 8,
                                                  "mode": "routers"}
    core, tuning = study.claims(results, runs, size)
    assert core.verdict == HELD and "p 0.6, guard 16: 3.00x fewer" in core.measured
    assert tuning.verdict == HELD and "+10.0% → +3.0% of TC's loss, 70% of the gap" in tuning.measured
    results["p0.6-g16-seed0"]["loss"] = 4.2  # +5%: no setting gives 3x within 2%
    core, _ = study.claims(results, runs, size)
    assert core.verdict == NOT_HELD and "3x fewer costs +5.0% at best" in core.measured


def test_section_says_what_changed_with_the_size(tmp_path):
    study = STUDIES["schedules"]
    tiny = [Claim("EC-DLM", "A is best.", INCONCLUSIVE, "x 1.0"), Claim("EC-DLM", "B helps.", HELD, "y 2.0")]
    small = [Claim("EC-DLM", "A is best.", HELD, "x 0.9"), Claim("EC-DLM", "B helps.", HELD, "y 1.0")]
    lines = section(study, {"tiny": tiny, "small": small})
    text = "\n".join(lines)
    assert lines[0] == lines[-1] == SECTION and "## tiny vs small" in text
    assert "| EC-DLM: A is best. | **inconclusive**: x 1.0 | **held**: x 0.9 |" in text
    assert "- A is best. Changed with the size: inconclusive at `tiny`, held at `small`." in text
    assert "- B helps. The same at both sizes: held." in text
    alone = "\n".join(section(study, {"tiny": tiny}))
    assert "Not run yet at small: `retrofit study schedules --model small` adds it here." in alone

    readme = tmp_path / "README.md"
    readme.write_text("# Study\n\nbody\n")
    write_section(readme, lines)
    write_section(readme, section(study, {"tiny": tiny}))  # replaced, not appended twice
    written = readme.read_text()
    assert written.startswith("# Study\n\nbody\n\n") and written.count(SECTION) == 2 and "Not run yet" in written


def test_results_round_trip_gives_the_same_claims(tmp_path):
    study, size = STUDIES["from-scratch"], scale(False, 2, "small")
    results, runs = runs_and_results({"tc+balance": [{"curve": curve(7.0, 5.0)}, {"curve": curve(7.0, 5.2)}],
                                      "ec": [{"curve": curve(7.0, 4.8)}, {"curve": curve(7.0, 5.0)}]})
    save_results(tmp_path, study, results, runs, size)
    loaded, loaded_runs, loaded_size = load_results(tmp_path / "results.json")
    assert loaded == results and loaded_runs == runs and loaded_size.model.name == "small"
    assert study.claims(loaded, loaded_runs, loaded_size) == study.claims(results, runs, size)


# --- what is committed: the READMEs' sections and summary equal what the results give -------------------------------


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_committed_study_sections_follow_their_results(name):
    by_model = claims_by_model(STUDIES[name], REPO / "studies" / name)
    expected = "\n".join(section(STUDIES[name], by_model)) if by_model else None
    for model in by_model:
        readme = (REPO / "studies" / name / STUDY_MODELS[model].folder / "README.md").read_text()
        assert expected in readme, f"studies/{name}: rerun `retrofit study {name}` to refresh the README"


def test_readme_summary_is_the_committed_results_table():
    text = (REPO / "README.md").read_text()
    assert text.count(SUMMARY) == 2
    assert text.split(SUMMARY)[1].strip() == summary_table(REPO / "studies"), (
        "README out of date: python -m retrofit.studies.claims --write README.md")
