"""Tiny random models of the real architectures, for tests, benchmarks and `retrofit create-tiny`.

``write_hub_snapshot`` lays a model out exactly like its family's Hub snapshot (for LLaDA-MoE, that of
inclusionAI/LLaDA-MoE-7B-A1B-Base: a config.json with the Hub's ``model_type: "llada"``/``architectures``/
``auto_map`` and every public field), bf16 safetensors shards with per-expert tensor names plus their index,
and tokenizer files.

``create_preset`` writes the same layout at full size (``retrofit create-tiny --preset llada-moe-7b``: the real
7.36B-parameter shapes, 14.7 GB of random bf16 weights in the Hub's three 5 GB shards) without ever building
the model: it plans every tensor's name, dtype and shape, then makes and writes one tensor at a time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from retrofit.errors import RetrofitError
from retrofit.io.tokenizer_files import EOS_TOKEN, MASK_TOKEN, write_chat_template
from retrofit.tiny.tokenizers import train_bpe_tokenizer, write_byte_tokenizer, write_padded_byte_tokenizer
from retrofit.io.writer import (TensorSpec, atomic_directory, plan_shards, write_json, write_sharded,
                                write_streaming_sharded)
from retrofit.models import FAMILIES, LLADA_MOE, ModelFamily, family_of
from retrofit.models.moe import hub_state_dict, hub_tensor_shapes
from retrofit.routers import router_settings

# Small enough for a CPU test in milliseconds; 8 experts, top-2 as the issue asks (LLaDA-MoE's field names).
TINY_DIMS = LLADA_MOE.tiny_dims()
TINY_EOS_ID, TINY_MASK_ID = 256, 257  # the byte tokenizer's special tokens


def hub_config_dict(family: ModelFamily = LLADA_MOE, **dims) -> dict:
    """A config.json shaped like the family's public one (LLaDA-MoE's has no ``mask_token_id``), tiny by default."""
    unknown = sorted(set(dims) - set(family.config_class().to_dict()))
    if unknown:  # a config class keeps unknown keys as attributes, which no layer reads: the shape would be lost
        raise TypeError(f"not {family.display_name} config fields: {', '.join(unknown)} (a generic shape such as "
                        "layers= or experts= goes through tiny_shape)")
    d = {**family.tiny_dims(), **dims}
    eos, pad = d.pop("eos_token_id", TINY_EOS_ID), d.pop("pad_token_id", TINY_EOS_ID)
    mask = d.pop("mask_token_id", TINY_MASK_ID)  # not in the Hub's config.json; only keeps the config valid
    return family.hub_config(family.config_class(**d, eos_token_id=eos, pad_token_id=pad, mask_token_id=mask))


def tiny_shape(family: ModelFamily = LLADA_MOE, **shape) -> dict:
    """Config fields of a tiny ``family`` model of a generic shape (create-tiny's: hidden_size, layers, heads,
    experts, top_k, expert_size), without the vocabulary, which the tokenizer sets."""
    dims = family.tiny_dims(**shape)
    dims.pop("vocab_size")
    return dims


def build_tiny_model(seed: int = 0, router=None, mask_token_id: int = TINY_MASK_ID,
                     family: ModelFamily = LLADA_MOE, **dims):
    """A randomly initialised tiny model of ``family`` (fp32). Gate weights get a larger scale than the default
    init so that routing is far from uniform, as in a trained checkpoint."""
    raw = hub_config_dict(family, **dims)
    settings = router_settings(router).model_dump() if router is not None else None
    config = family.config_from_checkpoint({**raw, "mask_token_id": mask_token_id, "router": settings})
    torch.manual_seed(seed)
    model = family.model_class(config)
    with torch.no_grad():
        for block in model.moe_blocks():
            block.gate.weight.normal_(0.0, 0.5)
            if block.gate.bias is not None:  # an expert bias that moves selection, as a trained one does
                block.gate.expert_bias.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # perturb norms so a wrong norm placement shows up in parity
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_hub_snapshot(model, out: str | Path, max_shard_bytes: int = 96 * 1024,
                       dtype: torch.dtype = torch.bfloat16, force: bool = False,
                       write_tokenizer: Callable[[Path], dict[str, int]] = write_byte_tokenizer) -> Path:
    """Write ``model`` as a Hub-style snapshot directory (atomically); ``write_tokenizer`` writes the
    tokenizer files and returns its special ids, which must be the ones the model was built with."""
    cfg = model.config
    tensors = {k: v.detach().to(dtype) for k, v in hub_state_dict(model).items()}
    with atomic_directory(out, force=force) as tmp:
        config = family_of(cfg).hub_config(cfg)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
        write_sharded(tmp, tensors, max_shard_bytes)
        ids = write_tokenizer(tmp)
        if ids != {EOS_TOKEN: cfg.eos_token_id, MASK_TOKEN: cfg.mask_token_id}:
            raise ValueError(f"tokenizer special ids {ids} differ from the model's (eos {cfg.eos_token_id}, "
                             f"mask {cfg.mask_token_id})")
        write_chat_template(tmp, family_of(cfg).chat_template())
        write_json(tmp / "generation_config.json", {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id})
    return Path(out).expanduser().resolve()


def create_tiny(out: str | Path, seed: int = 0, max_shard_bytes: int = 96 * 1024, force: bool = False,
                dtype: torch.dtype = torch.bfloat16, tokenizer_texts=None, vocab_size: int | None = None,
                **dims) -> Path:
    """A tiny random snapshot; with ``tokenizer_texts`` its tokenizer is a BPE of ``vocab_size`` trained on them
    (specials first: EOS 0, mask 1), otherwise the 258-token byte tokenizer."""
    if tokenizer_texts is None:
        return write_hub_snapshot(build_tiny_model(seed, **dims), out, max_shard_bytes=max_shard_bytes,
                                  dtype=dtype, force=force)
    texts = list(tokenizer_texts)
    model = build_tiny_model(seed, mask_token_id=1, eos_token_id=0, pad_token_id=0, vocab_size=vocab_size, **dims)
    return write_hub_snapshot(model, out, max_shard_bytes=max_shard_bytes, dtype=dtype, force=force,
                              write_tokenizer=lambda d: train_bpe_tokenizer(texts, vocab_size, d))


# --- Full-size presets: the real shapes, streamed to disk --------------------------------------------------

HUB_MAX_SHARD_BYTES = 5_000_000_000  # save_pretrained's max_shard_size="5GB", which the Hub snapshot used
ROUTER_STD = 0.5  # as build_tiny_model: routing far from uniform, as in a trained checkpoint
NORM_RANGE = (0.5, 1.5)  # as build_tiny_model
CHUNK_ELEMENTS = 1 << 23  # generate at most 8M fp32 values (32 MiB) at once


@dataclass(frozen=True)
class Preset:
    name: str
    dims: dict = field(hash=False)
    eos_token_id: int
    mask_token_id: int
    max_shard_bytes: int = HUB_MAX_SHARD_BYTES
    dtype: torch.dtype = torch.bfloat16
    initializer_range: float = 0.02
    family: str = "llada-moe"


def _llada_moe_7b() -> Preset:
    """LLaDA-MoE-7B-A1B: the shapes are the config class's defaults, which are the Hub config's."""
    defaults = LLADA_MOE.config_class()
    return Preset("llada-moe-7b", {k: getattr(defaults, k) for k in TINY_DIMS}, defaults.eos_token_id,
                  defaults.mask_token_id, initializer_range=defaults.initializer_range)


def _llada2_mini() -> Preset:
    """LLaDA2.0-mini (16.26B parameters): the config class's defaults (dMoE's copy of the Hub config); 5 GB shards
    (the Hub's shard layout of mini is not established)."""
    defaults = FAMILIES["llada2"].config_class()
    dims = {k: getattr(defaults, k) for k in FAMILIES["llada2"].tiny_dims()}
    return Preset("llada2-mini", dims, defaults.eos_token_id, defaults.mask_token_id,
                  initializer_range=defaults.initializer_range, family="llada2")


PRESETS: dict[str, Callable[[], Preset]] = {"llada-moe-7b": _llada_moe_7b, "llada2-mini": _llada2_mini}


def get_preset(name: str, **overrides) -> Preset:
    """A preset by name; ``overrides`` (tests only) replace fields, ``dims`` merged into the preset's."""
    if name not in PRESETS:
        raise RetrofitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]()
    if overrides:
        dims = {**preset.dims, **overrides.pop("dims", {})}
        preset = Preset(**{**preset.__dict__, "dims": dims, **overrides})
    return preset


def hub_tensor_specs(dims: dict, dtype: torch.dtype = torch.bfloat16, tie_word_embeddings: bool = False,
                     family: ModelFamily = LLADA_MOE) -> list[TensorSpec]:
    """Every tensor of a checkpoint of ``family`` with these dims, under the Hub's names and in the Hub's order
    (for LLaDA-MoE, per layer: attention, router, experts 0..E-1 each gate/up/down, the two layer norms),
    planned from the family's own model built on the meta device (no memory)."""
    raw = hub_config_dict(family, **dims, tie_word_embeddings=tie_word_embeddings)
    config = family.config_from_checkpoint(raw)
    with torch.device("meta"):
        model = family.model_class(config)
    return [TensorSpec(name, dtype, shape) for name, shape in hub_tensor_shapes(model)]


class PlannedTensor(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str


def full_size_plan(preset: str = "llada-moe-7b", **overrides) -> list[PlannedTensor]:
    """Every tensor the preset's snapshot holds and the shard it goes to; nothing is allocated."""
    p = get_preset(preset, **overrides)
    shards = plan_shards(hub_tensor_specs(p.dims, p.dtype, family=FAMILIES[p.family]), p.max_shard_bytes)
    return [PlannedTensor(s.name, s.dtype, s.shape, shard) for shard, group in shards for s in group]


def _random_tensor(spec: TensorSpec, seed: int, initializer_range: float) -> Iterator[torch.Tensor]:
    """The tensor ``spec`` names, in fp32 chunks of at most CHUNK_ELEMENTS cast to its dtype: normal with the
    initializer range, routers wider, norms uniform around 1 (as build_tiny_model). Seeded by the seed and
    the tensor's name, so each tensor is reproducible on its own, whatever the order or sharding."""
    digest = hashlib.blake2b(f"{seed}:{spec.name}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
    remaining = spec.numel
    while remaining:
        n = min(remaining, CHUNK_ELEMENTS)
        chunk = torch.empty(n, dtype=torch.float32)
        if spec.name.endswith("norm.weight"):
            chunk.uniform_(*NORM_RANGE, generator=generator)
        else:
            std = ROUTER_STD if spec.name.endswith(".mlp.gate.weight") else initializer_range
            chunk.normal_(0.0, std, generator=generator)
        yield chunk.to(spec.dtype)
        remaining -= n


def preset_total_bytes(preset: str = "llada-moe-7b", **overrides) -> int:
    return sum(TensorSpec(t.name, t.dtype, t.shape).nbytes for t in full_size_plan(preset, **overrides))


def create_preset(out: str | Path, preset: str = "llada-moe-7b", seed: int = 0, force: bool = False,
                  on_bytes: Callable[[int], None] | None = None, **_overrides) -> Path:
    """Write a random-weight snapshot of a real model's shapes, laid out like its Hub snapshot, one tensor
    at a time (memory stays at one chunk of one tensor). ``on_bytes(n)`` reports tensor bytes as written.
    ``_overrides`` (tests only) shrink the preset, e.g. ``dims=TINY_DIMS, eos_token_id=300, ...``."""
    p = get_preset(preset, **_overrides)
    family = FAMILIES[p.family]
    specs = hub_tensor_specs(p.dims, p.dtype, family=family)
    with atomic_directory(out, force=force) as tmp:
        config = hub_config_dict(family, **p.dims, eos_token_id=p.eos_token_id, pad_token_id=p.eos_token_id)
        config["initializer_range"] = p.initializer_range
        config["torch_dtype"] = str(p.dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
        write_padded_byte_tokenizer(tmp, p.dims["vocab_size"], p.eos_token_id, p.mask_token_id)
        write_chat_template(tmp, family.chat_template())
        write_json(tmp / "generation_config.json", {"eos_token_id": p.eos_token_id, "pad_token_id": p.eos_token_id})
        write_streaming_sharded(tmp, specs, p.max_shard_bytes,
                                lambda spec: _random_tensor(spec, seed, p.initializer_range), on_bytes=on_bytes)
    return Path(out).expanduser().resolve()
