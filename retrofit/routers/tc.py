"""Token choice: each token keeps its top-k experts (docs/algorithms.md §3) — what the checkpoints ship with."""

from __future__ import annotations

from typing import Literal

import torch

from retrofit.routers.base import Router, RouterSettings, Routing, RoutingContext


class TokenChoiceSettings(RouterSettings):
    """Token choice has nothing to tune: it is the checkpoint's own routing."""

    type: Literal["tc"] = "tc"

    def describe(self) -> str:
        return "tc (checkpoint top-k)"


class TokenChoiceRouter(Router):
    """The checkpoint's own token choice through its :class:`~retrofit.routers.base.Scoring`: for LLaDA-MoE,
    bit-exact with the reference block (``topk`` of the fp32 softmax over the flat ``[T, E]`` probabilities,
    raw gates, so a token's k gates sum to less than 1). Padding tokens are routed too, as the reference does;
    statistics ignore them."""

    kind = "tc"
    settings_class = TokenChoiceSettings

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        gates, experts = self.scoring.top_k(probs.reshape(-1, self.num_experts), self.top_k, self.bias)
        return Routing("token", experts, gates, self.num_experts)
