"""Evaluation speed, measured and projected to whole tasks: ``make bench-eval``
(``python -m retrofit.tools.bench_eval [--model tiny] [--routers tc,ec,block] [--limit 8] [--out DIR]``).

For each router, the model is loaded once and runs the first ``--limit`` documents of GSM8K (with each decoding
setting: exact, threshold, the caches), ARC and MMLU through ``retrofit eval``'s own path (lm-eval, the adapter,
the samplers). The model's time in each run is measured and its forwards counted (full ones and cached block-only ones apart). The
projection to the whole task: for likelihood tasks, the measured seconds per forward times the forwards the whole
task takes, counted exactly by the run plan (:mod:`retrofit.eval.estimate`); for generation, the measured seconds
per batch times the whole task's batches (threshold decoding stops early, so a batch's time is measured, not
derived from the plan's upper bound). Prompts of the first documents stand for all. Agreement: the share of GSM8K answers identical to the exact setting's.

Results: ``DIR/bench-eval.md`` and ``DIR/bench-eval.json``. On a CPU with the embedded ``tiny`` this shows the
relative gains; the figures a user decides by are the GPU's, on the 7B snapshot
(``--model DIR --dtype bf16``, see ``make bench-eval``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from retrofit.tools.checkout import DATA_DIR

# Decoding settings compared on GSM8K: (name, sampler options beyond the shared gen-length/block/steps).
SETTINGS = {
    "exact": {},
    "threshold 0.9": {"threshold": 0.9},
    "dual cache": {"cache": "dual"},
    "prefix cache": {"cache": "prefix"},
    "dual cache + threshold 0.9": {"cache": "dual", "threshold": 0.9},
}


@dataclass
class Measured:
    router: str
    task: str
    setting: str
    documents: int
    seconds: float
    full_forwards: int
    cached_forwards: int
    projected_hours: float
    agreement: float | None = None  # GSM8K answers identical to the exact setting's
    similarity: float | None = None  # their mean difflib ratio
    scores: dict = field(default_factory=dict)


class ForwardCounter:
    """Counts the model's forwards, full ones and cached (``compute``) ones apart."""

    def __init__(self, model) -> None:
        self.full = self.cached = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if kwargs.get("compute") is not None:
            self.cached += 1
        else:
            self.full += 1

    def reset(self) -> None:
        self.full = self.cached = 0


class ModelClock:
    """Seconds spent in the adapter's request methods (the model's work; lm-eval's building of the requests and
    scoring of the answers are left out, they do not grow with the model), and the answers generated."""

    def __init__(self, lm) -> None:
        self.seconds, self.answers = 0.0, []
        for name in ("loglikelihood", "generate_until"):
            setattr(lm, name, self._timed(getattr(lm, name), lm.device_, name == "generate_until"))

    def _timed(self, method, device, keep: bool):
        def run(requests, *args, **kwargs):
            start = time.perf_counter()
            results = method(requests, *args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            if keep:
                self.answers += results
            return results
        return run

    def reset(self) -> None:
        self.seconds, self.answers = 0.0, []


def _timed_task(lm, clock: ModelClock, counter: ForwardCounter, task: str, limit: int, data_dir: Path):
    from retrofit.eval.runner import run_eval

    counter.reset()
    clock.reset()
    record = run_eval(lm, [task], limit=limit, data_dir=data_dir)
    return clock.seconds, record["results"]


def _similarity(answers: list[str], exact: list[str]) -> tuple[float, float]:
    """(share of answers identical to the exact setting's, mean difflib ratio of the texts)."""
    import difflib

    pairs = list(zip(answers, exact))
    same = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    ratio = sum(difflib.SequenceMatcher(None, a, b).ratio() for a, b in pairs) / max(len(pairs), 1)
    return same, ratio


def _generation_hours(seconds: float, limited, whole) -> float:
    """The whole task's generation batches, each taking as long as a batch took here."""
    return seconds / max(limited.generation_batches, 1) * whole.generation_batches / 3600


def bench_router(router: str, args, data_dir: Path) -> list[Measured]:
    from retrofit.eval.adapter import RetrofitLM, resolve_run
    from retrofit.eval.estimate import plan_run
    from retrofit.eval.runner import prepared_tasks
    from retrofit.eval.samplers import make_sampler

    base = {"gen_length": args.gen_length, "denoise_block": args.denoise_block}
    router_options = {"guard_size": args.guard_size} if router == "block" and args.guard_size else {}
    lm = RetrofitLM(args.model, router=router, batch_size=args.batch_size, mc_num=args.mc_num, dtype=args.dtype,
                    progress=False, **base, **router_options)
    counter, clock = ForwardCounter(lm.model), ModelClock(lm)
    kind = lm.sampler.kind
    out, answers = [], {}
    for setting, options in SETTINGS.items():
        if setting not in args.settings:
            continue
        if options.get("threshold") is None:
            options = {**options, "steps": args.gen_length}
        if kind == "llada2" and options.get("cache") == "prefix":
            continue  # the same as dual under block-causal attention
        lm.sampler = make_sampler(kind, {**base, **options})
        with prepared_tasks(["gsm8k"], data_dir) as prepared:
            run = resolve_run(args.model, router, {**base, **options, **router_options})
            limited = plan_run(run, prepared, args.limit, args.mc_num, args.batch_size)
            whole = plan_run(run, prepared, None, args.mc_num, args.batch_size)
        seconds, scores = _timed_task(lm, clock, counter, "gsm8k", args.limit, data_dir)
        answers[setting] = list(clock.answers)
        same, similar = _similarity(answers[setting], answers["exact"])
        out.append(Measured(router, "gsm8k", setting, len(answers[setting]), seconds, counter.full, counter.cached,
                            _generation_hours(seconds, limited[0], whole[0]), same, similar, scores))
        print(f"[bench-eval] {router} gsm8k {setting}: {seconds:.1f} s, {counter.full}+{counter.cached} forwards",
              flush=True)
    for task in ("arc", "mmlu"):
        with prepared_tasks([task], data_dir) as prepared:
            run = resolve_run(args.model, router, {**base, **router_options})
            limited = plan_run(run, prepared, args.limit, args.mc_num, args.batch_size)
            whole = plan_run(run, prepared, None, args.mc_num, args.batch_size)
        seconds, scores = _timed_task(lm, clock, counter, task, args.limit, data_dir)
        forwards = sum(w.forwards.full for w in whole)  # arc: arc_challenge and arc_easy
        hours = seconds / max(counter.full, 1) * forwards / 3600
        out.append(Measured(router, task, "exact", sum(sum(p.requests.values()) for p in limited), seconds,
                            counter.full, counter.cached, hours, None, None, scores))
        print(f"[bench-eval] {router} {task}: {seconds:.1f} s, {counter.full} forwards", flush=True)
    return out


def _score(r: Measured) -> str:
    """The task's headline metric: GSM8K flexible exact match, accuracy elsewhere (ARC: challenge/easy)."""
    key = "exact_match[flexible-extract]" if r.task == "gsm8k" else "acc"
    tasks = [r.task] if r.task in r.scores else list(r.scores)  # mmlu: the aggregate, not its 57 subjects
    values = [r.scores[t][key] for t in tasks if key in r.scores[t]]
    return "/".join(f"{v:.3f}" for v in values)


def table(results: list[Measured], args) -> str:
    lines = [f"# bench-eval: {args.model}, {args.dtype}, batch {args.batch_size}, mc_num {args.mc_num}, GSM8K gen "
             f"{args.gen_length} in blocks of {args.denoise_block}, first {args.limit} documents per task",
             "", f"Machine: {platform.processor() or platform.machine()}, "
                 f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; torch {torch.__version__}",
             "", "| router | task | setting | requests | model seconds | forwards (full + block-only) | projected "
                 "whole task, hours | score | answers equal to exact | text similarity to exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        agree = "" if r.agreement is None else f"{r.agreement:.0%}"
        similar = "" if r.similarity is None else f"{r.similarity:.2f}"
        lines.append(f"| {r.router} | {r.task} | {r.setting} | {r.documents} | {r.seconds:.1f} | "
                     f"{r.full_forwards} + {r.cached_forwards} | {r.projected_hours:.2f} | {_score(r)} | {agree} | "
                     f"{similar} |")
    lines += ["", "Projected `--tasks mmlu,arc,gsm8k`, hours per router and GSM8K setting:", "",
              "| router | setting | hours |", "|---|---|---|"]
    for router in dict.fromkeys(r.router for r in results):
        rest = sum(r.projected_hours for r in results if r.router == router and r.task != "gsm8k")
        for r in results:
            if r.router == router and r.task == "gsm8k":
                lines.append(f"| {router} | {r.setting} | {rest + r.projected_hours:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--routers", default="tc,ec,block")
    parser.add_argument("--limit", type=int, default=8, help="documents per task (per subject for MMLU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mc-num", type=int, default=128)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--denoise-block", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--guard-size", type=int, default=None, help="block routing's guard size (tiny: 2)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"GSM8K settings, of: {', '.join(SETTINGS)} "
                        "(exact is always run: the others are compared with it)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.settings = {"exact", *(name.strip() for name in args.settings.split(","))}
    unknown = args.settings - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; of: {', '.join(SETTINGS)}")
    results = []
    for router in args.routers.split(","):
        results += bench_router(router, args, args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-eval.md").write_text(table(results, args))
    (args.out / "bench-eval.json").write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()},
                                                          "results": [asdict(r) for r in results]}, indent=2))
    print(table(results, args))


if __name__ == "__main__":
    main()
