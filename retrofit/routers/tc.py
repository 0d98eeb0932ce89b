"""Token choice: each token keeps its top-k experts (algorithms.md §3) — what the checkpoints ship with."""

from __future__ import annotations

from retrofit.routers.base import Router, Routing, RoutingContext


class TokenChoiceRouter(Router):
    """Bit-exact with the reference LLaDA-MoE block: top-k of the fp32 softmax, gates are the raw
    (not renormalised) probabilities. Padding tokens are routed too, as the reference does."""

    kind = "tc"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, settings=None):
        super().__init__(hidden_size, num_experts, top_k)

    def select(self, probs, ctx: RoutingContext) -> Routing:
        gates, experts = probs.reshape(-1, self.num_experts).topk(self.top_k, dim=-1)
        return Routing("token", experts, gates, self.num_experts)
