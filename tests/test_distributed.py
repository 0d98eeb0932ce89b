"""Several processes on CPU (gloo), started the way users start them: `accelerate launch --num_processes 2 -m
retrofit ...`. Two processes must compute what one does: the same router weights from the same global batch, a
resumption with another process count, the same evaluation scores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, gsm8k_train, shared_data_dir, write_recipe

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retrofit(*args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m retrofit ARGS`, or under `accelerate launch` with ``processes`` processes; one thread each, so
    one and two processes multiply matrices alike."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RETROFIT_PROGRESS_SECONDS": "3600"}
    if processes == 1:
        command = [sys.executable, "-m", "retrofit", *args]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                   "-m", "retrofit", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path, Path("tiny"), objective={"z_loss": 1e-3, "distill": {"weight": 1.0}},
                        optim={"lr": 0.01, "max_steps": 8, "batch_size": 4, "warmup_steps": 0,
                               "schedule": "constant"},
                        data={"path": str(gsm8k_train()), "max_examples": 64, "seq_len": 48},
                        checkpoint={"every": 4})


def routers(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "router.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_routers(a: Path, b: Path) -> None:
    ra, rb = routers(a), routers(b)
    assert ra.keys() == rb.keys() and ra
    for name in ra:
        assert torch.allclose(ra[name], rb[name], atol=1e-5, rtol=0), (name, (ra[name] - rb[name]).abs().max())


@pytest.mark.parametrize("objective", [
    (),  # EC routers, z-loss and distillation (the recipe)
    ("model.router={type: tc}", "objective.balance_loss=0.01", "objective.distill.weight=0.0"),  # TC + balance
], ids=["ec-distill", "tc-balance"])
def test_two_processes_train_the_routers_one_process_does(recipe, tmp_path, objective):
    one, two = tmp_path / "one", tmp_path / "two"
    retrofit("finetune", str(recipe), *objective, f"checkpoint.output_dir={one}")
    out = retrofit("finetune", str(recipe), *objective, "optim.batch_size=2", "optim.global_batch=4",
                   f"checkpoint.output_dir={two}", processes=2)
    assert out.stdout.count("wrote") == 1, "rank 0 alone talks"
    assert_same_routers(one, two)
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [m["step"] for m in m1], "metrics written once"
    assert all(m["global_batch"] == 4 for m in m1 + m2)
    for a, b in zip(m1, m2):
        assert abs(a["diffusion"] - b["diffusion"]) < 1e-4 and a["tokens"] == b["tokens"]
        assert abs(a.get("balance", 0) - b.get("balance", 0)) < 1e-5, "the balance loss of the global batch"
        assert a["routing"]["tokens"] == b["routing"]["tokens"], "routing counted over both ranks' rows"


def test_a_stopped_run_resumes_with_two_processes(recipe, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    retrofit("finetune", str(recipe), f"checkpoint.output_dir={straight}")
    retrofit("finetune", str(recipe), "optim.max_steps=4", f"checkpoint.output_dir={stopped}")
    wrong = retrofit("finetune", str(recipe), f"checkpoint.output_dir={stopped}", "--resume", processes=2, check=False)
    # One line from retrofit (the launcher then reports the failed child in its own words).
    assert wrong.returncode == 1 and "error: --resume: the checkpoint was written with a global batch of 4" in wrong.stderr
    assert "retrofit/training" not in wrong.stderr, "no traceback through retrofit's code"
    retrofit("finetune", str(recipe), "optim.batch_size=2", f"checkpoint.output_dir={stopped}", "--resume",
             processes=2)
    assert_same_routers(straight, stopped)
    assert [m["step"] for m in metrics(stopped)] == [2, 4, 6, 8]


def test_two_processes_score_what_one_process_does(tmp_path):
    data = shared_data_dir()
    args = ["eval", "--model", "tiny", "--tasks", "gsm8k,arc", "--limit", "4", "--data-dir", str(data),
            "--gen-length", "16", "--steps", "4", "--denoise-block", "8", "--mc-num", "4", "--no-figures"]
    retrofit(*args, "--output", str(tmp_path / "one.json"))
    out = retrofit(*args, "--output", str(tmp_path / "two.json"), processes=2)
    assert out.stdout.count("wrote") == 1
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["results"] == two["results"] and set(one["results"]) >= {"gsm8k", "arc_easy", "arc_challenge"}
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert one["routing"]["tokens"] == two["routing"]["tokens"], "every rank's requests are counted"
    assert one["routing"]["tokens_per_expert"] == two["routing"]["tokens_per_expert"]
