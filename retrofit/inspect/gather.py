"""Gather ``routing.json``: each model's routing statistics per MoE layer and mask-ratio bucket.

Two ways to fill the buckets, one recording path (``enable_routing_stats(mask_ratios=...)``, i.e.
:class:`~retrofit.routers.stats.StatsByMaskRatio` in every MoE layer):
- a noising sweep: text cut into fixed-length sequences (as held-out evaluation does), every token masked with
  each bucket's ratio (seeded: the same positions for every model), one forward per batch;
- tasks: lm-eval tasks run as ``retrofit eval`` runs them, each forward of the sampler (or of Monte-Carlo
  likelihood) going to the bucket of the mask ratio it saw.
The schema is versioned (``VERSION``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retrofit.io.load import load_model
from retrofit.io.tokenizer_files import load_tokenizer
from retrofit.routers import RouterSettings, experts_per_token
from retrofit.routers.stats import MASK_RATIOS
from retrofit.sources import resolve_source

VERSION = 1


@dataclass(frozen=True)
class Subject:
    """One model under one router: what a figure's legend names."""

    model: str  # what the user asked for: a registry name or a directory
    router: RouterSettings | None  # None: the checkpoint's own

    def label(self, settings: RouterSettings) -> str:
        return f"{Path(self.model).name} ({settings.type})"


def noised(sequences: torch.Tensor, ratio: float, mask_id: int, seed: int) -> torch.Tensor:
    """Every token masked with probability ``ratio``, the same positions for every model (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(sequences.shape, generator=gen) < ratio
    return sequences.masked_fill(masked, mask_id)


def asked_k(settings: RouterSettings, top_k: int, ratio: float) -> float:
    """Experts per token the router asks for at ``ratio``: EC's capacity schedule k(r) × capacity factor; the
    checkpoint's top-k for routers whose tokens each take k."""
    if settings.type != "ec":
        return float(top_k)
    k = experts_per_token(settings.schedule, top_k, torch.tensor([ratio]))
    return float(k[0]) * settings.capacity_factor


def layer_record(stats, settings: RouterSettings, top_k: int, ratio: float) -> dict:
    record = stats.as_dict()
    keep = ("tokens_per_expert", "experts_per_token_histogram", "tokens_with_zero_experts", "unique_experts",
            "unique_experts_per_block", "gate_mass_per_token", "capacity_per_routing", "tokens")
    out = {k: record[k] for k in keep}
    out.update(expected_k=asked_k(settings, top_k, ratio), realised_k=record["mean_experts_per_token"])
    return out


def model_entry(model, settings: RouterSettings, label: str, path: Path) -> dict:
    """One entry of ``routing.json["models"]`` from what ``model`` recorded with ``enable_routing_stats(...,
    mask_ratios=...)``: one bucket per mask ratio that saw tokens, one record per MoE layer."""
    from retrofit.models import family_of

    config, blocks = model.config, model.moe_blocks()
    buckets = []
    for index in blocks[0].stats.filled():  # every layer sees the same sequences
        ratio = blocks[0].stats.ratios[index]
        layers = [layer_record(block.stats.buckets[index], settings, config.num_experts_per_tok, ratio)
                  for block in blocks]
        buckets.append({"mask_ratio": ratio, "layers": layers})
    return {"label": label, "path": str(path), "family": family_of(config).name, "router": settings.model_dump(),
            "num_experts": config.num_experts, "top_k": config.num_experts_per_tok, "num_layers": len(blocks),
            "buckets": buckets}


@torch.no_grad()
def gather_model(subject: Subject, data: Path, fields: list[str], limit: int, seq_len: int, seed: int,
                 ratios=MASK_RATIOS, batch_size: int = 8, block_length: int = 32, progress=None) -> dict:
    """One entry of ``routing.json["models"]`` from a noising sweep: every sequence at each of ``ratios``.
    ``progress(more=n)`` announces n forwards to come, ``progress(advance=1)`` reports one done."""
    from retrofit.heldout import text_sequences

    source = resolve_source(subject.model, flag="--model")
    model = load_model(source.path, router=subject.router)
    config, settings = model.config, model.config.router_settings
    sequences = text_sequences(load_tokenizer(source.path), data, fields, seq_len=seq_len, max_examples=limit)
    if progress:  # this model's forwards join the total
        progress(more=len(ratios) * -(-len(sequences) // batch_size))
    model.enable_routing_stats(block_length=block_length, mask_ratios=ratios)
    for i, ratio in enumerate(ratios):
        noisy = noised(sequences, ratio, config.mask_token_id, seed + i)
        for start in range(0, len(noisy), batch_size):
            batch = noisy[start:start + batch_size]
            model(input_ids=batch, mask_ratio=torch.full((len(batch),), float(ratio)))
            if progress:
                progress(advance=1)
    return model_entry(model, settings, subject.label(settings), source.path)


def gather(subjects: list[Subject], data: Path, fields: list[str], limit: int, seq_len: int = 128, seed: int = 0,
           ratios=MASK_RATIOS, block_length: int = 32, progress=None) -> dict:
    models = [gather_model(s, data, fields, limit, seq_len, seed, ratios, block_length=block_length,
                           progress=progress) for s in subjects]
    return {"version": VERSION,
            "settings": {"data": str(data), "fields": fields, "limit": limit, "seq_len": seq_len, "seed": seed,
                         "mask_ratios": list(ratios), "block_length": block_length},
            "models": models}


def sampled_entry(lm) -> dict:
    """The ``routing.json`` entry of what a :class:`~retrofit.eval.adapter.RetrofitLM` recorded while it ran its
    tasks (its forwards sorted into mask-ratio buckets by the ratio each one saw)."""
    return model_entry(lm.model, lm.router, f"{Path(lm.path).name} ({lm.router.type})", lm.path)


def sampled_record(entries: list[dict], tasks: list[str], limit: int | None, data_dir: Path | None,
                   sampler: dict, block_length: int) -> dict:
    """``routing.json`` of routing recorded while tasks ran (``retrofit inspect --tasks``, ``retrofit eval``)."""
    return {"version": VERSION,
            "settings": {"source": "tasks", "tasks": tasks, "limit": limit,
                         "data_dir": str(data_dir) if data_dir else None, "sampler": sampler,
                         "mask_ratios": list(MASK_RATIOS), "block_length": block_length},
            "models": entries}


def gather_sampled(subjects: list[Subject], tasks: list[str], limit: int, data_dir: Path | None,
                   sampler: dict, announce=None) -> dict:
    """Run ``tasks`` (lm-eval, offline from ``data_dir`` when given) once per subject, recording routing during
    sampling and likelihood scoring; each entry also keeps the scores. ``sampler``: RetrofitLM's sampler
    arguments (gen_length, steps, denoise_block). ``announce(label)`` is told which model starts."""
    from retrofit.eval.adapter import RetrofitLM
    from retrofit.eval.runner import prepared_tasks, run_eval

    entries = []
    with prepared_tasks(tasks, data_dir) as prepared:  # unknown tasks are refused before any model loads
        for subject in subjects:
            if announce:
                announce(subject.model)
            lm = RetrofitLM(subject.model, router=subject.router, **sampler)
            record = run_eval(lm, tasks, limit=limit, data_dir=data_dir, prepared=prepared)
            entry = sampled_entry(lm)
            entry["scores"] = record["results"] if record else {}
            entries.append(entry)
    return sampled_record(entries, tasks, limit, data_dir, {"name": lm.sampler.name, **lm.sampler.settings.__dict__},
                          lm.sampler.denoise_block)


def routing_of_evaluation(lm, record: dict, tasks: list[str], limit: int | None, data_dir: Path | None) -> dict:
    """The routing a ``retrofit eval`` run recorded (``lm``, its RetrofitLM) with its scores, as a
    ``retrofit inspect --tasks`` record, to draw the same figures beside the scores."""
    entry = sampled_entry(lm)
    entry["scores"] = record["results"]
    return sampled_record([entry], tasks, limit, data_dir, record["settings"]["sampler"], lm.sampler.denoise_block)
