"""What every figure retrofit draws shares: matplotlib without a display, one size, one color and line style per
series, README-sized PNGs (inspect's routing figures, the studies', a fine-tuning run's curves)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are drawn on training boxes and in CI, where there is no display

import matplotlib.pyplot as plt  # noqa: E402

DPI = 110
WIDE = (11.0, 4.2)
COLORS = plt.get_cmap("tab10").colors
STYLES = ["-", "--", "-.", ":"]


def series_style(i: int) -> dict:
    """Color and linestyle of the i-th series, the same in every figure so a reader learns them once."""
    return {"color": COLORS[i % len(COLORS)], "linestyle": STYLES[i % len(STYLES)]}


def save_figure(fig, out_dir: Path, name: str) -> Path:
    """Tight layout and a README-sized PNG; the figure is closed so drawing many files does not pile up memory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    if fig.get_layout_engine() is None:  # a figure with a colorbar brought its own (constrained) layout
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
