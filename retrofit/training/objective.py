"""The masked-diffusion objective (algorithms.md §2), the router z-loss and distillation from the TC model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # input ids with masked positions replaced by the mask token
    masked: torch.Tensor  # bool [B, L]
    p_mask: torch.Tensor  # [B] mask probability of each sequence
    t: torch.Tensor  # [B] sampled timestep, the mask ratio timestep-aware routers read
    normaliser: torch.Tensor  # [B] tokens each sequence's loss is divided by


def add_noise(input_ids, prompt_len, mask_id: int, eps: float, generator: torch.Generator) -> NoisedBatch:
    """t ~ U(0,1) per sequence; each maskable token is masked with probability p = (1 − ε)·t + ε."""
    batch, length = input_ids.shape
    t = torch.rand(batch, generator=generator)
    p = (1 - eps) * t + eps
    maskable = torch.arange(length).unsqueeze(0) >= prompt_len.unsqueeze(1)
    masked = (torch.rand(batch, length, generator=generator) < p.unsqueeze(1)) & maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    # Pretraining divides by all tokens; SFT by each sequence's response length (the prompt is never masked).
    normaliser = maskable.sum(1).float()
    return NoisedBatch(noisy, masked, p, t, normaliser)


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, noise: NoisedBatch) -> torch.Tensor:
    """Σ over masked positions of CE / p, divided by each sequence's normaliser, averaged over the batch."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    weighted = (ce * noise.masked) / noise.p_mask.unsqueeze(1)
    return (weighted.sum(1) / noise.normaliser.clamp(min=1)).mean()


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(router logits)² (ST-MoE), keeping the gate's logits small."""
    return torch.stack([torch.logsumexp(x.float(), dim=-1).pow(2).mean() for x in router_logits]).mean()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style balance loss for top-k routing, averaged over layers: E · Σ_e f_e · P_e, where f_e is the
    share of (token, choice) slots expert e receives and P_e its mean probability; 1.0 when perfectly even."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.zeros_like(probs).scatter(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        share = chosen.mean(0) / top_k
        losses.append(num_experts * (share.detach() * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def distillation_kl(student_logits, teacher_logits, masked: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) averaged over masked positions; the teacher carries no gradient."""
    if not masked.any():
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits[masked].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[masked].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2
