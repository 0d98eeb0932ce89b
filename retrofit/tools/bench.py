"""CPU benchmark of retrofit's MoE paths: ``python -m retrofit.tools.bench [--out DIR] [--quick]``.

Everything is measured side by side in one process (fp32, 2 threads; each figure the median of repeated runs
after a warm-up run), so the tables compare implementations on the same machine at the same moment:

1. one MoE layer at LLaDA-MoE size: the reference modeling code's per-expert loop, the grouped token-choice
   path and the batched expert-choice path (time, speed-up, achieved FLOP rate against a dense matmul);
2. one 32-token denoising block: unique experts touched and layer time of token choice, expert choice and
   block routing (algorithms.md §6);
3. the tiny model end to end: router-only vs full training (throughput, peak memory), likelihood scoring and
   generation.

A "Targets" section checks the measured figures against the project's goals. No figure is hard-coded: every
number written comes from the run that writes it. Results go to ``DIR/bench.md`` and ``DIR/bench.json``; this
module measures, :mod:`retrofit.tools.bench_report` renders and writes them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.diffusion import add_noise, diffusion_loss
from retrofit.eval.likelihood import mc_loglikelihood
from retrofit.eval.sampler import SamplerSettings, generate
from retrofit.models.moe import StackedExperts
from retrofit.routers import Router, RouterSettings, RoutingContext, build_router, router_settings
from retrofit.tiny import TINY_EOS_ID, build_tiny_model
from retrofit.tools.bench_report import write_report
from retrofit.training.recipe import TrainableSection
from retrofit.training.trainable import make_trainable

THREADS = 2
LLADA_MOE = dict(d=2048, f=1024, experts=64, top_k=8)
LAYER_TOKENS = (64, 512, 2048)
TARGET_TOKENS = 512
BLOCK = router_settings(type="block", block_length=32, core_threshold=0.6, guard_size=16)
MODEL_DIMS = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, expert_intermediate_size=256)
TRAIN_BATCH, TRAIN_LENGTH = 8, 128
# LLaDA-MoE's layer size with a small vocabulary: as in the real checkpoint the weights (about 1.7 GB per layer in
# fp32) dominate memory, so the router-training/inference peak ratio means what it would at scale.
LAYER_SIZE_MODEL = dict(vocab_size=4096, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16,
                        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, expert_intermediate_size=1024)
MEMORY_BATCH, MEMORY_LENGTH = 1, 512
WARMUP = 1
LOOP, GROUPED, BATCHED, BLOCKED = "TC per-expert loop", "TC grouped", "EC batched", "block grouped"
BATCHED_BY_LOGIT = "EC batched, topk-then-softmax"
CEILING = "EC GEMMs alone"


def median_ms(fns: dict, repeats: int, warmup: int = WARMUP) -> dict:
    """Median wall time in ms of each function of ``fns``, timed in interleaved rounds (each function once per
    round) so that a change in machine load hits every contender alike; the warm-up rounds absorb one-off
    costs (first allocations, kernel choice) and the median ignores the odd slowed run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


# ------------------------------------------------------------------------------------------ MoE layer


class MoeLayer:
    """One MoE layer's weights, shared by every implementation so that all compute from the same tensors.

    Experts are frozen (std 0.02), as in router-only training; the gate is trainable with std 0.5 so that
    routing is peaked like a trained checkpoint's rather than near-uniform.
    """

    def __init__(self, d: int, f: int, experts: int, top_k: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.d, self.f, self.num_experts, self.top_k = d, f, experts, top_k
        self.experts = StackedExperts(experts, d, f).requires_grad_(False)
        for p in self.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=self.gen) * 0.02)
        self.gate = nn.Parameter(torch.randn(experts, d, generator=self.gen) * 0.5)

    def tokens(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.d, generator=self.gen)

    def router(self, settings: RouterSettings) -> Router:
        """A router of the given kind that shares (not copies) this layer's gate weight."""
        router = build_router(settings, self.d, self.num_experts, self.top_k)
        router.weight = self.gate
        return router


def tc_loop(layer: MoeLayer, x: torch.Tensor) -> torch.Tensor:
    """The reference modeling code's MoE block, kept faithful as the baseline: a one-hot expert mask and a
    Python loop that runs every expert on the tokens ``torch.where`` finds for it."""
    probs = F.softmax(F.linear(x, layer.gate), dim=-1, dtype=torch.float32)
    weights, selected = probs.topk(layer.top_k, dim=-1)
    weights = weights.to(x.dtype)
    mask = F.one_hot(selected, num_classes=layer.num_experts).permute(2, 1, 0)
    ex = layer.experts
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        idx, top_x = torch.where(mask[e])
        h = x[top_x]
        h = F.linear(F.silu(F.linear(h, ex.gate_proj[e])) * F.linear(h, ex.up_proj[e]), ex.down_proj[e])
        out.index_add_(0, top_x, h * weights[top_x, idx, None])
    return out


@dataclass
class Implementation:
    """An MoE layer forward (router included) and the router whose choice it makes, to count its pairs."""

    router: Router
    run: Callable[[torch.Tensor], torch.Tensor]

    def routing(self, x: torch.Tensor):
        with torch.no_grad():
            return self.router(x.unsqueeze(0), RoutingContext.unpadded(1, x.shape[0]))


def routed(layer: MoeLayer, settings: RouterSettings) -> Implementation:
    """The native path: the router chooses, StackedExperts runs grouped (token layout) or batched (expert)."""
    router = layer.router(settings)

    def run(x: torch.Tensor) -> torch.Tensor:
        return layer.experts(x, router(x.unsqueeze(0), RoutingContext.unpadded(1, x.shape[0])))

    return Implementation(router, run)


def implementations(layer: MoeLayer) -> dict[str, Implementation]:
    """The rows of the layer table (EC in both of its orders); the loop re-implements the TC router's choice
    inline, as the reference code does, so the TC router only counts its pairs."""
    tc = router_settings(type="tc")
    return {
        LOOP: Implementation(layer.router(tc), partial(tc_loop, layer)),
        GROUPED: routed(layer, tc),
        BATCHED: routed(layer, router_settings(type="ec", capacity_factor=1.0)),
        BATCHED_BY_LOGIT: routed(layer, router_settings(type="ec", capacity_factor=1.0, ec_order="topk-then-softmax")),
    }


class EcGemms:
    """Only the batched matmuls of the EC path, on tensors of its shapes: what EC would cost with gather, scatter,
    activation and router free. Its rate is the ceiling the EC row can approach with this matmul library."""

    def __init__(self, layer: MoeLayer, count: int):
        capacity = count * layer.top_k // layer.num_experts
        ex, gen = layer.experts, layer.gen
        self.weights = ex.gate_proj.transpose(1, 2), ex.up_proj.transpose(1, 2), ex.down_proj.transpose(1, 2)
        self.chosen = torch.randn(layer.num_experts, capacity, layer.d, generator=gen)
        self.hidden = torch.randn(layer.num_experts, capacity, layer.f, generator=gen)
        self.pairs = layer.num_experts * capacity

    def forward(self) -> None:
        gate, up, down = self.weights
        torch.bmm(self.chosen, gate), torch.bmm(self.chosen, up), torch.bmm(self.hidden, down)

    def forward_backward(self) -> None:
        """The forward, then the input-gradient matmuls autograd runs with frozen experts (down, then gate and
        up accumulated into one gradient)."""
        self.forward()
        gate, up, down = self.weights
        torch.bmm(self.chosen, down.transpose(1, 2))
        torch.baddbmm(torch.bmm(self.hidden, gate.transpose(1, 2)), self.hidden, up.transpose(1, 2))


def forward(run: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run(x)


def forward_backward(run: Callable, x: torch.Tensor, gate: nn.Parameter) -> tuple[torch.Tensor, ...]:
    """Frozen experts: gradients reach only the input and the gate, as in router-only training."""
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(run(x).pow(2).mean(), (x, gate))


def pass_figures(ms: float, loop_ms: float, flops: float, dense_gflops: float) -> dict:
    gflops = flops / ms / 1e6
    return {"ms": ms, "speedup": loop_ms / ms, "gflops": gflops, "pct_dense": 100 * gflops / dense_gflops}


def layer_figures(layer: MoeLayer, count: int, repeats: int) -> tuple[dict, list[dict]]:
    """The dense-matmul reference and one row per implementation at ``count`` tokens, timed together.

    The reference multiplies ``[count·k, d] x [d, 3f]``: the FLOPs of the experts' forward in one matmul, the
    ceiling an MoE implementation can approach. Useful expert FLOPs are 2·3·d·f per (token, expert) pair;
    fwd+bwd counts twice that, since with frozen experts backward runs only the input-gradient matmuls."""
    x, impls = layer.tokens(count), implementations(layer)
    a, b = torch.randn(count * layer.top_k, layer.d), torch.randn(layer.d, 3 * layer.f)
    fns = {"dense": partial(torch.matmul, a, b)}
    for name, impl in impls.items():
        fns[name, "fwd"] = partial(forward, impl.run, x)
        fns[name, "fwd+bwd"] = partial(forward_backward, impl.run, x, layer.gate)
    gemms = EcGemms(layer, count)
    fns[CEILING, "fwd"], fns[CEILING, "fwd+bwd"] = gemms.forward, gemms.forward_backward
    times = median_ms(fns, repeats)
    dense = {"tokens": count, "shape": f"[{a.shape[0]}, {layer.d}] x [{layer.d}, {b.shape[1]}]",
             "ms": times["dense"], "gflops": 2 * a.numel() * b.shape[1] / times["dense"] / 1e6}
    rows = []
    pairs_of = {name: impl.routing(x).indices.numel() for name, impl in impls.items()} | {CEILING: gemms.pairs}
    for name, pairs in pairs_of.items():
        flops = 2 * 3 * layer.d * layer.f * pairs
        row = {"tokens": count, "implementation": name, "pairs": pairs}
        for kind, multiple in (("fwd", 1), ("fwd+bwd", 2)):
            row[kind] = pass_figures(times[name, kind], times[LOOP, kind], multiple * flops, dense["gflops"])
        rows.append(row)
    return dense, rows


def moe_layer_table(layer: MoeLayer, tokens: tuple[int, ...], repeats: int) -> dict:
    """Table 1: the three implementations and the EC matmuls alone at each token count, with the dense-matmul
    reference of each."""
    rows, dense = [], []
    for count in tokens:
        reference, count_rows = layer_figures(layer, count, repeats)
        dense.append(reference)
        rows += count_rows
    shape = dict(d=layer.d, f=layer.f, experts=layer.num_experts, top_k=layer.top_k)
    return {"shape": shape, "rows": rows, "dense": dense}


# ---------------------------------------------------------------------------------------- block routing


def block_table(layer: MoeLayer, settings: RouterSettings, repeats: int) -> dict:
    """Table 2: one denoising block (``block_length`` tokens, one forward) under each router. Unique experts
    is what block routing cuts; at this size the layer reads each touched expert's weights for a handful of
    tokens, so its time should follow the unique-expert count."""
    x = layer.tokens(settings.block_length)
    impls = {GROUPED: routed(layer, router_settings(type="tc")),
             BATCHED: routed(layer, router_settings(type="ec", capacity_factor=1.0)),
             BLOCKED: routed(layer, settings)}
    times = median_ms({name: partial(forward, impl.run, x) for name, impl in impls.items()}, repeats)
    rows = [{"router": name, "tokens": x.shape[0], "ms": times[name],
             "unique_experts": int(impl.routing(x).pairs()[1].unique().numel())} for name, impl in impls.items()]
    tc = rows[0]
    for row in rows:
        row["unique_ratio"] = tc["unique_experts"] / row["unique_experts"]
        row["speedup"] = tc["ms"] / row["ms"]
    return {"settings": settings.describe(), "rows": rows}


# ------------------------------------------------------------------------------------------ tiny model


def random_ids(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Ordinary byte tokens, below the tiny tokenizer's special ids."""
    return torch.randint(0, TINY_EOS_ID, shape, generator=torch.Generator().manual_seed(seed))


def workload(mode: str, dims: dict, batch: int, length: int) -> tuple[nn.Module, Callable[[], None]]:
    """The model and one step of ``mode``: "inference" (a no_grad forward) or a masked-diffusion training step
    with AdamW on "routers" (gate weights only) or "all" parameters; fresh noise each step."""
    model = build_tiny_model(**dims)
    ids = random_ids((batch, length))
    if mode == "inference":
        return model, partial(forward, model, ids)
    if mode == "routers+checkpointing":  # recompute each layer in backward instead of keeping activations
        model.enable_activation_checkpointing()
        mode = "routers"
    model = make_trainable(model.train(), TrainableSection(mode=mode))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    prompt_len = torch.zeros(batch, dtype=torch.long)

    def step() -> None:
        noise = add_noise(ids, prompt_len, model.config.mask_token_id, 1e-3, gen)
        logits = model(input_ids=noise.noisy, mask_ratio=noise.t).logits
        diffusion_loss(logits, ids, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(mode: str, dims: dict, batch: int, length: int) -> dict:
    """Peak resident memory of one step above the resident memory just before it (Linux). A tiny forward
    first loads the kernels, so their one-off cost is not charged to the step; the first training step
    includes creating the optimiser state, which is part of what training costs."""
    model, step = workload(mode, dims, batch, length)
    forward(model, random_ids((1, 8)))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = proc_status_kib("VmRSS")
    step()
    peak = proc_status_kib("VmHWM")
    return {"baseline_mib": before / 1024, "peak_mib": peak / 1024, "above_baseline_mib": (peak - before) / 1024}


def fresh_process_peak(mode: str, dims: dict, batch: int, length: int) -> dict:
    """:func:`peak_memory` in a new interpreter, so nothing an earlier measurement left resident skews it."""
    args = json.dumps(dict(mode=mode, dims=dims, batch=batch, length=length))
    code = ("import json, sys, torch; from retrofit.tools.bench import THREADS, peak_memory; "
            "torch.set_num_threads(THREADS); print(json.dumps(peak_memory(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def evaluation_rates(model: nn.Module, repeats: int) -> dict:
    """Likelihood requests/s (a 48-token context, an 8-token continuation, 8 Monte-Carlo samples in one batch)
    and generated tokens/s (one 32-token block after a 48-token prompt, 32 steps, batch 1)."""
    ids, mask_id = random_ids((56,)).tolist(), model.config.mask_token_id
    settings = SamplerSettings(gen_length=32, steps=32, denoise_block=32)
    times = median_ms({
        "score": partial(mc_loglikelihood, model, ids[:48], ids[48:], mask_id=mask_id, mc_num=8, batch_size=8,
                         seed=0, device="cpu"),
        "generate": partial(generate, model, random_ids((1, 48)), mask_id, settings),
    }, repeats)
    return {"loglikelihood_requests_per_s": 1e3 / times["score"],
            "generation_tokens_per_s": settings.gen_length * 1e3 / times["generate"]}


def model_table(dims: dict, repeats: int, batch: int = TRAIN_BATCH, length: int = TRAIN_LENGTH,
                probe: Callable[..., dict] = fresh_process_peak) -> dict:
    """Table 3: the tiny model's step rates and peak memory per mode, then likelihood and generation rates.
    ``probe`` measures one mode's peak memory (a fresh process by default)."""
    modes = ("inference", "routers", "routers+checkpointing", "all")
    times = median_ms({mode: workload(mode, dims, batch, length)[1] for mode in modes}, repeats)
    steps = {mode: {"ms": times[mode], "tokens_per_s": batch * length * 1e3 / times[mode],
                    "memory": probe(mode=mode, dims=dims, batch=batch, length=length)} for mode in modes}
    above = {mode: s["memory"]["above_baseline_mib"] for mode, s in steps.items()}
    return {"dims": dims, "batch": batch, "length": length, "steps": steps,
            "memory_ratio": above["routers"] / above["inference"] if above["inference"] else math.inf,
            "rss_ratio": steps["routers"]["memory"]["peak_mib"] / steps["inference"]["memory"]["peak_mib"],
            "checkpointed_memory_ratio": (above["routers+checkpointing"] / above["inference"]
                                          if above["inference"] else math.inf),
            **evaluation_rates(build_tiny_model(**dims), repeats)}


def memory_table(dims: dict, batch: int = MEMORY_BATCH, length: int = MEMORY_LENGTH,
                 probe: Callable[..., dict] = fresh_process_peak) -> dict:
    """Table 4: whole-process peak memory of inference and of a routers-only training step on a model whose
    weights dominate memory, as LLaDA-MoE-7B's do."""
    peaks = {mode: probe(mode=mode, dims=dims, batch=batch, length=length) for mode in ("inference", "routers")}
    return {"dims": dims, "batch": batch, "length": length, "peaks": peaks,
            "ratio": peaks["routers"]["peak_mib"] / peaks["inference"]["peak_mib"]}


# ------------------------------------------------------------------------------------------ targets


def targets(results: dict, tokens: int = TARGET_TOKENS) -> list[dict]:
    """The project's goals, each with the figure measured in this run and whether it was met."""
    layer = {r["implementation"]: r for r in results["moe_layer"]["rows"] if r["tokens"] == tokens}
    ec, ceiling = layer[BATCHED]["fwd+bwd"], layer[CEILING]["fwd+bwd"]
    block = next(r for r in results["block"]["rows"] if r["router"] == BLOCKED)
    checks = [
        (f"EC fwd+bwd vs TC loop at {tokens} tokens", ec["speedup"], ">=", 1.5, "x", ceiling["speedup"]),
        (f"EC fwd+bwd share of dense-matmul rate at {tokens} tokens", ec["pct_dense"], ">=", 85.0, "%",
         ceiling["pct_dense"]),
        ("TC / block unique experts in one block", block["unique_ratio"], ">=", 3.0, "x", None),
        ("block MoE-layer speed-up over TC in one block", block["speedup"], ">=", 2.0, "x", None),
        ("routers-only training peak / inference peak (LLaDA-MoE layer size)", results["memory"]["ratio"], "<=",
         1.3, "x", None),
    ]
    return [{"target": name, "measured": value, "op": op, "bound": bound, "unit": unit, "gemms_alone": alone,
             "met": value >= bound if op == ">=" else value <= bound}
            for name, value, op, bound, unit, alone in checks]


# ---------------------------------------------------------------------------------------------- main


def environment(repeats: int) -> dict:
    """What the figures depend on besides the code; the load average shows whether other work shared the
    CPU (with 2 threads on a busy machine every parallel region waits for a free core)."""
    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": repeats, "warmup": WARMUP, "load_avg_1min": [os.getloadavg()[0]]}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def run(quick: bool) -> dict:
    """All three tables at the sizes of the brief; ``quick`` runs once per figure and drops 2048 tokens."""
    torch.set_num_threads(THREADS)
    repeats = 1 if quick else 5
    tokens = tuple(t for t in LAYER_TOKENS if not (quick and t > TARGET_TOKENS))
    layer = MoeLayer(**LLADA_MOE)
    results = {
        "environment": environment(repeats),
        "moe_layer": moe_layer_table(layer, tokens, repeats),
        "block": block_table(layer, BLOCK, repeats),
        "model": model_table(MODEL_DIMS, repeats),
        "memory": memory_table(MODEL_DIMS if quick else LAYER_SIZE_MODEL),
    }
    results["environment"]["load_avg_1min"].append(os.getloadavg()[0])
    results["targets"] = targets(results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrofit.tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for bench.md/json")
    parser.add_argument("--quick", action="store_true", help="one run per figure, no 2048-token layer")
    args = parser.parse_args(argv)
    print(write_report(run(args.quick), args.out, CEILING))


if __name__ == "__main__":
    main()
