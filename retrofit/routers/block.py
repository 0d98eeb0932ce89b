"""Block-level routing (dMoE, algorithms.md §6), adapted to a softmax token-choice checkpoint.

The positions of a sequence are cut into consecutive blocks of ``block_length`` (during cached denoising a
forward pass *is* one block). Inside a block every valid token votes with its own top-k probabilities; the
normalised vote picks a core set of experts (top-p at ``core_threshold``, at least ``guard_size``), and each
token then takes its top-k experts inside that core set. Far fewer unique experts are touched per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrofit.routers.base import Router, Routing, RoutingContext
from retrofit.routers.settings import RouterSettings


class BlockRouter(Router):
    """Gates are the token's own probabilities on its k chosen experts, renormalised over those k as the
    paper's router does (``renormalize=False`` keeps the checkpoint's raw-gate convention). A block without
    any valid token (all padding) has an all-zero vote; its core set is then every expert."""

    kind = "block"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, settings: RouterSettings):
        super().__init__(hidden_size, num_experts, top_k)
        if settings.guard_size < top_k:
            raise ValueError(f"guard_size ({settings.guard_size}) must be at least top_k ({top_k}) so every token "
                             "finds k experts in the core set")
        self.block_length = settings.block_length
        self.core_threshold = settings.core_threshold
        self.guard_size = min(settings.guard_size, num_experts)
        self.renormalize = settings.renormalize

    def core_sets(self, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``probs`` ``[B, N, n, E]`` blocked, ``valid`` ``[B, N, n]`` → bool ``[B, N, E]`` core experts."""
        top, idx = probs.topk(self.top_k, dim=-1)
        own = torch.zeros_like(probs).scatter(-1, idx, top) * valid.unsqueeze(-1)
        vote = own.sum(2)
        vote = vote / vote.sum(-1, keepdim=True).clamp(min=torch.finfo(vote.dtype).tiny)
        ranked, order = vote.sort(dim=-1, descending=True, stable=True)
        # Keep the experts whose cumulative vote stays within p, plus the first one that crosses it.
        size = ((ranked.cumsum(-1) <= self.core_threshold).sum(-1) + 1).clamp(max=self.num_experts)
        size = size.clamp(min=self.guard_size)
        rank = torch.arange(self.num_experts, device=probs.device)
        return torch.zeros_like(vote, dtype=torch.bool).scatter(-1, order, rank < size.unsqueeze(-1))

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        batch, length, num_experts = probs.shape
        n = self.block_length
        pad = (-length) % n
        blocked = F.pad(probs, (0, 0, 0, pad)).view(batch, -1, n, num_experts)
        valid = F.pad(ctx.valid, (0, pad), value=False).view(batch, -1, n)
        core = self.core_sets(blocked, valid)
        inside = blocked.masked_fill(~core.unsqueeze(2), float("-inf"))
        _, experts = inside.topk(self.top_k, dim=-1)
        gates = blocked.gather(-1, experts)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        experts = experts.view(batch, -1, self.top_k)[:, :length].reshape(-1, self.top_k)
        gates = gates.view(batch, -1, self.top_k)[:, :length].reshape(-1, self.top_k)
        return Routing("token", experts, gates, num_experts)
