"""Token choice: each token keeps its top-k experts (algorithms.md §3) — what the checkpoints ship with."""

from __future__ import annotations

import torch

from retrofit.routers.base import Router, Routing, RoutingContext
from retrofit.routers.settings import RouterSettings


class TokenChoiceRouter(Router):
    """Bit-exact with the reference LLaDA-MoE block: ``topk`` of the fp32 softmax over the flat ``[T, E]``
    probabilities, gates are the raw (not renormalised) probabilities, so a token's k gates sum to less than 1.
    Padding tokens are routed too, as the reference does; statistics ignore them."""

    kind = "tc"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, settings: RouterSettings | None = None):
        # ``settings`` is accepted so every router builds the same way; token choice has nothing to tune.
        super().__init__(hidden_size, num_experts, top_k)

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        gates, experts = probs.reshape(-1, self.num_experts).topk(self.top_k, dim=-1)
        return Routing("token", experts, gates, self.num_experts)
