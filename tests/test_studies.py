"""Each study's command at toy size (a few steps, one seed), its resumption, and the pieces its report stands on."""

from __future__ import annotations

import json

import pytest

from retrofit.cli import app
from retrofit.studies import STUDIES
from retrofit.studies.base import mean_spread, scale, verdict
from retrofit.studies.from_scratch import tokens_to_reach
from retrofit.studies.claims import HELD, INCONCLUSIVE, lower
from tests.helpers import REPO, one_line_error, runner


def run_toy(name: str, work, monkeypatch):
    monkeypatch.chdir(REPO)  # the studies' recipes name ../shared/data from the repository root, as users run them
    return runner.invoke(app, ["study", name, "--toy", "--work", str(work), "--studies-dir", str(REPO / "studies")])


def test_every_study_has_a_recipe_that_validates():
    assert set(STUDIES) == {"convergence", "schedules", "block-tradeoff", "from-scratch"}
    for name in STUDIES:
        recipe = REPO / "studies" / name / "recipe.yaml"
        result = runner.invoke(app, ["validate", str(recipe)])
        assert result.exit_code == 0, (name, result.output)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_each_study_runs_at_toy_size(name, tmp_path, monkeypatch):
    work = tmp_path / name
    committed = {p: p.read_bytes() for p in (REPO / "studies" / name).rglob("*") if p.is_file()}
    result = run_toy(name, work, monkeypatch)
    assert result.exit_code == 0, result.output
    assert {p: p.read_bytes() for p in committed} == committed, "a toy run never touches the committed reports"
    readme = (work / "report" / "README.md").read_text()
    runs = STUDIES[name].runs(scale(toy=True))
    for run in runs:
        record = json.loads((work / run.id / "result.json").read_text())
        assert record["variant"] == run.variant and record["seed"] == run.seed
    lines = readme.splitlines()
    tables = sum(1 for line in lines if line.startswith("|---"))
    data_rows = sum(1 for line in lines if line.startswith("|") and not line.startswith("|---")) - tables
    assert data_rows >= len({run.variant for run in runs}), "a table row for every variant"
    pngs = list((work / "report").glob("*.png"))
    assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "## Findings" in readme and "retrofit study " + name in readme
    # Its claims, judged from its own results (one seed: a difference cannot be shown), and those results kept.
    assert "## tiny vs small" in readme and ("**inconclusive**" in readme or "**did not hold**" in readme)
    kept = json.loads((work / "report" / "results.json").read_text())
    assert [r["id"] for r in kept["runs"]] == [run.id for run in runs] and kept["scale"] == "toy"
    if name == "from-scratch":  # the initialisation has the shape asked for (unknown config keys once dropped it)
        from retrofit.studies.from_scratch import TOY_DIMS
        from retrofit.tiny import tiny_shape

        config = json.loads((work / "init-seed0" / "config.json").read_text())
        assert {k: config[k] for k in tiny_shape(**TOY_DIMS)} == tiny_shape(**TOY_DIMS)


@pytest.mark.slow
def test_a_study_resumes_without_redoing_completed_runs(tmp_path, monkeypatch):
    work = tmp_path / "schedules"
    assert run_toy("schedules", work, monkeypatch).exit_code == 0
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.glob("*/result.json")}
    redo = work / STUDIES["schedules"].runs(scale(toy=True))[-1].id / "result.json"
    redo.unlink()
    result = run_toy("schedules", work, monkeypatch)
    assert result.exit_code == 0, result.output
    assert redo.is_file()
    for path, (mtime, content) in kept.items():
        if path != redo:
            assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content


def test_study_refuses_bad_input_in_one_line(tmp_path):
    assert "unknown study 'nope'" in one_line_error(runner.invoke(app, ["study", "nope"]))
    assert "--seeds 0" in one_line_error(runner.invoke(app, ["study", "convergence", "--seeds", "0"]))
    line = one_line_error(runner.invoke(app, ["study", "convergence", "--toy", "--studies-dir", str(tmp_path),
                                              "--work", str(tmp_path / "w")]))
    assert "recipe.yaml not found" in line


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [{"tokens": 0, "loss": 6.0}, {"tokens": 100, "loss": 5.0}, {"tokens": 200, "loss": 4.0}]
    assert tokens_to_reach(curve, 4.5) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 6.5) == 0.0
    assert tokens_to_reach(curve, 3.9) is None


def test_a_difference_needs_seeds_and_must_exceed_their_spread():
    assert mean_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert "one seed" in verdict([1.0], [2.0])
    assert "no difference" in verdict([0.8, 1.0, 1.2], [1.0, 1.1, 1.2])  # spreads 0.2 and 0.1
    assert verdict([0.99, 1.0, 1.01], [1.08, 1.1, 1.12]).startswith("lower by 0.100")
    # the claims' verdict is the same rule
    assert lower([1.0], [2.0]) == lower([0.8, 1.0, 1.2], [1.0, 1.1, 1.2]) == INCONCLUSIVE
    assert lower([0.99, 1.0, 1.01], [1.08, 1.1, 1.12]) == HELD != lower([1.08, 1.1, 1.12], [0.99, 1.0, 1.01])


# --- the studies at the papers' geometry: --model small -----------------------------------------------------------


def test_small_scales_the_studies_settings():
    from retrofit.studies.schedules import matched

    small = scale(toy=False, model="small")
    assert small.overrides == (f"model.source={small.model.source}",) and small.model.source.endswith("small-v1")
    assert small.model.experts == 64 and small.model.top_k == 8
    routers = [r.overrides[0] for r in STUDIES["schedules"].runs(small)]
    assert all("k_min: 4, k_max: 12" in r for r in routers)
    for name in ("linear", "linear-reverse", "cosine"):  # matched FLOPs: E[k] x factor = top-k
        k, factor = matched(name, small.model)
        assert k * factor == pytest.approx(8)
    guards = {r.params["guard"] for r in STUDIES["block-tradeoff"].runs(small) if "guard" in r.params}
    assert guards == {8, 12, 16}
    assert small.command(STUDIES["convergence"]) == "retrofit study convergence --model small"
    assert small.work_folder(STUDIES["convergence"]) == "out/studies-small/convergence/"
    assert scale(toy=True).work_folder(STUDIES["schedules"]) == "out/studies-toy/schedules/"


def test_small_must_be_built_first(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_CACHE", str(tmp_path / "cache"))
    line = one_line_error(runner.invoke(app, ["study", "schedules", "--model", "small", "--toy", "--work",
                                              str(tmp_path / "w")]))
    assert "make small" in line
    assert "--model big" in one_line_error(runner.invoke(app, ["study", "schedules", "--model", "big"]))


@pytest.mark.slow
def test_block_tradeoff_runs_on_small_at_toy_size(tmp_path, monkeypatch):
    """The 64-expert geometry end to end at toy size (a random stand-in for `make small` in the cache)."""
    from retrofit.sources import built_path
    from tests.helpers import tiny_snapshot

    monkeypatch.setenv("RETROFIT_CACHE", str(tmp_path / "cache"))
    tiny_snapshot(built_path("small"), seed=5, hidden_size=32, num_experts=64, num_experts_per_tok=8,
                  expert_intermediate_size=8)
    work = tmp_path / "block"
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["study", "block-tradeoff", "--model", "small", "--toy", "--work", str(work),
                                 "--studies-dir", str(REPO / "studies")])
    assert result.exit_code == 0, result.output
    readme = (work / "report" / "README.md").read_text()
    assert "Setup: `small` (64 experts, top-8)" in readme and "retrofit study block-tradeoff --model small" in readme
    assert json.loads((work / "p0.6-g16-seed0" / "result.json").read_text())["guard"] == 16
