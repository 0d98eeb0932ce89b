"""Routing statistics, gathered cheaply from a :class:`Routing` behind a switch (off by default).

Per MoE layer and forward pass: tokens per expert, the histogram of experts per token, the number of unique
experts activated (the figure the dMoE paper reports, averaged over layers and forwards), tokens that no
expert chose, and EC capacity. Padding never counts.
"""

from __future__ import annotations

import torch

from retrofit.routers.base import Routing


class RoutingStats:
    """Accumulates over forwards (and, when shared, over layers)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.long)
        self.experts_per_token = torch.zeros(num_experts + 1, dtype=torch.long)  # histogram over 0..E
        self.unique_experts_total = 0
        self.routings = 0  # (layer, forward) pairs seen
        self.num_tokens = 0
        self.capacity_total = 0  # sum over routings of the per-expert capacity of the batch (EC)

    @torch.no_grad()
    def update(self, routing: Routing, valid: torch.Tensor) -> None:
        tokens, experts, _ = routing.pairs()
        flat_valid = valid.reshape(-1)
        keep = flat_valid[tokens]
        tokens, experts = tokens[keep].cpu(), experts[keep].cpu()
        load = torch.bincount(experts, minlength=self.num_experts)
        per_token = torch.bincount(tokens, minlength=flat_valid.numel())[flat_valid.cpu()]
        self.tokens_per_expert += load
        self.experts_per_token += torch.bincount(per_token.clamp(max=self.num_experts),
                                                 minlength=self.num_experts + 1)
        self.unique_experts_total += int((load > 0).sum())
        self.routings += 1
        self.num_tokens += int(flat_valid.sum())
        if routing.capacity is not None:
            self.capacity_total += int(routing.capacity.sum())

    def merge(self, other: "RoutingStats") -> None:
        self.tokens_per_expert += other.tokens_per_expert
        self.experts_per_token += other.experts_per_token
        self.unique_experts_total += other.unique_experts_total
        self.routings += other.routings
        self.num_tokens += other.num_tokens
        self.capacity_total += other.capacity_total

    @property
    def unique_experts(self) -> float:
        """Unique experts activated per MoE layer per forward, averaged."""
        return self.unique_experts_total / max(self.routings, 1)

    @property
    def tokens_with_zero_experts(self) -> int:
        return int(self.experts_per_token[0])

    def as_dict(self) -> dict:
        return {
            "unique_experts": self.unique_experts,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "experts_per_token_histogram": self.experts_per_token.tolist(),
            "tokens_with_zero_experts": self.tokens_with_zero_experts,
            "mean_experts_per_token": float(self.tokens_per_expert.sum()) / max(self.num_tokens, 1),
            "capacity_per_routing": self.capacity_total / max(self.routings, 1) if self.capacity_total else None,
            "routings": self.routings,
            "tokens": self.num_tokens,
        }
