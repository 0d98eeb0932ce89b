"""Figures of ``routing.json``: one PNG per question (where the load goes, how many experts a token gets, who gets
none, what the capacity schedule asks for against what runs, how many distinct experts a forward or a block touches,
how much gate mass a token carries). Every model of a file is drawn on the same axes or color scale, because the
point of ``retrofit inspect`` is to compare routers; a figure per model would hide the differences."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from retrofit.figures import WIDE, plt, save_figure, series_style

SHADES = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys"]


def _ratios(data: dict) -> list[float]:
    """Mask ratios over all models, sorted: buckets are matched by ratio, not position, so models may differ."""
    return sorted({b["mask_ratio"] for m in data["models"] for b in m["buckets"]})


def _bucket(model: dict, ratio: float) -> dict | None:
    return next((b for b in model["buckets"] if b["mask_ratio"] == ratio), None)


def _layer_mean(bucket: dict | None, key: str) -> float:
    """Mean of one statistic over a bucket's layers; NaN (a gap in a line) where the model lacks the bucket."""
    values = [layer[key] for layer in bucket["layers"] if layer.get(key) is not None] if bucket else []
    return float(np.mean(values)) if values else float("nan")


def layer_load(model: dict) -> np.ndarray:
    """Tokens per expert of each layer, summed over buckets (layers × experts): the load a whole sweep put on them."""
    loads = np.zeros((model["num_layers"], model["num_experts"]))
    for bucket in model["buckets"]:
        for i, layer in enumerate(bucket["layers"]):
            loads[i] += np.asarray(layer["tokens_per_expert"], dtype=float)
    return loads


def load_cv(model: dict) -> np.ndarray:
    """Coefficient of variation (std / mean) of each layer's load: 0 is perfectly balanced, the usual balance score."""
    loads = layer_load(model)
    mean = loads.mean(axis=1)
    return np.divide(loads.std(axis=1), mean, out=np.zeros_like(mean), where=mean > 0)


def expert_load(data: dict, out_dir: Path) -> Path:
    """Heatmap of the share of each layer's tokens every expert processed, one panel per model on one color scale,
    so hot experts, dead ones and a router that runs fewer experts read the same in every model; the per-layer CV
    sits in the y tick labels."""
    models = data["models"]
    shares = []
    for model in models:  # tokens an expert processed / tokens the layer saw: a row sums to realised k, not 1
        loads = layer_load(model)
        tokens = np.zeros((model["num_layers"], 1))
        for bucket in model["buckets"]:
            tokens[:, 0] += [layer["tokens"] for layer in bucket["layers"]]
        shares.append(np.divide(loads, tokens, out=np.zeros_like(loads), where=tokens > 0))
    vmax = max((float(s.max()) for s in shares), default=1.0) or 1.0
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.2 * max(1, len(models)) + 1.2, 3.8),
                             squeeze=False, layout="constrained")
    image = None
    for ax, model, share in zip(axes[0], models, shares):
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(model["label"])
        ax.set_xlabel("expert")
        ax.set_xticks(range(model["num_experts"]))
        ax.set_yticks(range(model["num_layers"]))
        ax.set_yticklabels([f"L{i} (CV {cv:.2f})" for i, cv in enumerate(load_cv(model))])
    axes[0][0].set_ylabel("layer (load CV)")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="share of the layer's tokens", fraction=0.04, pad=0.02)
    fig.suptitle("Expert load, summed over mask ratios")
    return save_figure(fig, out_dir, "expert_load")


def experts_per_token(data: dict, out_dir: Path) -> Path:
    """Histogram of experts per token per mask ratio, models as grouped bars: token choice is a spike at top_k, an
    expert-choice router spreads tokens from 0 to E, and this is where that spread shows."""
    models, ratios = data["models"], _ratios(data)
    top = max(m["num_experts"] for m in models)
    fig, axes = plt.subplots(1, len(ratios), figsize=(max(WIDE[0], 3.0 * len(ratios)), 3.8), sharey=True,
                             squeeze=False)
    width = 0.8 / len(models)
    for ax, ratio in zip(axes[0], ratios):
        for i, model in enumerate(models):
            hist = np.zeros(top + 1)
            bucket = _bucket(model, ratio)
            for layer in bucket["layers"] if bucket else []:
                counts = np.asarray(layer["experts_per_token_histogram"], dtype=float)
                hist[: len(counts)] += counts
            hist = hist / hist.sum() if hist.sum() else hist
            x = np.arange(top + 1) + (i - (len(models) - 1) / 2) * width
            ax.bar(x, hist, width, color=series_style(i)["color"], label=model["label"])
        ax.set_title(f"mask ratio {ratio:g}")
        ax.set_xlabel("experts per token")
        ax.set_xticks(range(top + 1))
    axes[0][0].set_ylabel("share of tokens")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle("Experts per token (all layers)")
    return save_figure(fig, out_dir, "experts_per_token")


def zero_expert_tokens(data: dict, out_dir: Path) -> Path:
    """Share of tokens no expert took, per layer and mask ratio: under expert choice these tokens get only the
    residual (and shared experts), the cost a capacity schedule pays for its savings."""
    ratios = _ratios(data)
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for i, model in enumerate(data["models"]):
        shades = plt.get_cmap(SHADES[i % len(SHADES)])(np.linspace(0.45, 0.95, len(ratios)))
        for shade, ratio in zip(shades, ratios):
            bucket = _bucket(model, ratio)
            if bucket is None:
                continue
            share = [layer["tokens_with_zero_experts"] / layer["tokens"] if layer["tokens"] else 0.0
                     for layer in bucket["layers"]]
            ax.plot(range(len(share)), share, marker="o", color=shade, linestyle=series_style(i)["linestyle"],
                    label=f"{model['label']}, r={ratio:g}")
    layers = max(m["num_layers"] for m in data["models"])
    ax.set_xticks(range(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens with no expert")
    ax.set_title("Tokens routed to no expert")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out_dir, "zero_expert_tokens")


def capacity(data: dict, out_dir: Path) -> Path:
    """Experts per token the schedule asks for (expected_k, dashed) against what ran (realised_k, solid) per mask
    ratio: a gap means capacity is lost to collisions or dropped, which the FLOP estimate would not see."""
    ratios = _ratios(data)
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    for i, model in enumerate(data["models"]):
        color = series_style(i)["color"]
        expected = [_layer_mean(_bucket(model, r), "expected_k") for r in ratios]
        realised = [_layer_mean(_bucket(model, r), "realised_k") for r in ratios]
        ax.plot(ratios, expected, "--", marker="s", color=color, label=f"{model['label']} asked")
        ax.plot(ratios, realised, "-", marker="o", color=color, label=f"{model['label']} realised")
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("experts per token (mean over layers)")
    ax.set_title("Capacity: experts per token asked vs realised")
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir, "capacity")


def unique_experts(data: dict, out_dir: Path) -> Path:
    """Distinct experts touched per forward and per block: the weights that must be read, which decides memory
    traffic at small batch far more than FLOPs do."""
    block = data.get("settings", {}).get("block_length", 32)
    groups = ["per forward", f"per {block}-token block"]
    models = data["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, model in enumerate(models):
        values = [np.nanmean([_layer_mean(b, key) for b in model["buckets"]])
                  for key in ("unique_experts", "unique_experts_per_block")]
        x = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
        bars = ax.bar(x, values, width, color=series_style(i)["color"], label=f"{model['label']} (E={model['num_experts']})")
        ax.bar_label(bars, fmt="%.1f", fontsize="small")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.margins(y=0.1)  # room for the bar labels
    ax.set_ylabel("unique experts (mean over layers, ratios)")
    ax.set_title("Unique experts touched")
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir, "unique_experts")


def gate_mass(data: dict, out_dir: Path) -> Path:
    """Gate mass per token per mask ratio, models as grouped bars: a token-choice router always hands out the same
    mass, an expert-choice one gives some tokens more and some none, which scales the MoE output."""
    models, ratios = data["models"], _ratios(data)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for i, model in enumerate(models):
        values = [_layer_mean(_bucket(model, r), "gate_mass_per_token") for r in ratios]
        x = np.arange(len(ratios)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, values, width, color=series_style(i)["color"], label=model["label"])
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels([f"{r:g}" for r in ratios])
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("gate mass per token (mean over layers)")
    ax.set_title("Gate mass per token")
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir, "gate_mass")


FIGURES: list[Callable[[dict, Path], Path]] = [
    expert_load, experts_per_token, zero_expert_tokens, capacity, unique_experts, gate_mass,
]


def draw_all(data: dict, out_dir: Path) -> list[Path]:
    """Every figure, in report order; a file without models is an error rather than six empty pictures."""
    if not data.get("models"):
        raise ValueError("routing.json has no models to draw")
    return [figure(data, Path(out_dir)) for figure in FIGURES]
