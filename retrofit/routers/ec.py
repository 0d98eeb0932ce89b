"""Expert choice (docs/algorithms.md §4, §5; Zhou et al. 2022): each expert picks its top-C tokens.

Two orders (``ec_order``): ``softmax-then-topk`` ranks each expert's tokens by the token's softmax probability
over experts and gates with it (the same scores as the checkpoint's token choice; EC-DLM's "softmax first"
variant); ``topk-then-softmax`` (EC-DLM's default in all its training scripts) ranks them by the raw router
logit and gates a chosen pair by a softmax over the logits of only the experts that chose that token. The
first is the default: on a retrofitted token-choice checkpoint it keeps the gate scale the experts were trained
with (the README compares the two on the embedded ``tiny`` after the same router fine-tuning).

Per sequence *(choose: per sequence first; per batch as the ``per_batch`` option)*: C_b = round(L_b · k_b / E ·
capacity_factor) (``capacity_rounding="floor"``: floor, as EC-DLM's code takes it), clamped to [1, L_b] (0 for a
sequence with no valid token), where L_b is the sequence's non-pad length and k_b the experts per token its
capacity schedule gives for its mask ratio (the checkpoint's top-k for the constant schedule). ``round`` is half
to even (Python's and torch's). Padding scores −∞, so it is never chosen. A token may be chosen by any number of
experts, including none; nothing caps that (capping
hurt quality in Zhou et al.). In per-batch mode each expert chooses C = Σ_b C_b tokens among all valid tokens
of the batch, so the total FLOPs are the same as per sequence but a sequence may get more or less than C_b.

Other families' scoring (``Scoring``): experts rank tokens by the family's score (LLaDA2.0: the sigmoid of the
fp32 logit), which plays the softmax probability's part. The expert bias is left out of the ranking on purpose:
it is one constant per expert, so it cannot change how an expert orders tokens (it only shifts which experts a
token prefers, which expert choice does not ask). The gate of a chosen pair is the gate the token's own token
choice would give that expert (``Scoring.gate_scale``): for LLaDA2.0 its score divided by the sum of the scores
of the token's own top-k, times ``routed_scaling_factor``, so the MoE output keeps the scale the experts were
trained with (softmax scoring: the probability itself, as above).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from retrofit.routers.base import Router, RouterSettings, Routing, RoutingContext
from retrofit.routers.schedules import ScheduleSettings, experts_per_token, experts_per_token_counted


class ExpertChoiceSettings(RouterSettings):
    type: Literal["ec"] = "ec"
    capacity_factor: float = Field(default=1.0, gt=0, description=(
        "capacity C = L*k/E times this factor; 1.0 matches token choice's FLOPs"))
    per_batch: bool = Field(default=False, description="experts choose over the whole batch, not per sequence")
    capacity_rounding: Literal["round", "floor"] = Field(default="round", description=(
        "how C = L*k/E*capacity_factor becomes whole: round (half to even; retrofit's default, its figures are "
        "measured with it) or floor (EC-DLM's code)"))
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    ec_order: Literal["softmax-then-topk", "topk-then-softmax"] = Field(default="softmax-then-topk", description=(
        "softmax-then-topk: experts rank tokens by their score (softmax probability) and gate with it; "
        "topk-then-softmax (EC-DLM's default): experts rank tokens by raw router logit, gate = softmax over the "
        "logits of just the experts that chose the token"))

    def misfit(self, num_experts: int, top_k: int) -> str | None:
        k_max = self.schedule.k_max if self.schedule.name != "constant" else None
        if k_max is not None and k_max > num_experts:
            return (f"ec router: the schedule's k_max ({k_max}) exceeds this model's {num_experts} experts; a token "
                    f"can be chosen by at most {num_experts}, so give k_max {num_experts} or less")
        return None

    def describe(self) -> str:
        s = self.schedule
        sched = s.name if s.name == "constant" else f"{s.name}[{s.k_min}..{s.k_max}]"
        scope = "batch" if self.per_batch else "sequence"
        order = "" if self.ec_order == "softmax-then-topk" else f" {self.ec_order}"
        floor = " capacity-floor" if self.capacity_rounding == "floor" else ""
        return f"ec capacity_factor={self.capacity_factor} schedule={sched} per-{scope}{order}{floor}"


def sequence_capacity(lengths: torch.Tensor, k: torch.Tensor, num_experts: int, capacity_factor: float,
                      rounding: str = "round"):
    """C_b for each sequence: non-pad ``lengths`` ``[B]`` and experts per token ``k`` ``[B]`` → long ``[B]``.

    Computed in float64 so that round() (half to even) or floor() sees the exact product for any realistic L
    and k (EC-DLM floors: ``int(L * k / E)``).
    """
    exact = lengths.double() * k.double() / num_experts * capacity_factor
    capacity = (torch.floor(exact) if rounding == "floor" else torch.round(exact)).long()
    return torch.minimum(capacity.clamp(min=1), lengths)


class ExpertChoiceRouter(Router):
    """Each expert chooses its top-C_b tokens of each sequence by softmax probability; the gate of a chosen
    (token, expert) pair is the token's probability for that expert. Layout ``"expert"``: ``indices[E, ΣC_b]``
    are flat token ids, sequences in batch order, each in descending score order; ``capacity`` is C_b."""

    kind = "ec"
    settings_class = ExpertChoiceSettings

    def configure(self, settings: ExpertChoiceSettings) -> None:
        self.capacity_factor = settings.capacity_factor
        self.capacity_rounding = settings.capacity_rounding
        self.per_batch = settings.per_batch
        self.schedule = settings.schedule
        self.order = settings.ec_order

    def route(self, logits: torch.Tensor, ctx: RoutingContext) -> Routing:
        # topk-then-softmax is defined on the raw logits (EC-DLM's definition), whatever the family's scoring.
        if self.order == "softmax-then-topk":
            return super().route(logits, ctx)
        return self.select_by_logits(logits.float(), ctx)

    def select_by_logits(self, logits: torch.Tensor, ctx: RoutingContext) -> Routing:
        """EC-DLM's order: each expert takes its top-C_b tokens by raw logit; a chosen pair's gate is the softmax
        over the logits of the experts that chose that token (a token no expert chose gets nothing)."""
        routing = self.select(logits, ctx)  # the same capacities and layout, ranked by logit
        tokens = routing.indices.reshape(-1)
        experts = torch.arange(self.num_experts, device=tokens.device).repeat_interleave(routing.indices.shape[1])
        flat = logits.reshape(-1, self.num_experts)
        chosen = torch.zeros_like(flat, dtype=torch.bool).index_put_((tokens, experts),
                                                                      torch.ones_like(tokens, dtype=torch.bool))
        gates = torch.softmax(flat.masked_fill(~chosen, float("-inf")), dim=-1).nan_to_num(0.0)
        routing.gates = gates[tokens, experts].view_as(routing.indices)
        return routing

    def capacities(self, ctx: RoutingContext) -> torch.Tensor:
        """Per-sequence capacity C_b, a long CPU tensor ``[B]``: the shapes of the selection depend on it, so
        the lengths (and, for a schedule, the mask ratios) come to the host, once per forward for all layers;
        without padding and with constant capacity nothing is read from the device."""
        lengths = ctx.lengths_on_host()
        if self.schedule.name == "constant":
            k = torch.full_like(lengths, self.top_k)
        elif (counts := ctx.mask_counts_on_host()) is not None:  # an observed ratio: k rounded exactly from them
            k = experts_per_token_counted(self.schedule, self.top_k, *counts)
        else:
            k = experts_per_token(self.schedule, self.top_k, ctx.mask_ratio_on_host())
        return sequence_capacity(lengths, k, self.num_experts, self.capacity_factor, self.capacity_rounding)

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        """``probs`` (or any per-(token, expert) score that ranks tokens) → each expert's top-C_b tokens."""
        capacity = self.capacities(ctx)
        scores = probs.masked_fill(~ctx.valid.unsqueeze(-1), float("-inf"))
        if self.per_batch:
            tokens, gates = self._choose_per_batch(scores, int(capacity.sum()))
        else:
            tokens, gates = self._choose_per_sequence(scores, capacity)
        scale = self.scoring.gate_scale(probs, self.top_k, self.bias)
        if scale is not None:
            gates = gates * scale.reshape(-1)[tokens]
        return Routing("expert", tokens, gates, self.num_experts, capacity=capacity)

    @staticmethod
    def _choose_per_batch(scores: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's top-``total`` tokens over the whole batch (``total`` ≤ valid tokens, so no padding)."""
        gates, tokens = scores.reshape(-1, scores.shape[-1]).T.sort(dim=-1, descending=True, stable=True)
        return tokens[:, :total], gates[:, :total]  # ties to the earlier token, as per sequence

    @staticmethod
    def _choose_per_sequence(scores: torch.Tensor, capacity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One topk at the largest capacity over ``[B, E, L]``, then each sequence keeps its own first C_b
        (topk is sorted, so those are its top-C_b; C_b ≤ L_b, so none of them is padding)."""
        batch, length, num_experts = scores.shape
        device = scores.device
        c_max = int(capacity.max()) if batch else 0
        # A stable sort, not topk: equal scores (tokens whose hidden states are identical, e.g. an all-mask row
        # with no context) go to the earlier token, so a row picks the same tokens at any column offset (left
        # padding) and in any batch; topk leaves the order of ties to the kernel.
        top, idx = scores.transpose(1, 2).sort(dim=-1, descending=True, stable=True)
        top, idx = top[..., :c_max], idx[..., :c_max]  # [B, E, C_max]
        # Which of the B * C_max columns to keep, worked out on the host so the device never synchronises.
        keep = (torch.arange(c_max) < capacity.unsqueeze(-1)).reshape(-1).nonzero().squeeze(1)
        keep = keep.to(device, non_blocking=True)  # a host-to-device copy the device need not wait for
        idx = idx + (torch.arange(batch, device=device) * length).view(batch, 1, 1)  # flat token ids
        tokens = idx.permute(1, 0, 2).reshape(num_experts, -1).index_select(1, keep)  # [E, ΣC_b], in order
        gates = top.permute(1, 0, 2).reshape(num_experts, -1).index_select(1, keep)
        return tokens, gates
