"""What every family's native model shares: the routing context, the layer loop, the masked-diffusion LM head
and the :class:`~retrofit.models.family.NativeModel` methods (MoE blocks, routing statistics, activation
checkpointing), the attention bias, the weight init and the streamed-forward description. A family's module
keeps only what is its own: config, attention, layers, names.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput

from retrofit.models.kv_cache import BlockCache
from retrofit.models.layers import RMSNorm
from retrofit.models.moe import SparseMoeBlock, StackedExperts
from retrofit.routers import Router, RoutingContext, RoutingStats, StatsByMaskRatio


@dataclass
class StreamedParts:
    """How to run a model one decoder layer at a time from its checkpoint (``retrofit.verify``): the Hub names of
    the embedding and output head, the final norm and the decoder layers with their name prefixes, and
    ``prepare(input_ids, attention_mask, embeds=...)`` → (hidden states, the layers' other arguments)."""

    embedding: str
    head: str
    norm: tuple[str, nn.Module]
    layers: list[tuple[str, nn.Module]]
    prepare: Callable


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """The random init of a fresh model (transformers' init functions skip tensors loaded from a checkpoint)."""
    if isinstance(module, (nn.Linear, nn.Embedding, Router)):
        init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, Router) and module.bias is not None:
            init.zeros_(module.expert_bias)
    elif isinstance(module, StackedExperts):
        for p in (module.gate_proj, module.up_proj, module.down_proj):
            init.normal_(p, mean=0.0, std=std)
    elif isinstance(module, RMSNorm):
        init.ones_(module.weight)


def attention_bias(valid: torch.Tensor, blocks: int | None, dtype: torch.dtype,
                   allowed_pairs: torch.Tensor | None = None, padded: bool = True) -> torch.Tensor | None:
    """The additive attention mask: padding keys hidden (``[B, 1, 1, L]``); with ``blocks`` = n each query sees
    only the keys of its own n-token block and the blocks before it, blocks counted from position 0; with
    ``allowed_pairs`` (``[L, L]`` bool, query × key) exactly those pairs (``[B, 1, L, L]``); None when nothing is
    hidden. ``padded=False`` says ``valid`` is all True without the device being asked (no synchronisation)."""
    if blocks is None and allowed_pairs is None and not padded:
        return None
    length = valid.shape[1]
    allowed = valid[:, None, None, :]
    if blocks is not None:
        block = torch.arange(length, device=valid.device) // blocks
        allowed = allowed & (block[None, :] <= block[:, None])[None, None]  # [query, key]: key's block ≤ query's
    if allowed_pairs is not None:
        allowed = allowed & allowed_pairs.to(valid.device)[None, None]
    if (blocks is not None or allowed_pairs is not None) and padded:
        # A padding query may find no key it is allowed (left padding before a row's first block): let it see
        # itself, so that no row of the softmax is all hidden. Valid queries are unchanged.
        allowed = allowed | ((~valid)[:, None, :, None] & torch.eye(length, dtype=torch.bool, device=valid.device))
    if blocks is None and allowed_pairs is None and bool(valid.all()):
        return None
    bias = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class Backbone:
    """Mixin of a family's decoder stack (``layers``, ``norm``, ``rotary_emb``, ``gradient_checkpointing``, and the
    embedding named by ``embedding_name``). ``focus_on_maskable``: the ``maskable`` region a caller names is the
    block being denoised, whose experts routing statistics count (LLaDA2.0's sampler)."""

    embedding_name = "embed_tokens"
    focus_on_maskable = False

    def routing_context(self, input_ids, attention_mask, mask_ratio, maskable=None, block_start=0,
                        focus: bool = False) -> RoutingContext:
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        region = valid if maskable is None else maskable.bool() & valid
        counts = None
        if mask_ratio is None:
            # Observed mask ratio: masked positions / maskable positions of each sequence (docs/algorithms.md §2).
            # A prompt is never masked, so counting it would pull r towards 0 with every prompt token.
            counts = ((input_ids == self.config.mask_token_id) & region).sum(-1), region.sum(-1)
            mask_ratio = counts[0].float() / counts[1].clamp(min=1).float()
        return RoutingContext(valid=valid, mask_ratio=mask_ratio.float(), block_start=int(block_start),
                              focus=region if focus and maskable is not None else None,
                              padded=attention_mask is not None, mask_counts=counts)

    def prepare(self, input_ids, attention_mask=None, mask_ratio=None, embeds=None, maskable=None, block_start=0,
                attention_blocks: int | None = None, position_ids=None, allowed_pairs=None,
                kv_cache: BlockCache | None = None, compute: slice | None = None):
        """The embeddings (``embeds`` when given) and everything the layers need besides them: rotary tables (at
        ``position_ids``, default 0..L−1), the attention bias (padding; block-causal or ``allowed_pairs`` when
        asked), the routing context and the key/value cache. ``compute``: only these columns run, attending to
        the cache's keys elsewhere (a cached denoising step); the masks and the mask ratio still come from the
        whole ``input_ids``."""
        ctx = self.routing_context(input_ids, attention_mask, mask_ratio, maskable, block_start,
                                   focus=self.focus_on_maskable)
        ctx.cache = kv_cache
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) if position_ids is None else position_ids
        valid = ctx.valid
        if compute is not None:
            input_ids, positions, ctx = input_ids[:, compute], positions[..., compute], ctx.narrowed(compute)
        x = getattr(self, self.embedding_name)(input_ids) if embeds is None else embeds
        rope = self.rotary_emb(positions, x.dtype)
        bias = attention_bias(valid, attention_blocks, x.dtype, allowed_pairs, ctx.padded)
        if compute is not None and bias is not None and bias.shape[-2] > 1:
            bias = bias[:, :, compute]  # the computed queries' rows; every key stays
        return x, (rope, bias, ctx, kv_cache)

    def forward(self, input_ids, attention_mask=None, mask_ratio=None, maskable=None, block_start=0,
                attention_blocks: int | None = None, position_ids=None, allowed_pairs=None,
                kv_cache: BlockCache | None = None, compute: slice | None = None) -> torch.Tensor:
        if compute is not None:  # explicit ends (slice(8, None) → slice(8, L)): the cache splices at both
            compute = slice(*compute.indices(input_ids.shape[1])[:2])
        if kv_cache is not None:
            kv_cache.start(compute, input_ids.shape[0])
        x, layer_args = self.prepare(input_ids, attention_mask, mask_ratio, maskable=maskable,
                                     block_start=block_start, attention_blocks=attention_blocks,
                                     position_ids=position_ids, allowed_pairs=allowed_pairs, kv_cache=kv_cache,
                                     compute=compute)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # Recompute each layer in the backward pass instead of keeping its activations.
                x = torch.utils.checkpoint.checkpoint(layer, x, *layer_args, use_reentrant=False)
            else:
                x = layer(x, *layer_args)
        return self.norm(x)


class MaskedDiffusionLM:
    """Mixin of a family's LM (``model``: its backbone, ``lm_head``): ``logits[B, L, V]`` for every position (no
    shift: it is not causal), and the :class:`~retrofit.models.family.NativeModel` methods."""

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, mask_ratio=None, logits_to_keep: slice | None = None,
                maskable=None, block_start: int = 0, attention_blocks: int | None = None, position_ids=None,
                allowed_pairs=None, kv_cache: BlockCache | None = None, compute: slice | None = None,
                **unused) -> MaskedLMOutput:
        """``logits_to_keep``: the positions whose logits are wanted (all by default). The output head is the
        largest single matmul (157k rows at 7B) and its logits the largest tensor, so callers that read a few
        positions (the sampler's current block, a continuation) ask for just those. ``maskable`` (``[B, L]``
        bool) and ``block_start``: see :class:`retrofit.routers.RoutingContext`. ``attention_blocks``:
        block-causal attention with blocks of that many positions from position 0 (LLaDA2.0's sampling); None:
        bidirectional. ``position_ids`` and ``allowed_pairs``: rotary positions and exactly which (query, key)
        pairs attend, for layouts such as LLaDA2.0's block-diffusion training (``retrofit.diffusion``).
        ``kv_cache`` and ``compute``: a refresh (``compute`` None) records every layer's keys and values; a cached
        step computes the columns ``compute`` only (:mod:`retrofit.models.kv_cache`), and ``logits_to_keep`` then
        counts from the span's first column."""
        hidden = self.model(input_ids, attention_mask=attention_mask, mask_ratio=mask_ratio, maskable=maskable,
                            block_start=block_start, attention_blocks=attention_blocks, position_ids=position_ids,
                            allowed_pairs=allowed_pairs, kv_cache=kv_cache, compute=compute)
        if logits_to_keep is not None:
            hidden = hidden[:, logits_to_keep]
        return MaskedLMOutput(logits=self.lm_head(hidden))

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The routed layers' MoE blocks, in layer order (dense layers have none)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations."""
        self.model.gradient_checkpointing = enabled

    def enable_routing_stats(self, enabled: bool = True, block_length: int = 32, mask_ratios=None) -> None:
        """Start (or stop) recording routing statistics in every MoE layer; starting clears old ones.
        ``block_length`` sets the blocks over which unique experts per block are counted; ``mask_ratios``, when
        given, also splits them by each sequence's mask ratio (:class:`StatsByMaskRatio`)."""
        self._stats_block_length = block_length
        for block in self.moe_blocks():
            if not enabled:
                block.stats = None
            elif mask_ratios is None:
                block.stats = RoutingStats(self.config.num_experts, block_length)
            else:
                block.stats = StatsByMaskRatio(self.config.num_experts, block_length, mask_ratios)

    @contextmanager
    def routing_stats_paused(self):
        """Forwards run inside record no routing statistics (a distillation teacher's, a held-out probe's, a
        rank's filler forward); the counts recorded before go on afterwards."""
        blocks = self.moe_blocks()
        saved = [block.stats for block in blocks]
        for block in blocks:
            block.stats = None
        try:
            yield
        finally:
            for block, stats in zip(blocks, saved):
                block.stats = stats

    def routing_stats(self) -> RoutingStats:
        """Statistics recorded since :meth:`enable_routing_stats`, merged over layers (unique experts is the
        mean per layer per forward)."""
        merged = RoutingStats(self.config.num_experts, getattr(self, "_stats_block_length", 32))
        for block in self.moe_blocks():
            if block.stats is None:
                raise RuntimeError("routing statistics are off; call enable_routing_stats() first")
            merged.merge(block.stats.merged())
        return merged

    def layer_stream(self, embedding: str, head: str) -> StreamedParts:
        """:class:`StreamedParts` of a model whose layers are ``model.layers.{i}`` and final norm ``model.norm``."""
        layers = [(f"model.layers.{i}.", layer) for i, layer in enumerate(self.model.layers)]
        return StreamedParts(embedding, head, ("model.norm.", self.model.norm), layers, self.model.prepare)
