"""Routing statistics, gathered cheaply from a :class:`Routing` behind a switch (off by default).

Per MoE layer and forward pass: tokens per expert, the histogram of experts per token, the number of unique
experts activated (the figure the dMoE paper reports, averaged over (layer, forward) pairs;
docs/algorithms.md §6), tokens that no expert chose, and EC capacity. Pairs whose token is padding never
count: token choice routes padding (as the reference does), but it does no useful work.
"""

from __future__ import annotations

import torch

from retrofit.routers.base import Routing

# Mask-ratio buckets that ``retrofit inspect`` and ``retrofit eval`` split routing statistics into (centres).
MASK_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


class RoutingStats:
    """Counts accumulated over forwards (and, merged, over layers). All counts are sums except
    ``unique_experts``, the mean over the (layer, forward) routings seen."""

    def __init__(self, num_experts: int, block_length: int = 32):
        self.num_experts = num_experts
        self.block_length = block_length
        self.block_experts_total = 0  # sum over (layer, forward, block) of unique experts in the block
        self.blocks = 0
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.long)
        self.experts_per_token = torch.zeros(num_experts + 1, dtype=torch.long)  # histogram over 0..E experts
        self.unique_experts_total = 0  # summed over routings; divided by ``routings`` in ``unique_experts``
        self.routings = 0  # (layer, forward) pairs seen
        self.num_tokens = 0  # valid tokens, summed over routings
        self.capacity_total = 0  # sum over routings of the per-expert capacity of the batch (EC)
        self.capacity: list[int] | None = None  # per-sequence C_b of the latest EC routing
        self.gate_mass_total = 0.0  # sum of the gates of the (valid token, expert) pairs that ran
        self.focus_experts_total = 0  # sum over routings with a focus of the unique experts its positions use
        self.focus_routings = 0

    @torch.no_grad()
    def update(self, routing: Routing, valid: torch.Tensor, focus: torch.Tensor | None = None,
               mask_ratio: torch.Tensor | None = None, block_start: int = 0) -> None:
        """Add one routing of one layer; ``valid`` is the forward's ``[B, L]`` padding mask, ``focus`` (optional,
        ``[B, L]`` bool) the positions being denoised, e.g. the LLaDA2.0 sampler's current block. Blocks are cut
        at ``block_start`` + multiples of ``block_length``, where the sampler and the block router cut them.
        ``mask_ratio`` is for :class:`StatsByMaskRatio`, which shares this signature; totals ignore it."""
        tokens, experts, gates = routing.pairs()
        flat_valid = valid.reshape(-1)
        keep = flat_valid[tokens]
        tokens, experts = tokens[keep], experts[keep]
        self.gate_mass_total += float(gates[keep].float().sum())
        self._count_blocks(tokens, experts, valid, block_start)
        if focus is not None:  # dMoE's "expert count": distinct experts the current block's tokens use, per row
            # (a batch's union would grow with the batch size)
            chosen = focus.reshape(-1)[tokens]
            row = tokens[chosen] // valid.shape[-1]
            self.focus_experts_total += int(torch.unique(row * self.num_experts + experts[chosen]).numel())
            self.focus_routings += int((focus & valid).any(-1).sum())
        # Count on the device, bring back only the [E] and [E + 1] results.
        load = torch.bincount(experts, minlength=self.num_experts)
        per_token = torch.bincount(tokens, minlength=flat_valid.numel())[flat_valid]
        histogram = torch.bincount(per_token, minlength=self.num_experts + 1)
        self.tokens_per_expert += load.cpu()
        self.experts_per_token += histogram.cpu()
        self.unique_experts_total += int((load > 0).sum())
        self.routings += 1
        self.num_tokens += int(flat_valid.sum())
        if routing.capacity is not None:  # the sequences counted here (a bucket may hold only some of them)
            self.capacity = [int(c) for c, row in zip(routing.capacity.tolist(), valid.any(-1).tolist()) if row]
            self.capacity_total += sum(self.capacity)

    def _count_blocks(self, tokens: torch.Tensor, experts: torch.Tensor, valid: torch.Tensor,
                      block_start: int = 0) -> None:
        length = valid.shape[-1]
        shift = -block_start % self.block_length  # position p is in block (p + shift) // block_length
        per_seq = -(-(length + shift) // self.block_length)

        def block_of(flat: torch.Tensor) -> torch.Tensor:
            return (flat // length) * per_seq + (flat % length + shift) // self.block_length

        self.block_experts_total += int(torch.unique(block_of(tokens) * self.num_experts + experts).numel())
        self.blocks += int(torch.unique(block_of(valid.reshape(-1).nonzero().squeeze(-1))).numel())

    def merge(self, other: "RoutingStats") -> None:
        """Accumulate another layer's (or run's) statistics into this one."""
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge statistics over {other.num_experts} experts into {self.num_experts}")
        self.block_experts_total += other.block_experts_total
        self.blocks += other.blocks
        self.tokens_per_expert += other.tokens_per_expert
        self.experts_per_token += other.experts_per_token
        self.unique_experts_total += other.unique_experts_total
        self.routings += other.routings
        self.num_tokens += other.num_tokens
        self.capacity_total += other.capacity_total
        self.gate_mass_total += other.gate_mass_total
        self.focus_experts_total += other.focus_experts_total
        self.focus_routings += other.focus_routings
        if other.capacity is not None:
            self.capacity = list(other.capacity)

    @property
    def unique_experts(self) -> float:
        """Unique experts activated per MoE layer per forward, averaged."""
        return self.unique_experts_total / max(self.routings, 1)

    @property
    def unique_experts_per_block(self) -> float:
        """Unique experts activated per MoE layer per block of ``block_length`` positions, averaged."""
        return self.block_experts_total / max(self.blocks, 1)

    @property
    def unique_experts_current_block(self) -> float | None:
        """dMoE's expert count: unique experts the denoised block's tokens activate, per MoE layer, denoising
        forward and sequence, averaged (None when no forward named its current block)."""
        return self.focus_experts_total / self.focus_routings if self.focus_routings else None

    @property
    def tokens_with_zero_experts(self) -> int:
        return int(self.experts_per_token[0])

    def as_dict(self) -> dict:
        """Plain JSON-ready summary."""
        return {
            "unique_experts": self.unique_experts,
            "unique_experts_per_block": self.unique_experts_per_block,
            "unique_experts_current_block": self.unique_experts_current_block,
            "gate_mass_per_token": self.gate_mass_total / max(self.num_tokens, 1),
            "block_length": self.block_length,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "experts_per_token_histogram": self.experts_per_token.tolist(),
            "tokens_with_zero_experts": self.tokens_with_zero_experts,
            "mean_experts_per_token": float(self.tokens_per_expert.sum()) / max(self.num_tokens, 1),
            "capacity": self.capacity,
            "capacity_per_routing": self.capacity_total / max(self.routings, 1) if self.capacity_total else None,
            "routings": self.routings,
            "tokens": self.num_tokens,
        }

    def merged(self) -> "RoutingStats":
        """The statistics over everything recorded (:class:`StatsByMaskRatio` answers with its total)."""
        return self


class StatsByMaskRatio:
    """One layer's statistics split by the mask ratio of each sequence (the routing context's ``mask_ratio``,
    the one the router itself sees), into buckets around ``ratios``, plus the unsplit total.

    This is how ``retrofit inspect`` and ``retrofit eval`` see routing change over the denoising trajectory: a
    sequence goes to the bucket of the nearest ratio, so a noising sweep at exactly ``ratios`` fills one bucket
    per ratio, and a sampler's forwards spread over the buckets as its masks are filled in. The total is kept
    as its own :class:`RoutingStats` (not merged from the buckets) so that a forward whose sequences fall into
    two buckets still counts as one routing in "unique experts per forward".
    """

    def __init__(self, num_experts: int, block_length: int, ratios) -> None:
        self.ratios = sorted(float(r) for r in ratios)
        if not self.ratios:
            raise ValueError("StatsByMaskRatio needs at least one mask ratio")
        self.total = RoutingStats(num_experts, block_length)
        self.buckets = [RoutingStats(num_experts, block_length) for _ in self.ratios]
        # A ratio belongs to the bucket whose centre is nearest: the edges are the midpoints between centres.
        self._edges = torch.tensor([(a + b) / 2 for a, b in zip(self.ratios, self.ratios[1:])])

    def bucket_of(self, mask_ratio: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(mask_ratio.float().cpu(), self._edges)

    @torch.no_grad()
    def update(self, routing: Routing, valid: torch.Tensor, focus: torch.Tensor | None = None,
               mask_ratio: torch.Tensor | None = None, block_start: int = 0) -> None:
        if mask_ratio is None:
            raise ValueError("StatsByMaskRatio.update needs the forward's mask_ratio")
        which = self.bucket_of(mask_ratio)
        indices = torch.unique(which).tolist()
        if len(indices) == 1:  # the usual forward (a sweep's batch, a sampler's lock-step batch): count it once
            one = RoutingStats(self.total.num_experts, self.total.block_length)
            one.update(routing, valid, focus, block_start=block_start)
            self.total.merge(one)
            self.buckets[indices[0]].merge(one)
            return
        self.total.update(routing, valid, focus, block_start=block_start)
        for index in indices:
            rows = (which == index).to(valid.device)[:, None]
            self.buckets[index].update(routing, valid & rows, None if focus is None else focus & rows,
                                       block_start=block_start)

    def merged(self) -> RoutingStats:
        return self.total

    def merge(self, other: "StatsByMaskRatio") -> None:
        """Accumulate another process's statistics of the same layer (the same buckets)."""
        if other.ratios != self.ratios:
            raise ValueError(f"cannot merge mask-ratio buckets {other.ratios} into {self.ratios}")
        self.total.merge(other.total)
        for mine, theirs in zip(self.buckets, other.buckets):
            mine.merge(theirs)

    def filled(self) -> list[int]:
        """Indices of the buckets that saw at least one token, in ratio order."""
        return [i for i, bucket in enumerate(self.buckets) if bucket.num_tokens]
