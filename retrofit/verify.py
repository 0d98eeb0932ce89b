"""Check a written checkpoint against its source without holding either model in memory.

Tensors are compared shard by shard, and not at all where the written shard *is* the source's file (a hard
link: same inode, same bytes). Logits come from a *streamed* forward: one decoder layer at a time is read into
a one-layer shell, the embedding rows the probe uses and the output head in row chunks, so verifying a 7B
conversion needs about one layer of memory. Several variants (the source's routing and the converted one) run
through each layer while it is loaded, so every layer is read once.
"""

from __future__ import annotations

import os

import torch

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import checkpoint_config, fill_from_checkpoint
from retrofit.models import family_of
from retrofit.models.moe import SparseMoeBlock
from retrofit.routers import build_router

_HEAD_CHUNK_ROWS = 32768  # output-head rows per matmul: 128 MiB of fp32 weights at LLaDA-MoE's width


def _meta_model(config, dtype: torch.dtype):
    """The whole model on the meta device (no memory): its layers are given memory one at a time."""
    with torch.device("meta"):
        return family_of(config).model_class(config).to(dtype).eval()


def _embed(ckpt: CheckpointDir, name: str, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The embedding of ``input_ids``, reading only the rows they use."""
    used, positions = input_ids.unique(return_inverse=True)
    rows = ckpt.read_rows(name, used.tolist()).to(dtype)
    return rows[positions]


def _head(ckpt: CheckpointDir, name: str, vocab_size: int, hidden: torch.Tensor) -> torch.Tensor:
    chunks = []
    for start in range(0, vocab_size, _HEAD_CHUNK_ROWS):
        rows = list(range(start, min(start + _HEAD_CHUNK_ROWS, vocab_size)))
        chunks.append(torch.nn.functional.linear(hidden, ckpt.read_rows(name, rows).to(hidden.dtype)))
    return torch.cat(chunks, dim=-1)


@torch.no_grad()
def streamed_logits_many(ckpt: CheckpointDir, input_ids: torch.Tensor, variants: list[CheckpointDir],
                         attention_mask: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Logits on ``input_ids`` of each variant: ``ckpt``'s weights with the variant's routers (its router
    settings and router tensors). The variants' other tensors must equal ``ckpt``'s (see compare_tensors)."""
    config = checkpoint_config(ckpt)
    parts = _meta_model(config, dtype).streamed_parts()
    x0, layer_args = parts.prepare(input_ids, attention_mask, embeds=_embed(ckpt, parts.embedding, input_ids, dtype))
    norm_prefix, norm = parts.norm
    norm.to_empty(device="cpu")
    fill_from_checkpoint(norm, ckpt, [n for n in ckpt.weight_map if n.startswith(norm_prefix)],
                         lambda n: n.removeprefix(norm_prefix))
    family = family_of(config)
    routed = set(family.moe_layers(config))
    routers = [_variant_router(v, config) for v in variants]
    streams = [x0] * len(variants)
    shells: dict[tuple, torch.nn.Module] = {}
    for i, (prefix, layer) in enumerate(parts.layers):
        layer = _shell(layer, shells)
        names = [n for n in ckpt.weight_map if n.startswith(prefix)]
        fill_from_checkpoint(layer, ckpt, names, lambda n: n.removeprefix(prefix))
        block = next((m for m in layer.modules() if isinstance(m, SparseMoeBlock)), None) if i in routed else None
        for v, (variant, build) in enumerate(zip(variants, routers)):
            if block is not None:
                block.gate = build(variant, family.router_tensor_name(i).removesuffix("weight"))
            streams[v] = layer(streams[v], *layer_args)
        if not all(bool(torch.isfinite(x).all()) for x in streams):
            _check_finite(layer, ckpt, prefix)  # only then: scanning every weight costs time and memory
    return [_head(ckpt, parts.head, config.vocab_size, norm(x)) for x in streams]


def _shell(layer: torch.nn.Module, shells: dict[tuple, torch.nn.Module]) -> torch.nn.Module:
    """The memory a layer is read into: one allocation per layer structure (class and parameter shapes), reused
    by every layer of that structure (they differ only in their weights), so verifying needs about one layer of
    each kind (a dense first layer, MoE layers) and the allocator is not asked for a 7B model's worth in turn."""
    key = (type(layer), tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()))
    if key not in shells:
        shells[key] = layer.to_empty(device="cpu")
    return shells[key]


def _check_finite(layer: torch.nn.Module, ckpt: CheckpointDir, prefix: str) -> None:
    """A damaged checkpoint is named as such, not reported as a difference of the copy."""
    for name, param in layer.named_parameters():
        if not all(bool(torch.isfinite(chunk).all()) for chunk in param.reshape(-1).split(1 << 24)):
            raise RetrofitError(f"the checkpoint at {ckpt.path} holds NaN or inf values in {prefix}{name}; it is "
                                "damaged (download it again)")


def _variant_router(variant: CheckpointDir, base):
    settings = checkpoint_config(variant).router_settings
    scoring = family_of(base).scoring(base)

    def build(ckpt: CheckpointDir, prefix: str):
        """The variant's router of one layer, holding its tensors (``prefix``: "model.layers.3.mlp.gate.")."""
        router = build_router(settings, base.hidden_size, base.num_experts, base.num_experts_per_tok, scoring)
        tensors = ckpt.read([n for n in ckpt.weight_map if n.startswith(prefix)])
        router.load_state_dict({n.removeprefix(prefix): t for n, t in tensors.items()}, assign=True)
        return router.requires_grad_(False)

    return build


def streamed_logits(ckpt: CheckpointDir, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of the checkpoint (with its own router settings) on ``input_ids``, one layer in memory."""
    return streamed_logits_many(ckpt, input_ids, [ckpt], attention_mask, dtype)[0]


def probe_input(config, length: int = 24, seed: int = 0) -> torch.Tensor:
    """A fixed two-sequence input with some mask tokens, so timestep-aware routers see a real mask ratio."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(config.vocab_size, 256), (2, length), generator=gen)
    ids[0, length // 2:] = config.mask_token_id
    ids[1, ::3] = config.mask_token_id
    return ids


def compare_tensors(src: CheckpointDir, out: CheckpointDir, skip: set[str]) -> int:
    """Every tensor of ``src`` not in ``skip`` must be present in ``out`` and equal in dtype and bytes.
    A shard of ``out`` that is the very file of ``src`` (a hard link) holds the same bytes and is not read."""
    if set(src.weight_map) != set(out.weight_map):
        diff = sorted(set(src.weight_map) ^ set(out.weight_map))
        raise RetrofitError(f"verification failed: tensor names differ from the source: {diff[:5]}")
    checked = 0
    for shard in src.shards:
        names = [n for n in src.tensors_in(shard) if n not in skip]
        if all(_same_file(src, out, n) for n in names):
            checked += len(names)
            continue
        ours = out.read(names)
        for name, theirs in src.read(names).items():
            # Bytes, not values: NaN != NaN, and a byte-identical copy of a non-finite tensor is a faithful copy.
            if ours[name].dtype != theirs.dtype or not torch.equal(_bytes(ours[name]), _bytes(theirs)):
                raise RetrofitError(f"verification failed: {name} differs from the source")
            checked += 1
    return checked


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _same_file(src: CheckpointDir, out: CheckpointDir, name: str) -> bool:
    a, b = src.path / src.weight_map[name], out.path / out.weight_map[name]
    return a.name == b.name and os.path.samefile(a, b)
