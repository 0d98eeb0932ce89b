"""Block-level routing (dMoE, docs/algorithms.md §6), adapted to a softmax token-choice checkpoint.

The positions of a sequence are cut into consecutive blocks of ``block_length`` whose boundaries fall where the
sampler's denoising blocks begin (``RoutingContext.block_start``, the prompt's length; 0 outside the sampler),
so every denoising block is exactly one routing block whatever the prompt's length; the prompt is cut backwards
from its end. Partial blocks at either end are padded with positions that never vote and are dropped
afterwards. Inside a block every valid token votes with its own top-k probabilities (its other
probabilities count zero); the votes are summed over the block and normalised. The core set is the top-p set
of that vote at ``core_threshold`` (experts ranked by vote, kept while the cumulative vote is ≤ p, plus the
first one that crosses p), widened to the top-``guard_size`` experts by vote when smaller. Every token,
padding included, then takes its top-k experts inside its block's core set. Far fewer unique experts are
touched per block than under token choice.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from retrofit.routers.base import Router, RouterSettings, Routing, RoutingContext


class BlockSettings(RouterSettings):
    type: Literal["block"] = "block"
    block_length: int = Field(default=32, ge=1, description=(
        "positions per routing block, aligned with the sampler's denoising blocks (dMoE: 32)"))
    core_threshold: float = Field(default=0.6, gt=0, le=1, description=(
        "cumulative share of the block's vote kept in its core set (top-p)"))
    guard_size: int = Field(default=16, ge=1, description="minimum core-set size (at least the top-k)")
    renormalize: bool = Field(default=False, description=(
        "renormalise each token's k gates over its k experts (dMoE's LLaDA2.0 router does); off by default to "
        "keep LLaDA-MoE's own convention of raw softmax gates, which sets the scale of every MoE output"))

    def misfit(self, num_experts: int, top_k: int) -> str | None:
        if self.guard_size >= num_experts:
            return (f"block router: guard_size ({self.guard_size}) keeps all {num_experts} experts of this model in "
                    "every block's core set, which routes exactly like token choice; give a guard_size below "
                    f"{num_experts} (dMoE keeps 16 of 64; {max(top_k, num_experts // 4)} of {num_experts} here)")
        return None

    def describe(self) -> str:
        return (f"block block_length={self.block_length} core_threshold={self.core_threshold} "
                f"guard_size={self.guard_size}" + (" renormalize" if self.renormalize else ""))


class BlockRouter(Router):
    """Gates are the token's own probabilities on its k chosen experts, raw as the checkpoint's own token
    choice gives them (LLaDA-MoE does not renormalise its top-k gates, so neither does a router that replaces
    its own); ``renormalize=True`` renormalises them over the k, as dMoE's LLaDA2.0 router does (the README
    compares the two on the embedded ``tiny``).
    A block without any valid token (all padding) has an all-zero vote: every expert's cumulative
    vote is 0 ≤ p, so its core set is every expert *(choice: its padding tokens then route like token choice)*.
    Ties in the vote (zero votes, in practice) are broken by the lower expert id (stable sort)."""

    kind = "block"
    settings_class = BlockSettings

    def configure(self, settings: BlockSettings) -> None:
        if settings.guard_size < self.top_k:
            raise ValueError(
                f"block router: guard_size ({settings.guard_size}) must be at least top_k ({self.top_k}), so that "
                "every token finds k experts in its block's core set"
            )
        self.block_length = settings.block_length
        self.core_threshold = settings.core_threshold
        self.guard_size = min(settings.guard_size, self.num_experts)
        self.renormalize = settings.renormalize

    def votes(self, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Unnormalised vote ``[B, N, E]``: the sum over each block's valid tokens of their own top-k selection
        scores (the probabilities, plus the expert bias where the family has one, as dMoE votes)."""
        top, idx = probs.topk(self.top_k, dim=-1)
        own = torch.zeros_like(probs).scatter(-1, idx, top) * valid.unsqueeze(-1)
        return own.sum(-2)

    def core_sets(self, vote: torch.Tensor) -> torch.Tensor:
        """``vote`` ``[..., E]`` (need not be normalised) → bool ``[..., E]``, True for the core experts.

        An expert is kept when the cumulative vote up to and including it is ≤ p · total, plus the first one
        that crosses. Comparing unnormalised sums against p times the cumsum's own last entry is the same rule
        as on the normalised vote, but exact at p = 1 (zero-vote experts at the tail then stay within p). A
        block whose total vote is negative (an expert bias below minus the voted scores) is ranked by the vote
        divided by that total, as dMoE does, i.e. with its sign flipped.
        """
        oriented = torch.where(vote.sum(-1, keepdim=True) < 0, -vote, vote)
        ranked, order = oriented.sort(dim=-1, descending=True, stable=True)
        cumulative = ranked.cumsum(-1)
        within = cumulative <= self.core_threshold * cumulative[..., -1:]
        size = (within.sum(-1) + 1).clamp(max=self.num_experts).clamp(min=self.guard_size)
        rank = torch.arange(self.num_experts, device=vote.device)
        return torch.zeros_like(vote, dtype=torch.bool).scatter(-1, order, rank < size.unsqueeze(-1))

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        batch, length, num_experts = probs.shape
        n = self.block_length
        # Block boundaries fall at block_start + j·n (the sampler's denoising blocks; the prompt before them is
        # cut backwards from its end): positions that never vote pad the front and the back.
        lead = (-ctx.block_start) % n
        tail = (-(lead + length)) % n
        blocked = F.pad(probs, (0, 0, lead, tail)).reshape(batch, -1, n, num_experts)  # [B, N, n, E]
        valid = F.pad(ctx.valid, (lead, tail), value=False).reshape(batch, -1, n)
        core = self.core_sets(self.votes(self.scoring.selection(blocked, self.bias), valid))  # [B, N, E]
        # Each token's own token choice (the family's: group limits, renormalisation and scale included), among
        # its block's core experts only; core sets hold ≥ guard_size ≥ k experts.
        gates, experts = self.scoring.top_k(blocked, self.top_k, self.bias, allowed=core.unsqueeze(2))
        if self.renormalize and not self.scoring.renormalizes:
            gates = gates / gates.sum(-1, keepdim=True)
        experts = experts.reshape(batch, -1, self.top_k)[:, lead:lead + length].reshape(-1, self.top_k)
        gates = gates.reshape(batch, -1, self.top_k)[:, lead:lead + length].reshape(-1, self.top_k)
        return Routing("token", experts, gates, num_experts)
