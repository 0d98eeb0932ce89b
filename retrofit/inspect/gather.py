"""Gather ``routing.json``: each model's routing statistics per MoE layer and mask-ratio bucket.

Text is cut into fixed-length sequences (as held-out evaluation does), each bucket masks every token with the
bucket's probability (seeded: the same positions for every model), and one forward per batch records the
statistics of every MoE layer (``RoutingStats``). The schema is versioned (``VERSION``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retrofit.io.load import load_model
from retrofit.io.tokenizer_files import load_tokenizer
from retrofit.routers import RouterSettings, experts_per_token
from retrofit.sources import resolve_source

VERSION = 1
MASK_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


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


@torch.no_grad()
def gather_model(subject: Subject, data: Path, fields: list[str], limit: int, seq_len: int, seed: int,
                 ratios=MASK_RATIOS, batch_size: int = 8, block_length: int = 32, progress=None) -> dict:
    """One entry of ``routing.json["models"]``. ``progress(more=n)`` announces n forwards to come,
    ``progress(advance=1)`` reports one done."""
    from retrofit.eval.heldout import text_sequences
    from retrofit.models import family_of

    source = resolve_source(subject.model, flag="--model")
    model = load_model(source.path, router=subject.router)
    config, settings = model.config, model.config.router_settings
    sequences = text_sequences(load_tokenizer(source.path), data, fields, seq_len=seq_len, max_examples=limit)
    if progress:  # this model's forwards join the total
        progress(more=len(ratios) * -(-len(sequences) // batch_size))
    buckets = []
    for i, ratio in enumerate(ratios):
        model.enable_routing_stats(block_length=block_length)
        noisy = noised(sequences, ratio, config.mask_token_id, seed + i)
        for start in range(0, len(noisy), batch_size):
            batch = noisy[start:start + batch_size]
            model(input_ids=batch, mask_ratio=torch.full((len(batch),), float(ratio)))
            if progress:
                progress(advance=1)
        layers = [layer_record(block.stats, settings, config.num_experts_per_tok, ratio) for block in
                  model.moe_blocks()]
        buckets.append({"mask_ratio": ratio, "layers": layers})
    return {"label": subject.label(settings), "path": str(source.path), "family": family_of(config).name,
            "router": settings.model_dump(), "num_experts": config.num_experts, "top_k": config.num_experts_per_tok,
            "num_layers": len(model.moe_blocks()), "buckets": buckets}


def gather(subjects: list[Subject], data: Path, fields: list[str], limit: int, seq_len: int = 128, seed: int = 0,
           ratios=MASK_RATIOS, block_length: int = 32, progress=None) -> dict:
    models = [gather_model(s, data, fields, limit, seq_len, seed, ratios, block_length=block_length,
                           progress=progress) for s in subjects]
    return {"version": VERSION,
            "settings": {"data": str(data), "fields": fields, "limit": limit, "seq_len": seq_len, "seed": seed,
                         "mask_ratios": list(ratios), "block_length": block_length},
            "models": models}
