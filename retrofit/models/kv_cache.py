"""A block-wise key/value cache for denoising samplers (Fast-dLLM's prefix and dual caches; exact for LLaDA2.0's
block-causal attention, where finished blocks never see later ones).

A *refresh* is a full forward that records every attention layer's keys and values for the whole sequence. A
*cached step* computes only a span of columns (the current block; under the prefix cache also everything after
it): its tokens run attention and the MoE layers, and attend to the span's fresh keys and values plus the
recorded ones outside the span. For a bidirectional model (LLaDA-MoE) the recorded ones are stale once tokens
change, which is the approximation. Expert choice, which chooses among a whole sequence's tokens, remembers at the
refresh each expert's cut-off (:meth:`BlockCache.remember`) and takes the span's tokens that reach it, so a cached
step right after a refresh routes as the full forward did; later the cut-offs are stale like the keys. Routing
statistics count what a step computed.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockCache:
    """Every attention layer's keys and values ``[B, H_kv, L, d]`` (after the rotation) from the last refresh, and
    what the current forward computes: ``span`` (None: everything, and record), ``rows`` (the batch rows in the
    forward; the recorded rows must include them)."""

    def __init__(self) -> None:
        self._recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._remembered: dict[int, torch.Tensor] = {}  # per router, what it chose by at the refresh
        self._row_index: torch.Tensor | None = None
        self._recorded_rows: list[int] = []
        self._selected: list[int] | None = None
        self.span: slice | None = None
        self.rows: list[int] | None = None

    @property
    def recording(self) -> bool:
        return self.span is None

    def select(self, rows: list[int]) -> None:
        """Which rows of the sampler's batch the next forward holds (default: all, in order)."""
        self._selected = list(rows)

    def start(self, span: slice | None, batch: int) -> None:
        """Called by the model at each forward of ``batch`` rows: a refresh (``span`` None) or a cached step."""
        rows, self._selected = self._selected if self._selected is not None else list(range(batch)), None
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} rows selected for a forward of {batch}")
        if span is not None and not self._recorded:
            raise RuntimeError("a cached step needs a refresh first")
        if span is None:
            self._recorded.clear()
            self._remembered.clear()
            self._recorded_rows = list(rows)
        elif not set(rows) <= set(self._recorded_rows):
            raise RuntimeError(f"rows {sorted(set(rows) - set(self._recorded_rows))} were not in the last refresh")
        self.span, self.rows = span, list(rows)
        self._row_index = None  # where this forward's rows sit among the recorded ones: made once, on first need

    def attend(self, layer: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``layer`` attends to: this forward's own, recorded (a refresh), or set into the
        recorded ones at the span (a cached step)."""
        if self.recording:
            self._recorded[id(layer)] = (keys, values)
            return keys, values
        old_keys, old_values = self._these_rows(*self._recorded[id(layer)])
        lo, hi = self.span.start, self.span.stop
        return (torch.cat([old_keys[:, :, :lo], keys, old_keys[:, :, hi:]], dim=2),
                torch.cat([old_values[:, :, :lo], values, old_values[:, :, hi:]], dim=2))

    def remember(self, owner: nn.Module, value: torch.Tensor) -> None:
        """At a refresh: ``value`` (one row per batch row) for ``owner`` to recall at the cached steps."""
        if self.recording:
            self._remembered[id(owner)] = value

    def recall(self, owner: nn.Module) -> torch.Tensor | None:
        """At a cached step: what ``owner`` remembered at the refresh, for this step's rows (None: nothing)."""
        value = self._remembered.get(id(owner))
        return None if value is None or self.recording else self._these_rows(value)[0]

    def _these_rows(self, *recorded: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows of this forward out of tensors recorded for the refresh's rows."""
        if self.rows == self._recorded_rows:
            return recorded
        if self._row_index is None:  # once per forward, not once per layer
            self._row_index = torch.tensor([self._recorded_rows.index(r) for r in self.rows]).to(
                recorded[0].device, non_blocking=True)
        return tuple(t.index_select(0, self._row_index) for t in recorded)
