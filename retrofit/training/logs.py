"""What a fine-tuning run writes beside its checkpoints, one JSON object per line: ``metrics.jsonl`` (training
loss terms and routing, per logging step) and ``heldout.jsonl`` (held-out loss, per evaluation step)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from retrofit.heldout import heldout_losses
from retrofit.io.text_data import build_sequences

HELDOUT_FILE = "heldout.jsonl"


class JsonlLog:
    """One JSON object per line; on resume, lines past the resumed step are dropped (they are redone)."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        kept = []
        if keep_until and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))
        self.last = json.loads(kept[-1]) if kept else None

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.last = record


class HeldoutProbe:
    """The recipe's ``heldout`` section at work: the loss on held-out text before the first step, every
    ``every`` steps and at the end, with the training wall-clock spent so far (evaluation excluded), so runs
    compare against steps, tokens or seconds."""

    def __init__(self, section, recipe_dir: Path, tokenizer, mask_id: int, output_dir: Path, keep_until: int,
                 write: bool = True):
        """``write``: this process keeps the log (rank 0); every rank measures, so that ranks stay in step."""
        self.section, self.mask_id = section, mask_id
        data = section.data.model_copy(update={"objective": "pretrain"})
        self.sequences = build_sequences(data, recipe_dir, tokenizer).input_ids
        self.log = JsonlLog(output_dir / HELDOUT_FILE, keep_until) if write else None
        self.train_seconds = float(self.log.last["train_s"]) if self.log and self.log.last else 0.0
        self._clock = time.perf_counter()

    def due(self, done: int, max_steps: int) -> bool:
        return done == 0 or done % self.section.every == 0 or done == max_steps

    def measure(self, model, base, done: int, tokens: int) -> dict:
        """Evaluate ``model`` (``base``: the unwrapped model, whose routing statistics pause meanwhile)."""
        if done > 0:  # before the first step nothing has trained yet
            self.train_seconds += time.perf_counter() - self._clock
        was_training = model.training
        model.eval()
        try:
            s = self.section
            with base.routing_stats_paused():
                losses = heldout_losses(model, self.sequences, self.mask_id, s.mask_ratios, s.samples, s.seed)
        finally:
            model.train(was_training)
        record = {"step": done, "tokens": tokens, "train_s": round(self.train_seconds, 3), **losses}
        if self.log:
            self.log.write(record)
        self._clock = time.perf_counter()
        return record
