"""Training-only loss terms beside the masked-diffusion loss (``retrofit.diffusion``): the router z-loss, the
load-balancing loss and distillation from the TC model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrofit.routers import SOFTMAX, Scoring


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(router logits)² (ST-MoE), keeping the gate's logits small."""
    return torch.stack([torch.logsumexp(x.float(), dim=-1).pow(2).mean() for x in router_logits]).mean()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, scoring: Scoring = SOFTMAX,
                        sum_across_ranks=None, world: int = 1) -> torch.Tensor:
    """Switch-style balance loss for top-k routing, averaged over layers: E · Σ_e f_e · P_e, where f_e is the
    share of (token, choice) slots expert e receives under the checkpoint's own token choice and P_e its mean
    score (``scoring``: the family's); 1.0 when perfectly even.

    Under data parallelism f_e and P_e are the whole global batch's: ``sum_across_ranks`` adds the (detached)
    slot counts and token counts of every rank, and each rank's score sum is scaled by ``world`` so that the
    gradients DDP averages are exactly those of the one-process loss."""
    losses = []
    for logits in router_logits:
        probs = scoring.scores(logits.float())
        num_experts = probs.shape[-1]
        chosen = torch.zeros_like(probs).scatter(-1, scoring.top_k(probs, top_k)[1], 1.0)
        counts = torch.cat([chosen.sum(0), probs.new_tensor([probs.shape[0]])])
        if sum_across_ranks is not None:
            counts = sum_across_ranks(counts.detach())
        tokens = counts[-1]
        share = counts[:-1] / (tokens * top_k)
        mean_score = probs.sum(0) / tokens * world
        losses.append(num_experts * (share.detach() * mean_score).sum())
    return torch.stack(losses).mean()


def distillation_kl(student_logits, teacher_logits, masked: torch.Tensor, temperature: float,
                    count: float | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) summed over masked positions and divided by ``count`` (default: their number, the
    mean); the teacher carries no gradient. Data-parallel ranks pass the global batch's masked count over the
    number of ranks, so that averaging their gradients gives exactly the one-process mean."""
    if not masked.any():
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits[masked].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[masked].float() / temperature, dim=-1)
    total = (t.exp() * (t - s)).sum()
    return total / (count if count is not None else masked.sum()) * temperature**2
