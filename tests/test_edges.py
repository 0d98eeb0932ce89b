"""Edges (issue 11): leftovers of killed runs, inputs that cannot work refused up front by name, messages that
say what happened."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from retrofit.cli import app
from retrofit.training.checkpoints import latest_checkpoint
from tests.helpers import REPO, one_line_error, runner, write_arc_mmlu, write_recipe


def convert(src, out, *extra):
    return runner.invoke(app, ["convert", "--src", str(src), "--router", "ec", "--out", str(out), *extra])


def test_a_killed_write_leaves_nothing_the_next_run_keeps(tiny_dir, tmp_path, caplog):
    stale = tmp_path / ".ec.partial-abc123"
    stale.mkdir()
    (stale / "model-00001-of-00004.safetensors").write_bytes(b"x" * 1000)
    unrelated = tmp_path / ".other.partial-zzz"
    unrelated.mkdir()
    with caplog.at_level(logging.WARNING, logger="retrofit"):
        assert convert(tiny_dir, tmp_path / "ec").exit_code == 0
    assert not stale.exists() and unrelated.exists(), "only leftovers of this output are ours"
    assert any(".ec.partial-abc123" in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)


def test_mask_id_outside_the_vocabulary_is_refused_by_name(tiny_dir, tmp_path):
    (tiny_dir / "tokenizer.json").unlink()  # the default mask id (156895) then lies outside 320 tokens
    line = one_line_error(convert(tiny_dir, tmp_path / "ec", "--no-verify"))
    assert "156895" in line and "outside the vocabulary of 320" in line and "tokenizer.json" in line
    assert not (tmp_path / "ec").exists()


def test_seq_len_beyond_the_models_positions_is_refused_before_loading(tiny_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_dir, data={"seq_len": 4096})
    line = one_line_error(runner.invoke(app, ["finetune", str(path)]))
    assert "data.seq_len 4096 exceeds the model's max_position_embeddings (1024)" in line


def test_a_non_finite_source_is_named_as_the_source(tiny_dir, tmp_path):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    shard = tiny_dir / index[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    line = one_line_error(convert(tiny_dir, tmp_path / "ec"))
    assert "holds NaN or inf values in model.layers.0.mlp.experts.up_proj" in line and "differs" not in line


def test_convert_says_what_a_logit_difference_means(tiny_dir, tmp_path):
    result = convert(tiny_dir, tmp_path / "ec")
    assert result.exit_code == 0 and "expected: the routing changed" in result.output


def test_outputs_carry_no_auto_map_in_the_tokenizer_config(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert convert(tiny_dir, tmp_path / "ec").exit_code == 0
    written = json.loads((tmp_path / "ec" / "tokenizer_config.json").read_text())
    assert "auto_map" not in written and written["mask_token"] == config["mask_token"]


def test_validate_checks_a_local_model_source(tiny_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_dir)
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0
    line = one_line_error(runner.invoke(app, ["validate", str(path), "model.source=/does/not/exist"]))
    assert "model.source not found: /does/not/exist" in line


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_below_one_is_refused_before_loading(limit):
    line = one_line_error(runner.invoke(app, ["eval", "--model", "./missing-model", "--tasks", "gsm8k",
                                              "--limit", limit]))
    assert f"--limit {limit}: must be at least 1" in line


def test_tiny_pretrain_recipe_matches_the_shipped_record():
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-pretrain.yaml").read_text())
    record = json.loads((REPO / "retrofit" / "assets" / "tiny" / "training.json").read_text())
    assert recipe["optim"]["max_steps"] == record["steps"]


def test_ctrl_c_during_finetune_points_to_resume(tiny_dir, tmp_path, monkeypatch):
    import retrofit.training.trainer as trainer

    real = trainer.Finetune.train_step

    def interrupt_at_step_6(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(trainer.Finetune, "train_step", interrupt_at_step_6)
    path = write_recipe(tmp_path, tiny_dir)
    finished = ["optim.max_steps=4", "checkpoint.every=2"]  # the recipe's own output_dir: a finished other run
    assert runner.invoke(app, ["finetune", str(path), *finished]).exit_code == 0
    other = tmp_path / "my run"
    overrides = [f"checkpoint.output_dir={other}", "checkpoint.every=2"]
    result = runner.invoke(app, ["finetune", str(path), *overrides])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "step 4" in line and str(other) in line
    # The printed command, run as printed, continues the interrupted run (not the recipe's finished one).
    printed = shlex.split(line.split("`")[1])
    assert printed[:2] == ["retrofit", "finetune"] and printed[-1] == "--resume"
    monkeypatch.setattr(trainer.Finetune, "train_step", real)
    resumed = runner.invoke(app, printed[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "8 steps" in resumed.output and str(other) in resumed.output.replace("\n", "")
    assert latest_checkpoint(other).name == "step-000012"


def test_resume_with_another_recipe_is_refused_and_a_finished_run_says_so(tiny_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_dir, optim={"max_steps": 4})
    assert runner.invoke(app, ["finetune", str(path)]).exit_code == 0
    line = one_line_error(runner.invoke(app, ["finetune", str(path), "data.seq_len=32", "--resume"]))
    assert "another recipe" in line and "data.seq_len: 64 -> 32" in line
    again = runner.invoke(app, ["finetune", str(path), "--resume"])
    assert again.exit_code == 0 and "already finished its 4 steps" in again.output
    longer = runner.invoke(app, ["finetune", str(path), "optim.max_steps=6", "--resume"])  # may run longer
    assert longer.exit_code == 0 and "2 steps" in longer.output


def _read_only(monkeypatch, folder: Path):
    """A read-only location as the OS reports it (tests run as root, which chmod would not stop)."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))


def test_unwritable_destinations_fail_up_front_in_one_line(tiny_dir, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    assert "is not writable" in one_line_error(convert(tiny_dir, locked / "ec"))
    path = write_recipe(tmp_path, tiny_dir, checkpoint={"output_dir": str(locked / "run")})
    assert "checkpoint.output_dir" in one_line_error(runner.invoke(app, ["finetune", str(path)]))
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--limit", "1",
                                              "--output", str(locked / "e.json")]))
    assert "cannot write the results into" in line


def test_eval_prints_its_results_before_a_failed_write(tiny_dir, tmp_path, monkeypatch, shared_data):
    import retrofit.eval.runner as runner_module

    real = runner_module.Path.write_text

    def full_disk(self, *args, **kwargs):  # only the results file meets a full disk
        if self.name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Path, "write_text", full_disk)
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--limit", "1", "--data-dir",
                                 str(shared_data), "--gen-length", "8", "--steps", "2", "--denoise-block", "8",
                                 "--output", str(tmp_path / "e.json")])
    assert result.exit_code == 1 and "exact_match" in result.output
    assert "No space left on device; the table above holds them" in result.output
    assert not list(tmp_path.glob("e.json*"))


@pytest.mark.parametrize("content, message", [("", "is empty"),
                                              ('{"question": "a", "answer": "b"}\n{"question": "c",\n',
                                               "data.jsonl:2: not valid JSON")])
def test_bad_data_files_are_named_with_the_line(tiny_dir, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    path = write_recipe(tmp_path, tiny_dir, data={"path": str(data)})
    assert message in one_line_error(runner.invoke(app, ["finetune", str(path)]))


def test_a_truncated_shard_is_named_by_its_source_path(tiny_dir, tmp_path):
    shard = sorted(tiny_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = one_line_error(convert(tiny_dir, tmp_path / "ec"))
    assert str(shard) in line and "partial" not in line


def test_eval_contexts_are_cut_to_the_models_own_length(tiny_dir, caplog):
    from retrofit.eval.adapter import RetrofitLM

    lm = RetrofitLM(str(tiny_dir), max_length=4096, progress=False)
    assert lm.max_length == 1024 == lm.model.config.max_position_embeddings
    with caplog.at_level(logging.WARNING):
        ctx, cont = lm.encode_pair("x" * 5000, " y")
    assert len(ctx) + len(cont) == 1024 and not caplog.records


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import retrofit.io.model_dir as model_dir

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_dir, "save_tensors", full)  # router.safetensors is the one file convert writes
    line = one_line_error(convert(tiny_dir, tmp_path / "ec"))
    assert "the disk is full; nothing was kept" in line
    assert not (tmp_path / "ec").exists() and not list(tmp_path.glob(".ec.*"))


@pytest.mark.slow
def test_an_unknown_task_is_refused_before_the_model_loads(shared_data):
    line = one_line_error(runner.invoke(app, ["eval", "--model", "./no-such-model", "--tasks", "gsm8k,nosuchtask",
                                              "--data-dir", str(shared_data)]))
    assert "unknown task 'nosuchtask'" in line


def test_offline_task_files_for_lm_eval(tmp_path, shared_data):
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    result = runner.invoke(app, ["eval", "--tasks", "gsm8k,arc", "--data-dir", str(shared_data), "--write-tasks",
                                 str(folder)])
    assert result.exit_code == 0, result.output
    assert "lm_eval --model retrofit" in result.output and "--include_path" in result.output
    known = set(TaskManager(include_path=str(folder), include_defaults=False).all_tasks)
    assert {"retrofit_gsm8k", "retrofit_arc_challenge", "retrofit_arc_easy"} <= known
    assert "needs --data-dir" in one_line_error(runner.invoke(app, ["eval", "--tasks", "gsm8k", "--write-tasks",
                                                                    str(folder)]))


def test_mmlu_is_one_row_unless_per_subject():
    from retrofit.cli import _results_table

    record = {"model": "m", "router": {"type": "tc"},
              "results": {"mmlu": {"acc": 0.3, "num_fewshot": 5}, "mmlu_anatomy": {"acc": 0.2, "num_fewshot": 5}}}
    assert _results_table(record).row_count == 1
    assert _results_table(record, per_subject=True).row_count == 2


def test_progress_reaches_a_log_file(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_PROGRESS_SECONDS", "0")
    path = write_recipe(tmp_path, tiny_dir)
    result = runner.invoke(app, ["finetune", str(path), "optim.max_steps=3"])  # CliRunner output is no terminal
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("finetune steps:")]
    assert lines[0] == "finetune steps: 3 to do" and lines[-1].startswith("finetune steps: 3/3, loss ")
    assert any("ETA" in line for line in lines[1:-1])


def test_demo_table_reads_at_80_columns():
    from rich.console import Console

    from retrofit.tools.demo import table

    row = {"results": {"gsm8k": {"exact_match[flexible-extract]": 0.125}, "arc_challenge": {"acc": 0.25},
                       "arc_easy": {"acc": 0.5}, "mmlu": {"acc": 0.283}},
           "heldout_loss": 4.458, "unique_experts": 8.0, "unique_experts_per_block": 7.33, "tokens_per_s": 123.0}
    console = Console(width=80, record=True)
    console.print(table({"TC (checkpoint)": row, "block (32, guard 2)": row}, ["gsm8k", "arc", "mmlu"]))
    text = console.export_text()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    assert "block (32, guard 2)" in text and "123" in text


def test_ctrl_c_at_start_up_is_one_line(monkeypatch, capsys):
    import retrofit.cli as cli
    import retrofit_command

    def interrupted(name):  # Ctrl-C while the command's modules import
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "command", interrupted)
    monkeypatch.setattr("sys.argv", ["retrofit", "convert", "--help"])
    with pytest.raises(SystemExit) as stop:
        retrofit_command.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_eval_says_that_limit_counts_per_mmlu_subject(tiny_dir, tmp_path):
    data = write_arc_mmlu(tmp_path / "data")
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "mmlu", "--limit", "1", "--mc-num", "2",
                                 "--data-dir", str(data), "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "--limit 1 applies per MMLU subject" in result.output
    assert "mmlu_anatomy" not in result.output, "one MMLU row in the table"


def test_lm_evals_per_subject_fewshot_notice_is_filtered():
    from retrofit.eval.runner import _asked_for_fewshot

    def record(message, *args):
        return logging.LogRecord("lm_eval.evaluator", logging.WARNING, __file__, 1, message, args, None)

    assert not _asked_for_fewshot(record("Overwriting default num_fewshot of %s from %s to %s", "mmlu_x", None, 5))
    assert _asked_for_fewshot(record("something else went wrong"))


def test_lm_evals_own_bars_and_git_lookup_stay_out_of_the_output(tiny_dir, tmp_path, monkeypatch, capfd):
    data = write_arc_mmlu(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` would print "fatal: ..."
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "mmlu", "--limit", "1", "--mc-num",
                                 "2", "--data-dir", str(data), "--no-figures", "--output", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "it/s]" not in result.output
    assert "fatal" not in capfd.readouterr().err  # git's own stderr goes to the process's file descriptor 2


def test_a_full_disk_at_export_says_the_checkpoints_are_kept(tiny_dir, tmp_path, monkeypatch):
    import retrofit.io.model_dir as model_dir

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_dir, "save_tensors", full)  # router.safetensors: written by the export only
    path = write_recipe(tmp_path, tiny_dir, optim={"max_steps": 2}, checkpoint={"every": 1})
    result = runner.invoke(app, ["finetune", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "the disk is full" in line and "nothing was kept" not in line and "checkpoints" in line
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    monkeypatch.undo()
    again = runner.invoke(app, ["finetune", str(path), "--resume"])  # what the message says to do
    assert again.exit_code == 0 and "exported again" in again.output
    assert (tmp_path / "run" / "config.json").is_file()


@pytest.mark.slow
def test_the_printed_lm_eval_line_runs_as_printed(tiny_dir, tmp_path, shared_data):
    import subprocess
    import sys

    folder = tmp_path / "tasks"
    result = runner.invoke(app, ["eval", "--tasks", "arc", "--model", str(tiny_dir), "--data-dir", str(shared_data),
                                 "--write-tasks", str(folder)])
    assert result.exit_code == 0, result.output
    printed = shlex.split(next(line for line in result.output.splitlines() if line.startswith("run: "))[5:])
    assert printed[0] == "lm_eval" and f"pretrained={tiny_dir}" in printed
    lm_eval = Path(sys.executable).with_name("lm_eval")
    done = subprocess.run([str(lm_eval), *printed[1:], "--limit", "1"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # another directory: the task files hold absolute paths
    assert done.returncode == 0, done.stderr[-2000:]
    assert "arc_challenge" in done.stdout and "arc_easy" in done.stdout and "|acc" in done.stdout
