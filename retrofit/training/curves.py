"""``curves.png`` beside a fine-tuning run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from retrofit.figures import plt, save_figure, series_style


def training_curves(records: list[dict], out_dir: Path) -> Path:
    """``curves.png`` of a fine-tuning run from its metrics.jsonl records: each loss term (one panel each, the
    z-loss's scale is not the diffusion loss's), the learning rate and tokens per second against steps."""
    if not records:
        raise ValueError("no metrics to draw: metrics.jsonl is empty")
    steps = [r["step"] for r in records]
    titles = {"diffusion": "diffusion loss", "distill": "distillation KL", "balance": "balance loss",
              "z_loss": "router z-loss", "lr": "learning rate", "tokens_per_s": "tokens / s"}
    panels = [(k, title) for k, title in titles.items() if k in records[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.plot(steps, [r.get(key) for r in records], **series_style(0), marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("fine-tuning: means over each logging window")
    return save_figure(fig, out_dir, "curves")
