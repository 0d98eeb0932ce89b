"""The masked-diffusion forward process and loss (docs/algorithms.md §2), shared by training and held-out
evaluation."""

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

    def to(self, device) -> "NoisedBatch":
        """The batch on ``device`` (the noise is drawn on the host, so that it does not depend on the device)."""
        return NoisedBatch(*(t.to(device) for t in (self.noisy, self.masked, self.p_mask, self.t, self.normaliser)))


def add_noise(input_ids, prompt_len, mask_id: int, eps: float, generator: torch.Generator,
              t: float | None = None) -> NoisedBatch:
    """t ~ U(0,1) per sequence (or the given ``t`` for all); each maskable token is masked with probability
    p = (1 − ε)·t + ε."""
    batch, length = input_ids.shape
    t = torch.rand(batch, generator=generator) if t is None else torch.full((batch,), float(t))
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


def block_diffusion_layout(noisy: torch.Tensor, clean: torch.Tensor, block: int):
    """LLaDA2.0's block-diffusion training layout (its SFT, as dFactory/dMoE train it): the noisy sequence and the
    clean one side by side, ``[B, 2L]``, both at positions 0..L−1, where a noisy token sees the noisy tokens of
    its own ``block`` and the clean tokens of earlier blocks, and a clean token sees the clean tokens of its own
    and earlier blocks (never a noisy one). Returns (input_ids, position_ids ``[2L]``, allowed ``[2L, 2L]``
    query × key); the logits of the first L positions are the noisy sequence's."""
    length = noisy.shape[1]
    index = torch.arange(length, device=noisy.device) // block
    query, key = index[:, None], index[None, :]
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool, device=noisy.device)
    allowed[:length, :length] = query == key
    allowed[:length, length:] = key < query
    allowed[length:, length:] = key <= query
    positions = torch.arange(length, device=noisy.device).repeat(2)
    return torch.cat([noisy, clean.to(noisy.device)], dim=1), positions, allowed
