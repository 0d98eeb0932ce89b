"""Masked-token loss on held-out text, and the unigram baseline it must beat.

The masked-diffusion loss (Σ masked CE / p, per token) is an unbiased estimate of the model's average
per-token cross-entropy when it fills masks; a unigram model that ignores context scores the plain
cross-entropy of its token frequencies. Both are in nats per token, so they compare directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from retrofit.diffusion import add_noise, diffusion_loss
from retrofit.io.text_data import DataSection, build_sequences


def text_sequences(tokenizer, path: str | Path, fields: list[str], seq_len: int = 128,
                   max_examples: int | None = None) -> torch.Tensor:
    section = DataSection(path=str(path), objective="pretrain", text_field=fields, seq_len=seq_len,
                          max_examples=max_examples)
    return build_sequences(section, Path.cwd(), tokenizer).input_ids


@torch.no_grad()
def masked_token_loss(model, sequences: torch.Tensor, mask_id: int, samples: int = 4, batch_size: int = 16,
                      seed: int = 0, ratio: float | None = None) -> float:
    """Mean masked-diffusion loss over ``samples`` fixed noise draws of every sequence (seeded): t ~ U(0, 1) per
    sequence, or every token masked with probability ``ratio`` (the loss at one mask ratio)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for _ in range(samples):
        for start in range(0, len(sequences), batch_size):
            ids = sequences[start:start + batch_size]
            noise = add_noise(ids, torch.zeros(len(ids), dtype=torch.long), mask_id, 1e-3, gen, t=ratio)
            logits = model(input_ids=noise.noisy.to(device), mask_ratio=noise.t.to(device)).logits.cpu()
            total += float(diffusion_loss(logits, ids, noise)) * len(ids)
            count += len(ids)
    return total / count


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed training token frequencies."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[heldout.reshape(-1)].mean())


def perplexity(nats: float) -> float:
    return math.exp(nats)


@torch.no_grad()
def heldout_losses(model, sequences: torch.Tensor, mask_id: int, ratios=(), samples: int = 2, seed: int = 0
                   ) -> dict:
    """The held-out loss (t ~ U) and the loss at each of ``ratios``, with the same seeded masks for every model
    and every call: what ``heldout.jsonl`` and the studies record."""
    out = {"loss": masked_token_loss(model, sequences, mask_id, samples, seed=seed)}
    out["by_ratio"] = {f"{r:g}": masked_token_loss(model, sequences, mask_id, samples, seed=seed + 1 + i, ratio=r)
                       for i, r in enumerate(ratios)}
    return out
