"""Batches of unequal sequences. Each row sits at its own column offset (left padding), its positions count from
its own first token, and the padding is hidden from attention and from routing (``attention_mask``), so every
row computes what it would alone: the padded-batch tests hold each row of a batch to its unbatched output.

A sampler or the likelihood scorer lays its rows out (:func:`lay_out`), keeps a :class:`RowLayout`, and runs the
model on some or all rows (:func:`forward_rows`): rows that have finished are left out of a forward rather than
computed and thrown away, so the routing statistics count only what a row alone would have run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Where each row's tokens sit: ``pads[b]`` columns of padding, then its tokens up to ``ends[b]`` (None:
    to the last column)."""

    pads: tuple[int, ...]
    ends: tuple[int, ...] | None = None

    @property
    def padded(self) -> bool:
        return any(self.pads) or self.ends is not None

    def attention_mask(self, width: int, device) -> torch.Tensor | None:
        """``[B, width]`` bool, False at padding; None when no row is padded (the model then never asks)."""
        if not self.padded:
            return None
        columns = torch.arange(width)
        mask = columns >= torch.tensor(self.pads).unsqueeze(1)
        if self.ends is not None:
            mask &= columns < torch.tensor(self.ends).unsqueeze(1)
        return mask.to(device, non_blocking=True)

    def position_ids(self, width: int, device) -> torch.Tensor | None:
        """``[B, width]``: each row's positions from its first token (padding at 0); None when unpadded."""
        if not any(self.pads):
            return None
        positions = (torch.arange(width) - torch.tensor(self.pads).unsqueeze(1)).clamp(min=0)
        return positions.to(device, non_blocking=True)


def lay_out(rows: list[list[int]], pads: list[int], width: int, fill: int, device) -> torch.Tensor:
    """``[B, width]`` long: row b's tokens from column ``pads[b]``, ``fill`` elsewhere. Built on the host and sent
    in one copy."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for b, (row, pad) in enumerate(zip(rows, pads)):
        out[b, pad:pad + len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


def forward_rows(model, input_ids: torch.Tensor, layout: RowLayout, rows: list[int] | None = None,
                 maskable: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The model's logits for ``rows`` of the batch (None: all), each row with its own padding and positions;
    ``maskable`` is per row like ``input_ids``, other keyword arguments go to the model unchanged."""
    width, device = input_ids.shape[1], input_ids.device
    mask, positions = layout.attention_mask(width, device), layout.position_ids(width, device)
    if kwargs.get("kv_cache") is not None:
        kwargs["kv_cache"].select(rows if rows is not None else range(input_ids.shape[0]))
    if rows is not None and len(rows) < input_ids.shape[0]:
        input_ids, mask, positions, maskable = take_rows(rows, input_ids, mask, positions, maskable)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, maskable=maskable,
                 **kwargs).logits


def take_rows(rows: list[int] | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``rows`` of each tensor (None: all rows, the tensors themselves), selected on the device: the row numbers
    are sent over, nothing comes back."""
    if rows is None:
        return tensors
    index = torch.tensor(rows).to(next(t for t in tensors if t is not None).device, non_blocking=True)
    return tuple(None if t is None else t.index_select(0, index) for t in tensors)


def row_generators(generator, batch: int) -> list | None:
    """One generator per row (a list given), or None where one generator (or none) serves the whole batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} rows")
        return list(generator)
    return None


def block_logits(model, input_ids: torch.Tensor, layout: RowLayout, rows: list[int] | None, block: slice,
                 cache=None, refresh: bool = True, cached_end: int | None = None, **kwargs) -> torch.Tensor:
    """The logits of the ``block`` being denoised (its columns, for ``rows``): from a forward over the whole
    sequence (no cache; or a refresh, recording ``cache``), or from a cached step that computes the block and
    the columns after it up to ``cached_end`` (default: the block's end) against the recorded keys and values."""
    if refresh:
        cached = {} if cache is None else {"kv_cache": cache}  # a model without a cache never sees the argument
        return forward_rows(model, input_ids, layout, rows, logits_to_keep=block, **cached, **kwargs)
    span = slice(block.start, block.stop if cached_end is None else cached_end)
    return forward_rows(model, input_ids, layout, rows, kv_cache=cache, compute=span,
                        logits_to_keep=slice(0, block.stop - block.start), **kwargs)
