"""Tiny random LLaDA-MoE models of the real architecture, for tests, benchmarks and `retrofit create-tiny`.

``write_hub_snapshot`` lays a model out exactly like the Hub snapshot of inclusionAI/LLaDA-MoE-7B-A1B-Base:
a config.json with the Hub's ``model_type: "llada"``/``architectures``/``auto_map`` and every public field,
bf16 safetensors shards with per-expert tensor names plus their index, and tokenizer files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from retrofit.io.tokenizer_files import EOS_TOKEN, MASK_TOKEN, train_bpe_tokenizer, write_byte_tokenizer
from retrofit.io.writer import atomic_directory, write_json, write_sharded
from retrofit.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM, hub_state_dict

# Small enough for a CPU test in milliseconds; 8 experts, top-2 as the issue asks.
TINY_DIMS = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    expert_intermediate_size=32,
    max_position_embeddings=1024,
)
TINY_EOS_ID, TINY_MASK_ID = 256, 257  # the byte tokenizer's special tokens


def hub_config_dict(**dims) -> dict:
    """A config.json shaped like the public LLaDA-MoE one (which has no ``mask_token_id``)."""
    d = {**TINY_DIMS, **dims}
    return {
        "architectures": ["LLaDAMoEModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
            "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
            "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
        },
        "model_type": "llada",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "dense_intermediate_size": 4 * d["hidden_size"],
        "eos_token_id": d.pop("eos_token_id", TINY_EOS_ID),
        "pad_token_id": d.pop("pad_token_id", TINY_EOS_ID),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "moe_layer_freq": [1] * d["num_hidden_layers"],
        "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax",
        "norm_topk_prob": False,
        "output_router_logits": False,
        "partial_rotary_factor": 1.0,
        "qk_layernorm": True,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 50000.0,
        "routed_scaling_factor": 1,
        "router_aux_loss_coef": 0.01,
        "router_num_group": None,
        "router_topk_group": None,
        "shared_expert_intermediate_size": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.3",
        "use_cache": False,
        **d,
    }


def build_tiny_model(seed: int = 0, router=None, mask_token_id: int = TINY_MASK_ID, **dims) -> LLaDAMoEModelLM:
    """A randomly initialised tiny model (fp32). Gate weights get a larger scale than the default init so
    that routing is far from uniform, as in a trained checkpoint."""
    raw = hub_config_dict(**dims)
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type", "torch_dtype",
                                                        "transformers_version")}
    config = LLaDAMoEConfig(**fields, mask_token_id=mask_token_id, router=router)
    torch.manual_seed(seed)
    model = LLaDAMoEModelLM(config)
    with torch.no_grad():
        for block in model.moe_blocks():
            block.gate.weight.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # perturb norms so a wrong norm placement shows up in parity
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_hub_snapshot(model: LLaDAMoEModelLM, out: str | Path, max_shard_bytes: int = 96 * 1024,
                       dtype: torch.dtype = torch.bfloat16, force: bool = False,
                       write_tokenizer: Callable[[Path], dict[str, int]] = write_byte_tokenizer) -> Path:
    """Write ``model`` as a Hub-style snapshot directory (atomically); ``write_tokenizer`` writes the
    tokenizer files and returns its special ids, which must be the ones the model was built with."""
    cfg = model.config
    dims = {k: getattr(cfg, k) for k in TINY_DIMS}
    tensors = {k: v.detach().to(dtype) for k, v in hub_state_dict(model).items()}
    with atomic_directory(out, force=force) as tmp:
        config = hub_config_dict(**dims, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        write_json(tmp / "config.json", config)
        write_sharded(tmp, tensors, max_shard_bytes)
        ids = write_tokenizer(tmp)
        if ids != {EOS_TOKEN: cfg.eos_token_id, MASK_TOKEN: cfg.mask_token_id}:
            raise ValueError(f"tokenizer special ids {ids} differ from the model's (eos {cfg.eos_token_id}, "
                             f"mask {cfg.mask_token_id})")
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
