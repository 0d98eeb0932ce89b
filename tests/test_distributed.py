"""Several processes on CPU (gloo), started the way users start them: `accelerate launch --num_processes 2 -m
retrofit ...`. Two processes must compute what one does: the same router weights from the same global batch, a
resumption with another process count, the same evaluation scores. Under FSDP too: accelerate enables it only on
accelerator devices, so those launches go through ``tests/fsdp_on_cpu.py``, which lifts that one condition."""

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


FSDP = ["--use_fsdp", "--fsdp_version", "2"]  # accelerate's FSDP plugin, as a config file or these flags set it


def retrofit(*args: str, processes: int = 1, check: bool = True, fsdp: list[str] | None = None,
             module: str = "retrofit") -> subprocess.CompletedProcess:
    """`python -m retrofit ARGS` (or another ``module``), or under `accelerate launch` with ``processes``
    processes (DDP, or FSDP with the plugin's flags ``fsdp``); one thread each, so one and two processes multiply
    matrices alike."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RETROFIT_PROGRESS_SECONDS": "3600"}
    if processes == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        program = ["--multi_gpu", "-m", module] if fsdp is None else [*fsdp, str(REPO / "tests/fsdp_on_cpu.py")]
        command = [accelerate, "launch", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                   *program, *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe"), Path("tiny"), objective={"z_loss": 1e-3, "distill": {"weight": 1.0}},
                        optim={"lr": 0.01, "max_steps": 8, "batch_size": 4, "warmup_steps": 0,
                               "schedule": "constant"},
                        data={"path": str(gsm8k_train()), "max_examples": 64, "seq_len": 48},
                        checkpoint={"every": 4})


@pytest.fixture(scope="module")
def one_process(recipe, tmp_path_factory) -> Path:
    """The recipe's run in one process: what every launch below must reproduce."""
    run = tmp_path_factory.mktemp("one") / "run"
    retrofit("finetune", str(recipe), f"checkpoint.output_dir={run}")
    return run


def routers(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "router.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max())


def assert_same_routers(a: Path, b: Path, atol: float = 1e-5) -> None:
    assert_same_tensors(routers(a), routers(b), atol)


@pytest.mark.parametrize("objective", [
    (),  # EC routers, z-loss and distillation (the recipe)
    ("model.router={type: tc}", "objective.balance_loss=0.01", "objective.distill.weight=0.0"),  # TC + balance
], ids=["ec-distill", "tc-balance"])
def test_two_processes_train_the_routers_one_process_does(recipe, one_process, tmp_path, objective):
    one, two = one_process, tmp_path / "two"
    if objective:
        one = tmp_path / "one"
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


def test_a_stopped_run_resumes_with_two_processes(recipe, one_process, tmp_path):
    straight, stopped = one_process, tmp_path / "stopped"
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
    # 3 documents per task: one rank gets 2, the other 1 and lm-eval's padding copy, which must not count.
    args = ["eval", "--model", "tiny", "--tasks", "gsm8k,arc", "--limit", "3", "--data-dir", str(data),
            "--gen-length", "16", "--steps", "4", "--denoise-block", "8", "--mc-num", "4", "--no-figures"]
    retrofit(*args, "--output", str(tmp_path / "one.json"))
    out = retrofit(*args, "--output", str(tmp_path / "two.json"), processes=2)
    assert out.stdout.count("wrote") == 1
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["results"] == two["results"] and set(one["results"]) >= {"gsm8k", "arc_easy", "arc_challenge"}
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert one["routing"]["tokens"] == two["routing"]["tokens"], "every rank's requests are counted"
    assert one["routing"]["tokens_per_expert"] == two["routing"]["tokens_per_expert"]


def test_lm_eval_itself_scales_with_the_adapter(tmp_path):
    """`accelerate launch -m lm_eval --model retrofit`: lm-eval's own command line, on the offline ARC files."""
    tasks = tmp_path / "tasks"
    retrofit("eval", "--tasks", "arc", "--data-dir", str(shared_data_dir()), "--write-tasks", str(tasks))
    scores = []
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        retrofit("--model", "retrofit", "--model_args", "pretrained=tiny,mc_num=4", "--include_path", str(tasks),
                 "--tasks", "retrofit_arc_easy", "--limit", "3", "--output_path", str(out), processes=processes,
                 module="lm_eval")
        (found,) = out.glob("**/results_*.json")
        scores.append(json.loads(found.read_text())["results"])
    assert scores[0] == scores[1] and "acc,none" in scores[0]["retrofit_arc_easy"]


# ---------------------------------------------------------------------------------------------- FSDP


def test_fsdp_shards_the_model_and_trains_the_routers_one_process_does(recipe, one_process, tmp_path):
    """Rank 0 alone reads the checkpoint (cpu_ram_efficient_loading, accelerate's default) and FSDP hands every
    rank its shards; gradients are reduce-scattered; the checkpoint and the export are gathered whole."""
    run = tmp_path / "fsdp"
    out = retrofit("finetune", str(recipe), "optim.batch_size=2", f"checkpoint.output_dir={run}", processes=2,
                   fsdp=FSDP)
    assert out.stdout.count("wrote") == 1, "rank 0 alone talks"
    assert_same_routers(one_process, run)
    trained = load_file(str(run / "checkpoints/step-000008/trainable.safetensors"))
    assert_same_tensors(trained, load_file(str(one_process / "checkpoints/step-000008/trainable.safetensors")))
    assert all(t.shape == (8, 128) for t in trained.values()), "whole gate weights, not one rank's half"
    assert [m["step"] for m in metrics(run)] == [m["step"] for m in metrics(one_process)]


def test_fsdp_trains_lora_adapters_one_process_does(recipe, tmp_path):
    """Every rank reads the checkpoint this time (cpu_ram_efficient_loading off); LoRA adapters train too, and
    the FSDP run recomputes its layers in the backward pass (each layer's weights gathered again)."""
    one, two = tmp_path / "one", tmp_path / "two"
    retrofit("finetune", str(recipe), "trainable.mode=routers+lora", f"checkpoint.output_dir={one}")
    retrofit("finetune", str(recipe), "trainable.mode=routers+lora", "optim.batch_size=2",
             "optim.activation_checkpointing=true", f"checkpoint.output_dir={two}", processes=2,
             fsdp=[*FSDP, "--fsdp_cpu_ram_efficient_loading", "false"])
    assert_same_routers(one, two)
    adapters = [load_file(str(run / "adapter/adapter_model.safetensors")) for run in (one, two)]
    assert_same_tensors(*adapters, atol=1e-4)


def test_fsdp_run_resumes_in_one_process_and_back(recipe, one_process, tmp_path):
    """Checkpoints hold whole tensors (Adam's moments included): FSDP → 1 process → FSDP ends where 1 process
    does."""
    run = tmp_path / "run"
    retrofit("finetune", str(recipe), "optim.batch_size=2", "optim.max_steps=4", f"checkpoint.output_dir={run}",
             processes=2, fsdp=FSDP)
    retrofit("finetune", str(recipe), "optim.max_steps=6", f"checkpoint.output_dir={run}", "--resume")
    retrofit("finetune", str(recipe), "optim.batch_size=2", f"checkpoint.output_dir={run}", "--resume",
             processes=2, fsdp=FSDP)
    assert_same_routers(one_process, run)
    assert [m["step"] for m in metrics(run)] == [2, 4, 6, 8]


def test_fsdp_in_bf16_computes_what_ddp_does(recipe, tmp_path):
    """bf16 frozen weights beside fp32 routers in one FSDP unit: bit for bit the DDP run (one process differs
    from both by bf16 rounding, since each rank multiplies half the rows)."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    args = ("finetune", str(recipe), "optim.precision=bf16", "optim.batch_size=2", "optim.max_steps=4")
    retrofit(*args, f"checkpoint.output_dir={ddp}", processes=2)
    retrofit(*args, f"checkpoint.output_dir={fsdp}", processes=2, fsdp=FSDP)
    assert all(torch.equal(a, b) for a, b in zip(routers(ddp).values(), routers(fsdp).values()))


def test_fsdp_scores_what_one_process_does(tmp_path):
    """The model sharded across two ranks (rank 0 reads it), each rank scoring its own share of the documents
    and joining the other's forwards once done: exactly the scores of one process."""
    data = shared_data_dir()
    args = ["eval", "--model", "tiny", "--tasks", "gsm8k,arc", "--limit", "3", "--data-dir", str(data),
            "--gen-length", "16", "--steps", "4", "--denoise-block", "8", "--mc-num", "4", "--no-figures"]
    retrofit(*args, "--output", str(tmp_path / "one.json"))
    out = retrofit(*args, "--output", str(tmp_path / "two.json"), processes=2, fsdp=FSDP)
    assert out.stdout.count("wrote") == 1
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["results"] == two["results"] and set(one["results"]) >= {"gsm8k", "arc_easy", "arc_challenge"}
    assert one["routing"]["tokens_per_expert"] == two["routing"]["tokens_per_expert"], "filler forwards uncounted"
