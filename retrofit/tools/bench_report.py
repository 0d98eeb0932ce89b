"""The report of ``python -m retrofit.tools.bench``: its results as Markdown tables (``bench.md``) beside the
raw figures (``bench.json``).

Apart from :mod:`retrofit.tools.bench`, which measures, so that rewording a table cannot touch what is timed. It
imports nothing from there (that module imports this one); what it needs of the measurements comes in as data.
"""

from __future__ import annotations

import json
from pathlib import Path


def num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:#.3g}"


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(num(c) if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]


def shape_text(shape: dict) -> str:
    """``d=…, f=…, E=…, k=…`` and, where the layer has them, its shared expert and scoring."""
    text = f"d={shape['d']}, f={shape['f']}, E={shape['experts']}, k={shape['top_k']}"
    if "shared" in shape:
        text += f", shared expert f={shape['shared']}"
    return text + (f", {shape['scoring']} scoring" if "scoring" in shape else "")


def layer_tables(table: dict) -> list[str]:
    """A layer table (table 1, table 5's first) and its dense-matmul reference."""
    passes = ("fwd", "fwd+bwd")
    headers = ["tokens", "implementation"] + [f"{p} {h}" for p in passes
                                              for h in ("ms", "speed-up", "GFLOP/s", "% dense")]
    rows = [[r["tokens"], r["implementation"]] + [v for p in passes for v in
            (r[p]["ms"], f"{num(r[p]['speedup'])}x", r[p]["gflops"], f"{num(r[p]['pct_dense'])}%")]
            for r in table["rows"]]
    if "copy_gb_per_s" in table:  # the weight-read limit (results written before it have none)
        headers += ["experts touched", "limit ms"]
        rows = [row + [r["unique_experts"], r["limit_ms"]] for row, r in zip(rows, table["rows"])]
    dense = [[d["tokens"], d["shape"], d["ms"], d["gflops"]] for d in table["dense"]]
    limit = ([f"Limit: the bytes of the expert weights a row touches over this device's copy bandwidth, "
              f"{num(table['copy_gb_per_s'])} GB/s (read + write, measured).", ""] if "copy_gb_per_s" in table else [])
    return [*md_table(headers, rows), "", *limit, "Dense-matmul reference (same FLOPs as the forward's expert work):",
            "", *md_table(["tokens", "matmul", "ms", "GFLOP/s"], dense), ""]


def block_lines(table: dict) -> list[str]:
    body = [[r["router"], r["unique_experts"], r["ms"], f"{num(r['unique_ratio'])}x", f"{num(r['speedup'])}x",
             *([r["limit_ms"]] if "limit_ms" in r else [])] for r in table["rows"]]
    limit = ["limit ms"] if table["rows"] and "limit_ms" in table["rows"][0] else []
    return [*md_table(["router", "unique experts", "MoE fwd ms", "TC / this (unique experts)",
                       "TC / this (time)", *limit], body), ""]


def layer_markdown(table: dict) -> list[str]:
    return [f"## 1. MoE layer ({shape_text(table['shape'])}, one sequence, experts frozen)", "",
            "Times include the router. Useful expert FLOPs = 2·3·d·f per routed (token, expert) pair; fwd+bwd "
            "counts 2x the forward FLOPs, because with frozen experts backward runs only the input-gradient "
            f"matmuls (x and gate get gradients). Speed-up is against the {table['baseline']}; % dense is the "
            "achieved rate over the plain-matmul rate measured below at the same FLOPs.", "",
            *layer_tables(table)]


def block_markdown(table: dict) -> list[str]:
    return [f"## 2. One denoising block ({table['settings']}, same layer, random tokens)", "", *block_lines(table)]


def llada2_markdown(section: dict, seconds: dict) -> list[str]:
    layer, block = section["layer"], section["block"]
    cost = (f" This section took {seconds['llada2']:.0f} s of the bench's {seconds['total']:.0f} s."
            if "llada2" in seconds else "")
    return [f"## 5. LLaDA2.0-mini MoE layer ({shape_text(layer['shape'])}, one sequence, experts frozen)", "",
            "One MoE layer of LLaDA2.0-mini's size built as the family's SharedExpertMoe computes it (fp32 gate, "
            "sigmoid scores plus a random expert bias for selection, group-limited top-k, gates renormalised and "
            "scaled, the k outputs summed in fp32, plus the always-on shared expert), random weights "
            "with a gate std that keeps the sigmoid scores spread. The routers are swapped on the same layer: "
            f"{layer['baseline']} is the family's own token choice (the speed-up baseline), EC has capacity "
            f"factor 1.0 (the same FLOPs), block routing has dMoE's settings ({block['settings']}). FLOPs and "
            "the dense reference count the shared expert as one more expert per token. Then one denoising "
            "block under each router, as table 2: dMoE's claim is that block routing touches far fewer unique "
            f"experts, hence reads far fewer expert weights.{cost}", "",
            *layer_tables(layer), "One denoising block (same layer, random tokens):", "", *block_lines(block)]


def model_markdown(m: dict) -> list[str]:
    labels = {"inference": "inference (no_grad forward)", "routers": "train routers only",
              "routers+checkpointing": "train routers only, activation checkpointing", "all": "train all"}
    body = [[labels[mode], s["ms"], s["tokens_per_s"], s["memory"]["above_baseline_mib"], s["memory"]["peak_mib"]]
            for mode, s in m["steps"].items()]
    return [f"## 3. Tiny model ({', '.join(f'{k}={v}' for k, v in m['dims'].items())}; TC router)", "",
            f"Steps on a batch of {m['batch']} x {m['length']} tokens (training: masked-diffusion loss, backward, "
            "AdamW). Peak memory is VmHWM of one step in a fresh process, above the resident memory just before "
            "it (the first step, so it includes creating the optimiser state).", "",
            *md_table(["mode", "step ms", "tokens/s", "peak above baseline MiB", "peak RSS MiB"], body), "",
            f"Routers-only training peak / inference peak (above baseline): {num(m['memory_ratio'])}x "
            f"({num(m['checkpointed_memory_ratio'])}x with activation checkpointing); whole-process peak RSS "
            f"ratio: {num(m['rss_ratio'])}x", "",
            *md_table(["loglikelihood requests/s (mc_num 8, batch 8, 48+8 tokens)",
                       "generation tokens/s (gen 32, steps 32, block 32, batch 1)"],
                      [[m["loglikelihood_requests_per_s"], m["generation_tokens_per_s"]]]), ""]


def memory_markdown(m: dict) -> list[str]:
    labels = {"inference": "inference (no_grad forward)", "routers": "train routers only"}
    body = [[labels[mode], p["peak_mib"], p["baseline_mib"], p["above_baseline_mib"]] for mode, p in m["peaks"].items()]
    return [f"## 4. Peak memory at LLaDA-MoE layer size ({', '.join(f'{k}={v}' for k, v in m['dims'].items())})", "",
            f"One step on {m['batch']} x {m['length']} tokens in a fresh process; the peak is the whole process's "
            "VmHWM, weights included, as a user would see it.", "",
            *md_table(["mode", "peak RSS MiB", "before the step MiB", "step's own MiB"], body), "",
            f"Routers-only training peak / inference peak: {num(m['ratio'])}x", ""]


def targets_markdown(checks: list[dict], ceiling: str) -> list[str]:
    body = [[c["target"], f"{num(c['measured'])}{c['unit']}", f"{c['op']} {num(c['bound'])}{c['unit']}",
             "PASS" if c["met"] else "MISS",
             "" if c["gemms_alone"] is None else f"{num(c['gemms_alone'])}{c['unit']}"] for c in checks]
    return ["## Targets", "",
            f"The last column is the same figure for `{ceiling}` (table 1): the batched matmuls with everything "
            "else free, i.e. the most the EC path could reach with this device's matmul library.", "",
            *md_table(["target", "measured", "goal", "result", ceiling], body), ""]


SECTIONS = {"llada_moe": "tables 1-2", "llada2": "table 5", "model": "table 3", "memory": "table 4", "total": "total"}


def total_time(env: dict) -> str:
    """The wall time of each section, where the run kept it."""
    seconds = env.get("seconds")
    if not seconds:
        return ""
    return " Wall time: " + ", ".join(f"{SECTIONS.get(name, name)} {s:.0f} s" for name, s in seconds.items()) + "."


def render(results: dict, ceiling: str) -> str:
    """The whole ``bench.md``; ``ceiling`` names table 1's matmuls-alone row, which the targets compare against."""
    env = results["environment"]
    gpu = (f" Tables 1, 2 and 5 ran on {env['device']}, each timing ended by a CUDA synchronisation; tables 3 and 4 "
           "on the CPU." if env.get("gpu") else "")
    head = ["# retrofit benchmark", "",
            f"CPU {env['cpu']}, torch {env['torch']}, {env['threads']} threads, fp32; median of {env['repeats']} "
            f"runs after {env['warmup']} warm-up.{gpu} 1-minute load average (start → end): "
            f"{' → '.join(f'{x:.2f}' for x in env['load_avg_1min'])}.{total_time(env)}", ""]
    cpu_tables = ((model_markdown(results["model"]) if "model" in results else [])
                  + (memory_markdown(results["memory"]) if "memory" in results else []))
    lines = (head + layer_markdown(results["moe_layer"]) + block_markdown(results["block"]) + cpu_tables
             + llada2_markdown(results["llada2"], env.get("seconds", {}))
             + targets_markdown(results["targets"], ceiling))
    return "\n".join(lines)


def write_report(results: dict, out: Path, ceiling: str) -> str:
    """Write ``out/bench.md`` and ``out/bench.json``; returns the Markdown, which the run also prints."""
    text = render(results, ceiling)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    return text
