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
        kept = (torch.ones_like(tokens, dtype=torch.bool) if routing.keep is None else routing.keep.reshape(-1))
        chosen = torch.zeros_like(flat, dtype=torch.bool).index_put_((tokens, experts), kept)
        gates = torch.softmax(flat.masked_fill(~chosen, float("-inf")), dim=-1).nan_to_num(0.0)
        routing.gates = (gates[tokens, experts] * kept).view_as(routing.indices)
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
        """``probs`` (or any per-(token, expert) score that ranks tokens) → each expert's top-C_b tokens. Under a
        denoising sampler's key/value cache, a cached step computes only a span of each sequence: each expert then
        takes the span's tokens that score at least as high as the last token it took of the whole sequence at
        the refresh (:meth:`_choose_above`), rather than its top-C among the span alone."""
        cache = ctx.cache
        cutoffs = cache.recall(self) if cache is not None else None
        scores = probs.masked_fill(~ctx.valid.unsqueeze(-1), float("-inf"))
        if cutoffs is not None:
            tokens, gates, keep, capacity = *self._choose_above(scores, cutoffs, cache.span.start), None
        else:
            capacity, keep = self.capacities(ctx), None
            if self.per_batch:
                tokens, gates, cutoffs = self._choose_per_batch(scores, int(capacity.sum()))
            else:
                tokens, gates, cutoffs = self._choose_per_sequence(scores, capacity)
            if cache is not None:
                cache.remember(self, cutoffs)
        scale = self.scoring.gate_scale(probs, self.top_k, self.bias)
        if scale is not None:
            gates = gates * scale.reshape(-1)[tokens]
        return Routing("expert", tokens, gates, self.num_experts, capacity=capacity, keep=keep)

    @staticmethod
    def _choose_above(scores: torch.Tensor, cutoffs: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """The tokens of ``scores`` ``[B, S, E]`` (a span from column ``start``) that each expert would have taken
        at the refresh: those scoring above its last pick there, those scoring the same and standing earlier (ties
        go to the earlier token), and the last pick itself. ``cutoffs`` ``[B, E, 2]``: that score and column, per
        row. All B·S tokens are listed for each expert, ``keep`` marking the chosen: their number varies per
        expert, and counting them would ask the device. Right after a refresh this chooses exactly what the
        whole-sequence choice chose."""
        batch, length, num_experts = scores.shape
        cut, last = cutoffs[..., 0].unsqueeze(1), cutoffs[..., 1].unsqueeze(1)  # [B, 1, E]
        column = (torch.arange(length, device=scores.device) + start).view(1, -1, 1)
        # The last pick itself by its column: its score is the cut-off, so a rounding difference of the span's
        # forward (other matmul shapes) would otherwise drop it. Padding scores −inf: never kept.
        keep = (scores > cut) | ((scores == cut) & (column < last)) | ((column == last) & (scores > float("-inf")))
        keep = keep.reshape(-1, num_experts).T  # [E, B·S]
        tokens = torch.arange(batch * length, device=scores.device).expand(num_experts, -1)
        gates = scores.reshape(-1, num_experts).T.masked_fill(~keep, 0.0)
        return tokens, gates, keep

    @staticmethod
    def _choose_per_batch(scores: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each expert's top-``total`` tokens over the whole batch (``total`` ≤ valid tokens, so no padding), and
        each row's cut-offs ``[B, E, 2]`` (:meth:`_choose_above`): the expert's last pick's score, and the last
        column of the row it may take at that score (earlier rows: all; later rows: none)."""
        batch, length, num_experts = scores.shape
        gates, tokens = scores.reshape(-1, num_experts).T.sort(dim=-1, descending=True, stable=True)
        if not total:
            return tokens[:, :0], gates[:, :0], _cutoffs(torch.full((batch, num_experts), float("inf"),
                                                                     device=scores.device), None)
        last = tokens[:, total - 1]  # [E], flat: row * length + column
        row = torch.arange(batch, device=scores.device).unsqueeze(1)
        column = torch.where(row < last // length, length, torch.where(row == last // length, last % length, -1))
        return tokens[:, :total], gates[:, :total], _cutoffs(gates[:, total - 1].expand(batch, -1), column)

    @staticmethod
    def _choose_per_sequence(scores: torch.Tensor, capacity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """One topk at the largest capacity over ``[B, E, L]``, then each sequence keeps its own first C_b
        (topk is sorted, so those are its top-C_b; C_b ≤ L_b, so none of them is padding); and each sequence's
        lowest chosen score per expert ``[B, E]`` (+∞ for a sequence with no valid token)."""
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
        if not c_max:
            return tokens, gates, _cutoffs(torch.full((batch, num_experts), float("inf"), device=device), None)
        pick = (capacity - 1).clamp(min=0).to(device, non_blocking=True).view(batch, 1, 1).expand(-1, num_experts, 1)
        cut = top.gather(2, pick).squeeze(2).masked_fill((capacity == 0).to(device, non_blocking=True).unsqueeze(1),
                                                         float("inf"))  # a row with no valid token takes none
        column = (idx.gather(2, pick).squeeze(2) - (torch.arange(batch, device=device) * length).unsqueeze(1))
        return tokens, gates, _cutoffs(cut, column)


def _cutoffs(score: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """``[B, E, 2]``: per row and expert, the score of the last token taken and its column (ties at that score go
    to the columns up to it); what a refresh leaves for the cached steps (:meth:`ExpertChoiceRouter._choose_above`).
    Columns fit a float32 exactly below 2**24."""
    column = torch.full_like(score, -1.0) if column is None else column.to(score.dtype)
    return torch.stack([score, column], dim=-1)
