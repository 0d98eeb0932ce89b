"""A study's figures, in the style of ``retrofit inspect``'s (one color per variant, the same in every figure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrofit.figures import WIDE, plt, save_figure, series_style

__all__ = ["WIDE", "by_ratio", "curves", "plt", "save_figure", "series_style"]


def curves(series: dict[str, list[list[tuple[float, float]]]], xlabel: str, ylabel: str, title: str, out: Path,
           name: str, references: dict[str, float] | None = None) -> Path:
    """One line per variant (the mean over seeds at each x) with a band from the lowest to the highest seed;
    ``references``: horizontal dashed lines (e.g. the TC checkpoint's loss)."""
    fig, ax = plt.subplots(figsize=WIDE)
    for i, (label, seeds) in enumerate(series.items()):
        xs = np.array([x for x, _ in seeds[0]])
        ys = np.array([[y for _, y in seed] for seed in seeds])
        style = series_style(i)
        ax.plot(xs, ys.mean(0), label=f"{label} (n={len(seeds)})", marker="o", markersize=3, **style)
        if len(seeds) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=style["color"], alpha=0.15, linewidth=0)
    for j, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="black", linestyle=[":", "--"][j % 2], linewidth=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out, name)


def by_ratio(rows: dict[str, dict[str, list[float]]], title: str, out: Path, name: str,
             ylabel: str = "held-out loss (nats/token)") -> Path:
    """Loss at each mask ratio, one line per variant (mean over seeds, min–max band)."""
    fig, ax = plt.subplots(figsize=WIDE)
    for i, (label, per_ratio) in enumerate(rows.items()):
        ratios = sorted(per_ratio, key=float)
        values = np.array([per_ratio[r] for r in ratios])  # ratios × seeds
        xs = [float(r) for r in ratios]
        style = series_style(i)
        ax.plot(xs, values.mean(1), label=label, marker="o", markersize=3, **style)
        if values.shape[1] > 1:
            ax.fill_between(xs, values.min(1), values.max(1), color=style["color"], alpha=0.12, linewidth=0)
    ax.set(xlabel="mask ratio", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out, name)
