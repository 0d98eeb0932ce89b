"""Expert choice (algorithms.md §4, §5; Zhou et al. 2022): each expert picks its top-C tokens.

Per sequence *(choose: per sequence first; per batch as an option)*: C_b = round(L_b · k_b / E · capacity
factor), clamped to [1, L_b], where L_b is the sequence's non-pad length and k_b the experts per token its
capacity schedule gives for its mask ratio (the checkpoint's top-k for the constant schedule). ``round`` is
Python's (half to even). Padding scores −∞, so it is never chosen. A token may be chosen by any number of
experts, including none; nothing caps that (capping hurt quality in Zhou et al.).
"""

from __future__ import annotations

import torch

from retrofit.routers.base import Router, Routing, RoutingContext
from retrofit.routers.schedules import experts_per_token
from retrofit.routers.settings import RouterSettings


def sequence_capacity(valid: torch.Tensor, k: torch.Tensor, num_experts: int, capacity_factor: float):
    """C_b for each sequence: ``valid`` ``[B, L]`` bool, ``k`` ``[B]`` experts per token → long ``[B]``."""
    lengths = valid.sum(-1)
    capacity = torch.round(lengths.double() * k.double() / num_experts * capacity_factor).long()
    return torch.minimum(capacity.clamp(min=1), lengths)


class ExpertChoiceRouter(Router):
    kind = "ec"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, settings: RouterSettings):
        super().__init__(hidden_size, num_experts, top_k)
        self.capacity_factor = settings.capacity_factor
        self.per_batch = settings.per_batch
        self.schedule = settings.schedule

    def capacities(self, ctx: RoutingContext) -> torch.Tensor:
        k = experts_per_token(self.schedule, self.top_k, ctx.mask_ratio.cpu()).to(ctx.valid.device)
        return sequence_capacity(ctx.valid, k, self.num_experts, self.capacity_factor)

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        batch, length, num_experts = probs.shape
        capacity = self.capacities(ctx)
        scores = probs.masked_fill(~ctx.valid.unsqueeze(-1), float("-inf"))
        if self.per_batch:
            gates, tokens = scores.reshape(-1, num_experts).T.topk(int(capacity.sum()), dim=-1)
            return Routing("expert", tokens, gates, num_experts, capacity=capacity)
        # One topk at the largest capacity, then each sequence keeps its own first C_b (topk is sorted).
        top, idx = scores.transpose(1, 2).topk(int(capacity.max()), dim=-1)
        keep = torch.arange(top.shape[-1], device=probs.device) < capacity.unsqueeze(-1)  # [B, C_max]
        idx = idx + (torch.arange(batch, device=probs.device) * length).view(batch, 1, 1)
        tokens = idx.permute(1, 0, 2)[:, keep]  # [E, sum C_b], sequences in order
        gates = top.permute(1, 0, 2)[:, keep]
        return Routing("expert", tokens, gates, num_experts, capacity=capacity)
