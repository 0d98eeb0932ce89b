"""Full-size benchmark on a random LLaDA-MoE-7B-A1B snapshot: ``make bench-7b``
(``python -m retrofit.tools.bench_7b [--snapshot DIR] [--work DIR] [--out DIR] [--data-dir DIR]``).

What a user runs, at the real model's size, each step a fresh process measured from outside (wall time, peak
resident memory from the kernel's rusage, peak anonymous memory sampled from /proc, i.e. memory that is not
the page cache of the files being read):

1. ``retrofit convert`` to EC and to block routing (hard links, streamed verification);
2. loading the converted model for evaluation in bf16, then per router (tc, ec, block), each after a warm-up run:
   a forward, generation (tokens/s) and a router-only training step; a GPU's shapes where there is one (a forward
   of 8 x 1,024 tokens, 4 prompts x 256 tokens in 64 steps of 32-token blocks, a step of 1 x 1,024), small ones on
   a CPU; on a GPU the memory targets read the GPU's peaks, not the host's;
3. ``retrofit finetune`` of the EC routers, a few bf16 steps on GSM8K;
4. ``retrofit eval`` of the fine-tuned result (GSM8K, ``--limit 1``, bf16);
5. the weights hash of a 14.7 GB directory, first and cached.

The snapshot is written on first use by ``retrofit create-tiny --preset llada-moe-7b`` (14.7 GB; about as much
again for the fine-tuned copy of the shards). Results: ``DIR/bench-7b.md`` and ``DIR/bench-7b.json``; every
figure comes from the run that writes it. Paths default relative to the working directory, the repository root
(recipes/ec.yaml and ../shared/data are read from there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from retrofit.tools.checkout import DATA_DIR, gsm8k_problem, recipe_problem

GiB = 2**30
RECIPE = Path("recipes") / "ec.yaml"
FORWARD_TOKENS = 128
FINETUNE_STEPS = 3
ROUTERS = ("tc", "ec", "block")


@dataclass
class Run:
    command: str
    rc: int
    wall_s: float
    peak_rss: int  # bytes, the kernel's high-water mark of the process
    peak_anon: int  # bytes, sampled every 50 ms: memory that is not file pages
    tail: str = ""


def measure(args: list[str], label: str) -> Run:
    """Run ``args`` to completion, watching its memory; prints a one-line summary."""
    print(f"[bench-7b] {label}: {' '.join(args)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = [0]
    sampler = threading.Thread(target=_sample_anon, args=(proc.pid, peak_anon), daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    sampler.join()
    run = Run(" ".join(args), proc.returncode, wall, usage.ru_maxrss * 1024, peak_anon[0], output[-3000:])
    print(f"[bench-7b]   rc {run.rc}, {wall:.1f} s, peak RSS {run.peak_rss / GiB:.2f} GiB, peak anon "
          f"{run.peak_anon / GiB:.2f} GiB", file=sys.stderr, flush=True)
    return run


def _sample_anon(pid: int, peak: list[int]) -> None:
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        anon = next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("RssAnon:")), 0)
        if "State:\tZ" in text:
            return
        peak[0] = max(peak[0], anon)
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class Shapes:
    """The per-router workloads of the forward worker: a forward of ``forward`` (batch, tokens); generation of
    ``generate`` (prompts, tokens each) after ``prompt``-token prompts in ``steps`` steps, blocks of ``block``; a
    router-only training step on ``step`` (batch, tokens)."""

    forward: tuple[int, int]
    generate: tuple[int, int]
    prompt: int
    steps: int
    block: int
    step: tuple[int, int]


GPU_SHAPES = Shapes(forward=(8, 1024), generate=(4, 256), prompt=64, steps=64, block=32, step=(1, 1024))  # issue 23
CPU_SHAPES = Shapes(forward=(1, FORWARD_TOKENS), generate=(1, 32), prompt=32, steps=4, block=32, step=(1, 128))


def forward_worker(model_dir: str, shapes: Shapes | None = None) -> dict:
    """Load in bf16 (timed, peak after load), then per router a forward, generation and a router-only training
    step, each timed after a warm-up run of the same work (the first call pays the GPU libraries' start-up);
    prints and returns JSON. ``shapes``: a GPU's where there is one (:data:`GPU_SHAPES`), else small ones."""
    import torch

    from retrofit.io.load import load_model, model_bytes
    from retrofit.routers import router_settings, swap_routers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU where there is one
    shapes = shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    start = time.perf_counter()
    model = load_model(model_dir, dtype=torch.bfloat16, device=device)
    loaded = {"load_s": time.perf_counter() - start, "load_peak_rss": _hwm(), "model_bytes": model_bytes(model),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shapes": asdict(shapes)}
    if device.type == "cuda":
        loaded["gpu_load_peak_bytes"] = torch.cuda.max_memory_allocated()
    measured = {"forward_s": {}, "generate_tokens_per_s": {}, "step_s": {}, "gpu_forward_peak_bytes": {},
                "gpu_step_peak_bytes": {}}
    # Evaluation's work for every router first, so that the peak memory it leaves is evaluation's alone (the CPU
    # target compares fine-tuning's with it), then the training steps.
    for figures in (_inference_figures, _training_figures):
        for router in ROUTERS:
            swap_routers(model, router_settings(type=router))
            for name, value in figures(model, shapes, device).items():
                measured[name][router] = value
        loaded.setdefault("eval_peak_rss", _hwm())
    result = {**loaded, **{k: v for k, v in measured.items() if v}, "peak_rss": _hwm()}
    print(json.dumps(result))
    return result


def _inference_figures(model, shapes: Shapes, device) -> dict:
    """The forward's seconds and the generated tokens per second of the model's current routers."""
    import torch

    from retrofit.eval.sampler_llada import GenerateArgs, generate

    ids = _masked_ids(model, shapes.forward, device)
    with torch.no_grad():
        figures = {"forward_s": _seconds(lambda: model(ids), device)}
    prompts = _masked_ids(model, (shapes.generate[0], shapes.prompt), device, mask_share=0.0)
    settings = GenerateArgs(gen_length=shapes.generate[1], steps=shapes.steps, denoise_block=shapes.block)
    seconds = _seconds(lambda: generate(model, prompts, model.config.mask_token_id, settings), device)
    figures["generate_tokens_per_s"] = shapes.generate[0] * shapes.generate[1] / seconds
    return figures


def _training_figures(model, shapes: Shapes, device) -> dict:
    """The router-only step's seconds of the model's current routers; on a GPU also the peak memory of a forward
    and of a step at the step's shape."""
    import torch

    from retrofit.tools.bench import training_step

    cuda = device.type == "cuda"
    ids, figures = _masked_ids(model, shapes.step, device), {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(ids)
        figures["gpu_forward_peak_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    _, step = training_step(model, ids, "routers")
    figures["step_s"] = _seconds(step, device)
    model.eval()  # the next router's forward and generation run as evaluation does
    if cuda:
        figures["gpu_step_peak_bytes"] = torch.cuda.max_memory_allocated()
    return figures


def _masked_ids(model, shape: tuple[int, int], device, mask_share: float = 0.5):
    """Random ordinary tokens of ``shape``, about ``mask_share`` of them masked (a denoising step's input)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(30000, model.config.mask_token_id), shape, generator=gen)
    ids[torch.rand(shape, generator=gen) < mask_share] = model.config.mask_token_id
    return ids.to(device)


def _seconds(work, device) -> float:
    """Seconds of one run of ``work`` after a warm-up run, the device synchronised before the clock stops."""
    import torch

    work()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - start


def hash_worker(model_dir: str) -> None:
    """The weights hash of a model directory with an empty cache, then again (cached)."""
    from retrofit.eval.runner import weights_hash

    times = []
    for _ in range(2):
        start = time.perf_counter()
        weights_hash(Path(model_dir))
        times.append(time.perf_counter() - start)
    print(json.dumps({"cold_s": times[0], "cached_s": times[1]}))


def _hwm() -> int:
    from retrofit.tools.bench import proc_status_kib

    return proc_status_kib("VmHWM") * 1024


# ------------------------------------------------------------------------------------------- the run


def retrofit_cli() -> str:
    return str(Path(sys.executable).with_name("retrofit"))


def run_all(snapshot: Path, work: Path, data: Path) -> dict:
    cli, py = retrofit_cli(), sys.executable
    results: dict = {"machine": _machine(), "snapshot": str(snapshot)}
    if not (snapshot / "config.json").is_file():
        results["create"] = asdict(measure([cli, "create-tiny", "--preset", "llada-moe-7b", str(snapshot), "--force"],
                                           "create the full-size snapshot"))
    results["checkpoint_bytes"] = sum(p.stat().st_size for p in snapshot.glob("model-*.safetensors"))
    work.mkdir(parents=True, exist_ok=True)
    for router in ("ec", "block"):
        results[f"convert_{router}"] = asdict(measure(
            [cli, "convert", "--src", str(snapshot), "--router", router, "--out", str(work / router), "--force"],
            f"convert to {router}"))
    run = measure([py, "-m", "retrofit.tools.bench_7b", "--worker", "forward", str(work / "ec")],
                  "load bf16 + forwards")
    results["forward"] = {**asdict(run), **_last_json(run)}
    finetuned = work / "ec-ft"
    shutil.rmtree(finetuned, ignore_errors=True)
    run = measure([cli, "finetune", str(RECIPE.resolve()), f"model.source={work / 'ec'}",
                   f"data.path={data / 'gsm8k' / 'train.jsonl'}", "data.seq_len=128", "data.max_examples=64",
                   "optim.batch_size=1", "optim.grad_accum=1", f"optim.max_steps={FINETUNE_STEPS}",
                   "optim.warmup_steps=0", "optim.precision=bf16", "logging.every=1",
                   f"checkpoint.every={FINETUNE_STEPS}", f"checkpoint.output_dir={finetuned}"], "finetune")
    results["finetune"] = {**asdict(run), "step_s": _step_seconds(finetuned)}
    output = work / "eval.json"
    results["eval"] = asdict(measure(
        [cli, "eval", "--model", str(finetuned), "--tasks", "gsm8k", "--limit", "1", "--dtype", "bfloat16",
         "--data-dir", str(data), "--gen-length", "32", "--steps", "8", "--denoise-block", "32",
         "--output", str(output)], "eval --limit 1"))
    env_cache = work / "hash-cache"
    shutil.rmtree(env_cache, ignore_errors=True)
    os.environ["RETROFIT_CACHE"] = str(env_cache)
    run = measure([py, "-m", "retrofit.tools.bench_7b", "--worker", "hash", str(finetuned)], "weights hash")
    results["hash"] = {**asdict(run), **_last_json(run)}
    return results


def _last_json(run: Run) -> dict:
    for line in reversed(run.tail.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _step_seconds(output_dir: Path) -> list[float]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [128 / line["tokens_per_s"] for line in lines]


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    return f"{os.cpu_count()} x {cpu}, {mem / GiB:.0f} GiB RAM"


# ------------------------------------------------------------------------------------------- report


def targets(r: dict) -> list[tuple[str, str, str, bool]]:
    rows = []
    for router in ("ec", "block"):
        c = r[f"convert_{router}"]
        rows.append((f"convert --router {router}: anonymous memory", f"{c['peak_anon'] / GiB:.2f} GiB", "<= 2 GiB",
                     c["rc"] == 0 and c["peak_anon"] <= 2 * GiB))
        rows.append((f"convert --router {router}: wall time", f"{c['wall_s']:.0f} s", "<= 120 s",
                     c["rc"] == 0 and c["wall_s"] <= 120))
    f = r["forward"]
    if "gpu_load_peak_bytes" in f:  # host memory says nothing of a model on a GPU: the GPU's own peaks
        rows += gpu_targets(f, r["checkpoint_bytes"])
    elif "load_peak_rss" in f:
        ratio = f["load_peak_rss"] / r["checkpoint_bytes"]
        rows.append(("eval load peak RSS / checkpoint bytes", f"{ratio:.3f}x", "<= 1.15x", ratio <= 1.15))
        ft = r["finetune"]
        ratio = ft["peak_rss"] / f.get("eval_peak_rss", f["peak_rss"])  # older results: no training steps there
        rows.append(("finetune peak RSS / eval (load + forward) peak", f"{ratio:.3f}x", "<= 1.3x",
                     ft["rc"] == 0 and ratio <= 1.3))
    chain = all(r[k]["rc"] == 0 for k in ("convert_ec", "finetune", "eval"))
    rows.append(("convert -> finetune -> eval --limit 1 completes", "yes" if chain else "no", "yes", chain))
    return rows


def gpu_targets(f: dict, checkpoint_bytes: int) -> list[tuple[str, str, str, bool]]:
    """Issue 23's goals for the whole model on an H200-class GPU (bf16, :data:`GPU_SHAPES`), and its memory
    read on the GPU: the loaded weights against the checkpoint, a router-only step against a forward of the same
    tokens."""
    rate, step = f.get("generate_tokens_per_s", {}), f.get("step_s", {})
    ratio = f["gpu_load_peak_bytes"] / checkpoint_bytes
    rows = [("eval load GPU peak / checkpoint bytes", f"{ratio:.3f}x", "<= 1.15x", ratio <= 1.15)]
    peaks = f.get("gpu_step_peak_bytes", {}), f.get("gpu_forward_peak_bytes", {})
    if "tc" in peaks[0] and "tc" in peaks[1]:
        ratio = peaks[0]["tc"] / peaks[1]["tc"]
        rows.append(("TC router-only step GPU peak / forward peak (same tokens)", f"{ratio:.3f}x", "<= 1.3x",
                     ratio <= 1.3))
    if "tc" in rate:
        rows.append(("TC generation", f"{rate['tc']:.0f} tok/s", ">= 400 tok/s", rate["tc"] >= 400))
        rows += [(f"{router} generation / TC", f"{rate[router] / rate['tc']:.2f}x", ">= 1x", rate[router] >= rate["tc"])
                 for router in ("ec", "block") if router in rate]
    if "tc" in step:
        rows.append(("TC router-only step", f"{step['tc'] * 1e3:.0f} ms", "<= 100 ms", step["tc"] <= 0.1))
    return rows


def router_markdown(f: dict) -> list[str]:
    """Per router: the forward, generation and router-only step the forward worker timed (after a warm-up)."""
    if "shapes" not in f or "generate_tokens_per_s" not in f:
        return []
    sh = f["shapes"]
    lines = ["", f"Per router, on {f['device']}, bf16, each timed after a warm-up run:", "",
             f"| router | forward {sh['forward'][0]} x {sh['forward'][1]} tokens | generation, {sh['generate'][0]} "
             f"prompts x {sh['generate'][1]} tokens ({sh['steps']} steps, blocks of {sh['block']}) | router-only "
             f"step, {sh['step'][0]} x {sh['step'][1]} tokens |", "|---|---|---|---|"]
    for router, seconds in f["forward_s"].items():
        lines.append(f"| {router} | {seconds * 1e3:.1f} ms | {f['generate_tokens_per_s'][router]:.1f} tok/s | "
                     f"{f['step_s'][router] * 1e3:.1f} ms |")
    return lines


def markdown(r: dict) -> str:
    def run_row(name, run, extra=""):
        return (f"| {name} | {run['rc']} | {run['wall_s']:.1f} s | {run['peak_rss'] / GiB:.2f} GiB | "
                f"{run['peak_anon'] / GiB:.2f} GiB | {extra} |")

    f, ft, h = r["forward"], r["finetune"], r["hash"]
    fwd = ", ".join(f"{k} {v:.1f} s" for k, v in f.get("forward_s", {}).items())
    steps = ", ".join(f"{s:.1f}" for s in ft["step_s"])
    lines = [
        f"# bench-7b: LLaDA-MoE-7B-A1B shapes, random weights ({r['checkpoint_bytes'] / 1e9:.2f} GB bf16)", "",
        f"Machine: {r['machine']}. Each row is one fresh process.", "",
        "| step | rc | wall | peak RSS | peak anon | detail |", "|---|---|---|---|---|---|",
    ]
    if "create" in r:
        lines.append(run_row("create-tiny --preset llada-moe-7b", r["create"]))
    lines += [
        run_row("convert --router ec", r["convert_ec"]),
        run_row("convert --router block", r["convert_block"]),
        run_row(f"load bf16 + per-router work ({f.get('device', '?')})", f, f"load {f.get('load_s', 0):.1f} s "
                f"(peak {f.get('load_peak_rss', 0) / GiB:.2f} GiB); forward {fwd}"
                + (f"; evaluation's peak {f['eval_peak_rss'] / GiB:.2f} GiB" if "eval_peak_rss" in f else "")
                + (f"; GPU peak after load {f['gpu_load_peak_bytes'] / GiB:.2f} GiB" if "gpu_load_peak_bytes" in f
                   else "")),
        run_row(f"finetune, {FINETUNE_STEPS} router-only bf16 steps of 128 tokens", ft, f"step s: {steps}"),
        run_row("eval gsm8k --limit 1 (bf16, gen 32, 8 steps)", r["eval"]),
        run_row("weights hash (cold, then cached)", h, f"cold {h.get('cold_s', 0):.1f} s, cached "
                f"{h.get('cached_s', 0):.3f} s"),
        *router_markdown(f),
        "", "| target | measured | goal | met |", "|---|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {goal} | {'yes' if ok else 'NO'} |" for name, value, goal, ok in targets(r)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrofit.tools.bench_7b", description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, default=Path("out") / "llada-moe-7b-random")
    parser.add_argument("--work", type=Path, default=Path("out") / "bench-7b")
    parser.add_argument("--out", type=Path, default=Path("bench") / "results")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help=f"local data holding gsm8k/ (default {DATA_DIR}, from the working directory)")
    parser.add_argument("--worker", choices=("forward", "hash"), help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        {"forward": forward_worker, "hash": hash_worker}[args.worker](args.path)
        return
    problem = gsm8k_problem(args.data_dir) or recipe_problem(RECIPE, "bench-7b")
    if problem:  # checked before the minutes of snapshot and conversion that precede their first use
        parser.error(problem)
    results = run_all(args.snapshot.resolve(), args.work.resolve(), args.data_dir.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-7b.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "bench-7b.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
