"""Monte-Carlo log-likelihood of a continuation under a masked diffusion model (docs/algorithms.md §8).

log p(continuation | context) ≈ −mean over samples of (L / l) · Σ CE at the l masked continuation positions,
with l drawn from 1..L (spread evenly over each group of :data:`MC_GROUP` samples) and the context kept clean.
With a one-token continuation one sample is exact, and every request that shares the context shares one row.

Every sample (and every greedy check) is one :class:`ScoreRow`; :func:`score_jobs` runs the rows of many requests
``batch_size`` per forward, padded (:mod:`retrofit.eval.padding`), so a score is the same in any batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from retrofit.eval.padding import RowLayout, forward_rows, lay_out


def request_seed(seed: int, *parts: list[int]) -> int:
    """A seed that depends only on the request, so scores don't depend on batching or request order."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# Samples per stratified draw: the mask counts l are spread evenly over 1..L within each group of this many samples
# (LLaDA spreads them within each forward batch; a fixed group keeps a score independent of --batch-size, and 8, the
# default batch, keeps the scores retrofit has published).
MC_GROUP = 8


def mask_counts(length: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """l for each sample, in 1..length, spread evenly (a random offset, then equal strides)."""
    offset = int(torch.randint(0, length, (1,), generator=generator))
    stride = length / samples
    return torch.tensor([(offset + int(i * stride)) % length + 1 for i in range(samples)])


@dataclass
class ScoreRow:
    """One row of a scoring forward: ``context`` (never masked), then ``shown`` (the continuation as the model
    sees it, masks in place). ``read`` turns the row's logits at the ``shown`` positions into its result, a
    device tensor (no synchronisation)."""

    context: list[int]
    shown: list[int]
    read: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ScoreJob:
    """The rows of one result (a request; the requests sharing a one-token row) and what to do with their
    results once they are all on the host; ``requests``: how many requests it answers (for progress)."""

    rows: list[ScoreRow]
    finish: Callable[[list[torch.Tensor]], None]
    requests: int = 1


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 logits are widened, an fp64 model keeps fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def mc_rows(context: list[int], continuation: list[int], mask_id: int, mc_num: int,
            seed: int) -> list[ScoreRow]:
    """The ``mc_num`` Monte-Carlo samples of one request (one if the continuation is a single token: exact), each a
    row whose result is (L / l) · Σ CE over its l masked positions. Drawn from the request's own seed on the host,
    in groups of :data:`MC_GROUP`: the same rows whatever the batch they run in."""
    length = len(continuation)
    gen = torch.Generator().manual_seed(request_seed(seed, context, continuation))
    samples = 0 if length == 0 else 1 if length == 1 else mc_num
    rows, target = [], torch.tensor(continuation)
    for done in range(0, samples, MC_GROUP):
        for count in mask_counts(length, min(MC_GROUP, samples - done), gen).tolist():
            masked = torch.zeros(length, dtype=torch.bool)
            masked[torch.randperm(length, generator=gen)[:count]] = True
            shown = torch.where(masked, mask_id, target).tolist()

            def read(logits, masked=masked, count=count):
                ce = F.cross_entropy(_wide(logits), target.to(logits.device, non_blocking=True), reduction="none")
                return (ce * masked.to(logits.device, non_blocking=True)).sum().double() * (length / count)

            rows.append(ScoreRow(context, shown, read))
    return rows


def greedy_row(context: list[int], continuation: list[int], mask_id: int) -> ScoreRow:
    """Whether the argmax at every continuation position, all masked at once, is the continuation."""
    target = torch.tensor(continuation)
    return ScoreRow(context, [mask_id] * len(continuation),
                    lambda logits: (logits.argmax(-1) == target.to(logits.device, non_blocking=True)).all())


def single_token_row(context: list[int], options: list[int], mask_id: int) -> ScoreRow:
    """One masked position after ``context``: its log-probabilities of ``options`` and the argmax's index, one
    row for every one-token request that shares the context (result ``[len(options) + 1]``)."""
    index = torch.tensor(options)

    def read(logits):
        logprobs = F.log_softmax(_wide(logits[-1]), dim=-1)
        return torch.cat([logprobs[index.to(logits.device)].double(), logprobs.argmax().double().view(1)])

    return ScoreRow(context, [mask_id], read)


@torch.no_grad()
def run_rows(model, rows: list[ScoreRow], batch_size: int, mask_id: int, device) -> list:
    """Every row's result, in order, ``batch_size`` rows per forward. A forward's rows are laid out so that their
    contexts end at one column (left padding) and their continuations start there (right padding after them): the
    continuation is the maskable region of every row, and block routing starts its blocks there, as for the row
    alone. The results stay on the device; bring them over at once."""
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        cut = max(len(r.context) for r in chunk)
        width = cut + max(len(r.shown) for r in chunk)
        pads = [cut - len(r.context) for r in chunk]
        ends = [cut + len(r.shown) for r in chunk]
        layout = RowLayout(tuple(pads), None if all(e == width for e in ends) else tuple(ends))
        ids = lay_out([r.context + r.shown for r in chunk], pads, width, mask_id, device)
        region = torch.zeros(width, dtype=torch.bool)
        region[cut:] = True
        logits = forward_rows(model, ids, layout, maskable=region.to(device).expand(len(chunk), -1),
                              logits_to_keep=slice(cut, None), block_start=cut)
        results += [r.read(logits[b, :len(r.shown)]) for b, r in enumerate(chunk)]
    return results


def score_jobs(model, jobs: Iterable[ScoreJob], batch_size: int, mask_id: int, device, advance=None,
               rows_per_flush: int | None = None) -> None:
    """Run every job's rows, ``batch_size`` per forward, neighbouring jobs sharing forwards, and hand each job its
    results. Rows are built as the jobs come and run once ``rows_per_flush`` are waiting (whole forwards only, the
    rest wait for the next jobs): memory stays bounded on tasks of thousands of requests, and the results come to
    the host in one transfer per flush. ``advance()`` is called once per request answered."""
    rows_per_flush = rows_per_flush or 16 * batch_size
    waiting: list[tuple[ScoreRow, int]] = []  # (row, index of its job in ``open_jobs``)
    open_jobs: dict[int, tuple[ScoreJob, list]] = {}

    def finish(job: ScoreJob, values: list) -> None:
        job.finish(values)
        for _ in range(job.requests if advance else 0):
            advance()

    def flush(count: int) -> None:
        nonlocal waiting
        batch, waiting = waiting[:count], waiting[count:]
        outputs = run_rows(model, [row for row, _ in batch], batch_size, mask_id, device)
        sizes = [o.numel() for o in outputs]
        host = torch.cat([o.reshape(-1).double() for o in outputs]).cpu().split(sizes) if outputs else []
        for (_, key), value in zip(batch, host):
            job, values = open_jobs[key]
            values.append(value)
            if len(values) == len(job.rows):
                del open_jobs[key]
                finish(job, values)

    for key, job in enumerate(jobs):
        if not job.rows:  # nothing to compute (an empty continuation)
            finish(job, [])
            continue
        open_jobs[key] = (job, [])
        waiting += [(row, key) for row in job.rows]
        if len(waiting) >= rows_per_flush:
            flush(len(waiting) - len(waiting) % batch_size)
    flush(len(waiting))


def mc_loglikelihood(model, context: list[int], continuation: list[int], mask_id: int, mc_num: int,
                     batch_size: int, seed: int, device) -> float:
    """Estimate log p(continuation | context) with ``mc_num`` masked samples, ``batch_size`` per forward."""
    rows = mc_rows(context, continuation, mask_id, mc_num, seed)
    return mc_estimate(run_rows(model, rows, batch_size, mask_id, device))


def mc_estimate(values: list[torch.Tensor]) -> float:
    """The log-likelihood from the rows' (L / l) · Σ CE: minus their mean, summed in fp64 in row order (the same
    sum in any batch); 0 for an empty continuation."""
    return -float(torch.stack(values).double().sum().cpu()) / len(values) if values else 0.0
