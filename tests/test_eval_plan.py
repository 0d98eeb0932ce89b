"""`retrofit eval` counts its requests and forwards before it loads the model, and the run takes that many."""

from __future__ import annotations

import pytest

from retrofit.eval.adapter import RetrofitLM, resolve_run
from retrofit.eval.estimate import plan_run, total
from retrofit.eval.runner import prepared_tasks, run_eval
from tests.helpers import one_line_error, runner

OPTIONS = {"gen_length": 8, "steps": 4, "denoise_block": 4}


@pytest.mark.parametrize("extra", [{}, {"cache": "prefix", "cache_refresh": 2}])
def test_the_planned_forwards_are_the_forwards_run(shared_data, extra):
    tasks = ["gsm8k", "arc", "mmlu"] if not extra else ["gsm8k"]  # the cache changes generation only
    with prepared_tasks(tasks, shared_data) as prepared:
        plans = plan_run(resolve_run("tiny", None, {**OPTIONS, **extra}), prepared, 2, 6, 4)
        lm = RetrofitLM("tiny", mc_num=6, batch_size=4, progress=False, **OPTIONS, **extra)
        full, cached = [], []
        lm.model.register_forward_pre_hook(
            lambda module, args, kwargs: (cached if kwargs.get("compute") else full).append(1), with_kwargs=True)
        run_eval(lm, tasks, limit=2, prepared=prepared)
    planned = total(plans)
    assert plans[0].name == "gsm8k" and plans[0].requests == {"generate_until": 2}
    if not extra:
        assert [p.name for p in plans[1:]] == ["arc_challenge", "arc_easy", "mmlu"]
        assert plans[3].requests == {"loglikelihood": 57 * 2 * 4}
    assert (len(full), len(cached)) == (planned.full, planned.cached) and not planned.at_most
    # One batch of two prompts, two blocks of two steps: each block a refresh and one cached step.
    assert planned.cached == (2 if extra else 0)


def test_eval_prints_the_plan_before_loading(shared_data, tmp_path):
    result = runner.invoke(__import__("retrofit.cli", fromlist=["app"]).app, [
        "eval", "--model", "tiny", "--tasks", "gsm8k", "--limit", "3", "--data-dir", str(shared_data),
        "--gen-length", "8", "--threshold", "0.9", "--no-figures", "--output", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "gsm8k: 3 generation requests → at most 8 forwards" in result.output
    assert "in all: at most 8 forwards, up to 8 sequences each" in result.output


def test_a_task_lm_eval_cannot_read_fails_before_the_load_in_one_line(tmp_path):
    line = one_line_error(runner.invoke(__import__("retrofit.cli", fromlist=["app"]).app, [
        "eval", "--model", "tiny", "--tasks", "gsm8k", "--no-figures", "--output", str(tmp_path / "e.json")]))
    assert line.startswith("error: lm-eval failed on gsm8k: ") and "give --data-dir" in line
