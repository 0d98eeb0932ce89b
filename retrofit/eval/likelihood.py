"""Monte-Carlo log-likelihood of a continuation under a masked diffusion model (docs/algorithms.md §8).

log p(continuation | context) ≈ −mean over samples of (L / l) · Σ CE at the l masked continuation positions,
with l drawn from 1..L (spread evenly over each batch of samples) and the context kept clean. With a one-token
continuation one sample is exact, and every request that shares the context shares one forward.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def request_seed(seed: int, *parts: list[int]) -> int:
    """A seed that depends only on the request, so scores don't depend on batching or request order."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def mask_counts(length: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """l for each sample, in 1..length, spread evenly (a random offset, then equal strides)."""
    offset = int(torch.randint(0, length, (1,), generator=generator))
    stride = length / samples
    return torch.tensor([(offset + int(i * stride)) % length + 1 for i in range(samples)])


def continuation_logits(model, ids: torch.Tensor, context_length: int, keep: slice | None = None):
    """Logits at the continuation's positions (or ``keep``). The continuation is the maskable region, so the
    mask ratio of timestep-aware routers is measured over it, and block routing starts its blocks there."""
    region = torch.zeros_like(ids, dtype=torch.bool)
    region[..., context_length:] = True
    return model(input_ids=ids, logits_to_keep=keep or slice(context_length, None), maskable=region,
                 block_start=context_length).logits


@torch.no_grad()
def mc_loglikelihood(model, context: list[int], continuation: list[int], mask_id: int, mc_num: int,
                     batch_size: int, seed: int, device) -> float:
    """Estimate log p(continuation | context) with ``mc_num`` masked samples, ``batch_size`` per forward."""
    length = len(continuation)
    ids = torch.tensor(context + continuation, device=device)
    target = ids[len(context):]
    gen = torch.Generator().manual_seed(request_seed(seed, context, continuation))
    if length == 1:
        mc_num = 1  # one masked token: the single possible sample is exact
    # The masks are drawn on the host (a seeded CPU stream, the same on every device) and sent over without the
    # device waiting; the sum stays on the device in float64 (what adding Python floats did) until the end: one
    # synchronisation per request, not several per forward.
    total, done = torch.zeros((), dtype=torch.float64, device=device), 0
    while done < mc_num:
        n = min(batch_size, mc_num - done)
        counts = mask_counts(length, n, gen)
        noisy = ids.repeat(n, 1)
        masked = torch.zeros(n, length, dtype=torch.bool)
        for row, count in enumerate(counts.tolist()):
            masked[row, torch.randperm(length, generator=gen)[:count]] = True
        masked = masked.to(device, non_blocking=True)
        noisy[:, len(context):] = torch.where(masked, mask_id, noisy[:, len(context):])
        logits = continuation_logits(model, noisy, len(context))
        ce = F.cross_entropy(logits.float().transpose(1, 2), target.repeat(n, 1), reduction="none")
        per_sample = (ce * masked).sum(1) * (length / counts.to(device, non_blocking=True).float())
        total = total + per_sample.sum().double()
        done += n
    return -float(total) / mc_num


@torch.no_grad()
def greedy_match(model, context: list[int], continuation: list[int], mask_id: int, device) -> bool:
    """Whether the argmax at every masked continuation position (all masked at once) is the continuation."""
    ids = torch.tensor([context + [mask_id] * len(continuation)], device=device)
    logits = continuation_logits(model, ids, len(context))[0]
    return bool((logits.argmax(-1) == torch.tensor(continuation, device=device)).all())


@torch.no_grad()
def single_token_scores(model, context: list[int], options: list[int], mask_id: int, device):
    """log p(option | context) for one-token continuations sharing a context: one forward for all."""
    ids = torch.tensor([context + [mask_id]], device=device)
    logits = continuation_logits(model, ids, len(context), keep=slice(-1, None))
    logprobs = F.log_softmax(logits[0, -1].float(), dim=-1)
    best = int(logprobs.argmax())
    return [(float(logprobs[o]), o == best) for o in options]
