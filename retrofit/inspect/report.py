"""``report.md`` of a ``retrofit inspect`` run: the few numbers that compare routers at a glance (one row per model)
and the figures under them, with relative links so the folder can be moved, committed or pasted into a README."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retrofit.inspect.figures import load_cv

CAPTIONS = {
    "expert_load": "Share of each layer's tokens each expert processed (all mask ratios); load CV per layer at left.",
    "experts_per_token": "How many experts a token gets, per mask ratio (all layers).",
    "zero_expert_tokens": "Share of tokens that no expert took, per layer and mask ratio.",
    "capacity": "Experts per token the schedule asks for at each bucket's mask ratio (dashed) against what ran (solid).",
    "unique_experts": "Distinct experts touched per forward and per block: the weights a step must read.",
    "gate_mass": "Sum of a token's gates, per mask ratio.",
}


def _cell(text: object) -> str:
    """A table cell: a pipe in a label or router setting would split the row."""
    return str(text).replace("|", "\\|")


def _router(model: dict) -> str:
    """Router type first, then its settings, short: the table says which router, the JSON keeps the detail."""
    router = dict(model.get("router") or {})
    kind = router.pop("type", "?")
    extras = ", ".join(f"{k}={v}" for k, v in router.items() if not isinstance(v, (dict, list)))
    return f"{kind} ({extras})" if extras else str(kind)


def _layers(model: dict) -> list[dict]:
    return [layer for bucket in model["buckets"] for layer in bucket["layers"]]


def _mean(layers: list[dict], key: str) -> float:
    values = [layer[key] for layer in layers if layer.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def _row(model: dict) -> str:
    """One model's summary over all layers and mask ratios (zero-expert share weighted by tokens, the rest means)."""
    layers = _layers(model)
    tokens = sum(layer["tokens"] for layer in layers)
    zero = sum(layer["tokens_with_zero_experts"] for layer in layers) / tokens if tokens else 0.0
    cells = [model["label"], _router(model), f"{model['num_experts']} / {model['top_k']}",
             f"{_mean(layers, 'unique_experts'):.2f}", f"{_mean(layers, 'unique_experts_per_block'):.2f}",
             f"{zero:.1%}", f"{_mean(layers, 'gate_mass_per_token'):.3f}", f"{float(np.mean(load_cv(model))):.3f}"]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _scores(models: list[dict]) -> list[str]:
    """The task scores of a run that recorded routing during tasks (none for a noising sweep)."""
    rows = [(m["label"], task, metric, value) for m in models for task, metrics in (m.get("scores") or {}).items()
            for metric, value in metrics.items()
            if isinstance(value, float) and "stderr" not in metric and not task.startswith("mmlu_")]
    if not rows:
        return []
    lines = ["| model | task | metric | value |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in (label, task, metric, f"{value:.4f}")) + " |"
              for label, task, metric, value in rows]
    return lines + [""]


def _settings(data: dict) -> str:
    s = data.get("settings", {})
    ratios = ", ".join(f"{r:g}" for r in s.get("mask_ratios", []))
    if s.get("source") == "tasks":
        sampler = s.get("sampler") or {}
        knobs = ", ".join(f"{k} {v}" for k, v in sampler.items() if k != "name" and v is not None)
        limit = f"the first {s['limit']} documents of each" if s.get("limit") else "every document of each"
        return (f"Recorded while lm-eval ran {', '.join(s.get('tasks', []))} ({limit}; data "
                f"`{s.get('data_dir') or 'the Hub'}`), {sampler.get('name', '?')} sampler ({knobs}). Every forward "
                f"(of the sampler, or of Monte-Carlo likelihood) goes to the bucket of the mask ratio it saw, "
                f"centred on {ratios}; prompt tokens are routed and counted too. Blocks of "
                f"{s.get('block_length', 32)} tokens, cut where the sampler cuts them.")
    return (f"Data `{s.get('data', '?')}`, its first {s.get('limit', '?')} records in sequences of "
            f"{s.get('seq_len', '?')} tokens, "
            f"mask ratios {ratios}, blocks of {s.get('block_length', 32)} tokens, seed {s.get('seed', '?')}.")


def write_report(data: dict, figures: list[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md``: the summary table, then every figure with a one-line caption."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    block = data.get("settings", {}).get("block_length", 32)
    lines = ["# Routing report", "", _settings(data), "",
             f"| model | router | experts / top-k | unique experts / forward | unique experts / {block}-token block "
             "| zero-expert tokens | gate mass / token | load CV |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(model) for model in data["models"]]
    lines += ["", "Means over layers and mask ratios; load CV is std/mean of tokens per expert, averaged over layers.",
              ""]
    lines += _scores(data["models"])
    for figure in map(Path, figures):
        link = Path(os.path.relpath(figure, out_dir)).as_posix()
        lines += [f"## {figure.stem.replace('_', ' ').capitalize()}", "", f"![{figure.stem}]({link})", "",
                  CAPTIONS.get(figure.stem, figure.stem), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_inspection(record: dict, out: Path) -> Path:
    """``routing.json``, the figures and ``report.md`` into ``out`` (``retrofit inspect``, and the
    ``<output>-routing/`` folder of ``retrofit eval``); returns the report's path."""
    import json

    from retrofit.inspect.figures import draw_all
    from retrofit.io.writer import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "routing.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return write_report(record, draw_all(record, out), out)
