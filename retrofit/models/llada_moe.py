"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*): a native implementation with a swappable router.

Architecture (docs/algorithms.md §1): bidirectional transformer, RMSNorm computed in fp32, rotate-half rotary
embeddings over the full head, per-head QK RMSNorm before the rotation, every layer a SwiGLU MoE with no
shared expert. The router is ``mlp.gate`` (a :class:`retrofit.routers.Router` carrying the checkpoint's
``[E, d]`` gate weight), so swapping TC for EC or block routing replaces one module per layer and no tensor.

Experts are stored stacked (:mod:`retrofit.models.moe`); a registered transformers conversion maps them to and
from the Hub's per-expert names for ``from_pretrained``/``save_pretrained``. :data:`LLADA_MOE` is the family
(:mod:`retrofit.models.family`) through which the rest of retrofit reaches this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from retrofit.errors import RetrofitError
from retrofit.models.family import ModelFamily, family_of
from retrofit.models.layers import RMSNorm, RotaryEmbedding, rotate_half
from retrofit.models.moe import SparseMoeBlock
from retrofit.models.kv_cache import BlockCache
from retrofit.models.native import Backbone, MaskedDiffusionLM, StreamedParts, init_weights
from retrofit.routers import RouterSettings, RoutingContext, router_settings

MODEL_TYPE = "llada_moe"
HUB_ARCHITECTURES = ("LLaDAMoEModelLM", "LLaDAMoEModel")
DEFAULT_MASK_TOKEN_ID = 156895  # <|mask|>; the Hub config.json does not carry it

# Fields of the public config.json that the reference modeling code reads but does not act on; they are kept
# so a saved config stays complete, and documented here so nobody mistakes them for live settings.
IGNORED_BY_REFERENCE = (
    "norm_topk_prob",  # the reference block hard-codes norm_topk_prob = False
    "routed_scaling_factor",
    "router_num_group",
    "router_topk_group",
    "dense_intermediate_size",  # only used by dense layers, which moe_layer_freq never asks for
    "output_router_logits",
    "router_aux_loss_coef",
    "use_cache",
)
# Other MoE families' names for settings that change the forward pass (shared experts, dense first layers,
# grouped or biased routing, sliding windows): refused by name when set, never silently ignored.
_CHANGES_COMPUTATION = {
    "num_shared_experts", "n_shared_experts", "shared_expert_intermediate_size", "first_k_dense_replace",
    "n_group", "topk_group", "num_expert_group", "topk_method", "scoring_func", "score_function",
    "score_func", "use_expert_bias", "expert_bias", "sliding_window", "use_sliding_window",
}


class LLaDAMoEConfig(PretrainedConfig):
    """Configuration of LLaDA-MoE; reads the Hub's config.json (``model_type: "llada"``) unchanged."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        rope_theta: float = 50000.0,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        partial_rotary_factor: float = 1.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        clip_qkv: float | None = None,
        qk_layernorm: bool = True,
        num_experts: int = 64,
        num_experts_per_tok: int = 8,
        expert_intermediate_size: int = 1024,
        dense_intermediate_size: int | None = None,
        shared_expert_intermediate_size: int | None = None,
        moe_layer_freq: list[int] | None = None,
        moe_router_score_function: str = "softmax",
        moe_router_enable_expert_bias: bool | None = False,
        norm_topk_prob: bool | None = None,
        routed_scaling_factor: float | None = 1,
        router_num_group: int | None = None,
        router_topk_group: int | None = None,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.01,
        pad_token_id: int | None = 156892,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 156892,
        mask_token_id: int = DEFAULT_MASK_TOKEN_ID,
        router: dict | RouterSettings | None = None,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        # transformers 5 keeps rotary settings in `rope_parameters` (`rope_scaling` is its deprecated alias);
        # the Hub config has `rope_theta` + `rope_scaling: null`. Only plain (default) rotary is supported.
        rope = dict(rope_parameters or rope_scaling or {})
        self._rope_type = rope.get("rope_type", rope.get("type", "default"))
        self.rope_theta = rope.get("rope_theta", rope_theta)
        self.partial_rotary_factor = rope.get("partial_rotary_factor", partial_rotary_factor)
        self.rope_parameters = {"rope_type": self._rope_type, "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.clip_qkv = clip_qkv
        self.qk_layernorm = qk_layernorm
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.dense_intermediate_size = dense_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.moe_layer_freq = list(moe_layer_freq) if moe_layer_freq is not None else [1] * num_hidden_layers
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.router_num_group = router_num_group
        self.router_topk_group = router_topk_group
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.mask_token_id = mask_token_id
        # config.json files of earlier retrofit versions hold every router's fields: read them leniently.
        settings = router if isinstance(router, RouterSettings) else router_settings(router or {}, stored=True)
        self.router = settings.model_dump()
        self._refuse_unsupported()  # before transformers validates rope parameters with its own error
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def router_settings(self) -> RouterSettings:
        return router_settings(self.router)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _refuse_unsupported(self) -> None:
        """Settings the reference code acts on but this implementation does not: refuse, naming each."""
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if self._rope_type != "default":
            problems.append(f"rope_scaling type {self._rope_type!r} (only plain rotary)")
        if self.partial_rotary_factor not in (None, 1, 1.0):
            problems.append(f"partial_rotary_factor={self.partial_rotary_factor} (only 1.0)")
        if self.shared_expert_intermediate_size:
            problems.append(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} (no shared expert)")
        if any(f != 1 for f in self.moe_layer_freq) or len(self.moe_layer_freq) != self.num_hidden_layers:
            problems.append(f"moe_layer_freq={self.moe_layer_freq} (every layer must be MoE)")
        if self.moe_router_score_function not in (None, "softmax"):
            problems.append(f"moe_router_score_function={self.moe_router_score_function!r} (only 'softmax')")
        if self.moe_router_enable_expert_bias:
            problems.append("moe_router_enable_expert_bias=true (no expert bias)")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            problems.append("hidden_size/num_attention_heads/num_key_value_heads do not divide evenly")
        if problems:
            raise RetrofitError("unsupported LLaDA-MoE config: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Bidirectional multi-head attention; the 2-D attention mask only hides padding keys."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.clip_qkv = config.clip_qkv
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_layernorm:
            # One weight of size head_dim shared by all heads, applied per head before the rotation.
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], key_bias: torch.Tensor | None,
                cache: BlockCache | None = None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.attend(self, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_bias, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, key_bias, ctx: RoutingContext, cache: BlockCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rope, key_bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


# ----------------------------------------------------------------------------------------------- model


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)


class LLaDAMoEModel(Backbone, LLaDAMoEPreTrainedModel):
    """Embeddings + decoder layers + final norm: hidden states out."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        # As the reference: the padding token's row gets no gradient (full-parameter training).
        pad = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         padding_idx=pad if pad is not None and 0 <= pad < config.vocab_size else None)
        self.layers = nn.ModuleList(DecoderLayer(config, self.build_mlp(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def build_mlp(self, config: LLaDAMoEConfig, layer: int) -> nn.Module:
        """Layer ``layer``'s feed-forward block: every LLaDA-MoE layer is a MoE with the configured router
        (a family with dense or shared-expert layers overrides this)."""
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.expert_intermediate_size, config.router_settings,
                              family_of(config).scoring(config))


class LLaDAMoEModelLM(MaskedDiffusionLM, LLaDAMoEPreTrainedModel):
    """The full masked-diffusion LM: ``logits[B, L, V]`` for every position (no shift: it is not causal)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    backbone_class = LLaDAMoEModel  # a family that changes only some layers subclasses both

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def streamed_parts(self) -> StreamedParts:
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self.layer_stream("model.embed_tokens.weight", head)


# ---------------------------------------------------------------------------------------------- family


def _expert_stacking():
    """Checkpoints name each expert's weights separately; the model stacks them. transformers applies this
    conversion on ``from_pretrained`` and reverses it on ``save_pretrained``, so saved files keep Hub names."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    return [
        WeightConverter(
            source_patterns=f"mlp.experts.*.{proj}.weight",
            target_patterns=f"mlp.experts.{proj}",
            operations=[MergeModulelist(dim=0)],
        )
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]


class LLaDAMoEFamily(ModelFamily):
    """inclusionAI's LLaDA-MoE: softmax top-k routing in every layer, no shared expert."""

    name = "llada-moe"
    display_name = "LLaDA-MoE"
    model_type = MODEL_TYPE
    architecture = "LLaDAMoEModelLM"
    config_class = LLaDAMoEConfig
    model_class = LLaDAMoEModelLM
    count_fields = ("expert_intermediate_size", "dense_intermediate_size")
    hub_models = {
        "llada-moe": "inclusionAI/LLaDA-MoE-7B-A1B-Base",
        "llada-moe-instruct": "inclusionAI/LLaDA-MoE-7B-A1B-Instruct",
    }

    def recognises(self, raw: dict) -> bool:
        """By architecture, never by ``model_type`` alone: the Hub's MoE config says ``model_type: "llada"``,
        the same string as the dense LLaDA-8B."""
        if raw.get("model_type") == MODEL_TYPE:
            return True
        return any(a in HUB_ARCHITECTURES for a in raw.get("architectures") or []) and "num_experts" in raw

    def config_from_checkpoint(self, raw: dict) -> LLaDAMoEConfig:
        if not self.recognises(raw):
            arch = raw.get("architectures") or raw.get("model_type")
            raise RetrofitError(f"not a LLaDA-MoE checkpoint (architectures/model_type: {arch})")
        return super().config_from_checkpoint(raw)

    def refuse(self, raw: dict, unknown: list[str]) -> None:
        # A real config.json may carry keys no public port names (export leftovers). Settings retrofit knows but
        # does not implement are refused by name (the config's _refuse_unsupported, and other MoE families'
        # names for such settings here); any other unknown key is kept and named.
        changing = [k for k in unknown if k in _CHANGES_COMPUTATION and raw[k] not in (None, 0, False, [], {})]
        if changing:
            raise RetrofitError(f"unsupported field(s) in config.json: "
                                f"{', '.join(f'{k}={raw[k]!r}' for k in changing)}; they change the computation "
                                "and retrofit's LLaDA-MoE does not implement them")

    def tiny_dims(self, hidden_size=64, layers=2, heads=4, experts=8, top_k=2, expert_size=32) -> dict[str, Any]:
        return dict(vocab_size=320, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=heads, num_experts=experts, num_experts_per_tok=top_k,
                    expert_intermediate_size=expert_size, max_position_embeddings=1024)

    def hub_config(self, config: LLaDAMoEConfig) -> dict[str, Any]:
        """The public config.json of inclusionAI/LLaDA-MoE-7B-A1B-Base, with ``config``'s values (the Hub's
        has no ``mask_token_id``: the mask token's id comes from tokenizer.json)."""
        c = config
        return {
            "architectures": ["LLaDAMoEModelLM"],
            "auto_map": {
                "AutoConfig": "configuration_lladamoe.LLaDAConfig",
                "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
            },
            "model_type": "llada",
            "attention_bias": c.attention_bias,
            "attention_dropout": c.attention_dropout,
            "clip_qkv": c.clip_qkv,
            "dense_intermediate_size": c.dense_intermediate_size or 4 * c.hidden_size,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
            "hidden_act": c.hidden_act,
            "initializer_range": c.initializer_range,
            "moe_layer_freq": list(c.moe_layer_freq),
            "moe_router_enable_expert_bias": bool(c.moe_router_enable_expert_bias),
            "moe_router_score_function": c.moe_router_score_function,
            "norm_topk_prob": bool(c.norm_topk_prob),
            "output_router_logits": c.output_router_logits,
            "partial_rotary_factor": c.partial_rotary_factor,
            "qk_layernorm": c.qk_layernorm,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": c.rope_theta,
            "routed_scaling_factor": c.routed_scaling_factor,
            "router_aux_loss_coef": c.router_aux_loss_coef,
            "router_num_group": c.router_num_group,
            "router_topk_group": c.router_topk_group,
            "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
            "tie_word_embeddings": c.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.52.3",
            "use_cache": c.use_cache,
            **{k: getattr(c, k) for k in _DIMS},
        }

    def register_with_transformers(self) -> None:
        """Make ``transformers.Auto*`` know this model type once ``import retrofit`` has run."""
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping

        AutoConfig.register(MODEL_TYPE, LLaDAMoEConfig, exist_ok=True)
        AutoModel.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)
        AutoModelForMaskedLM.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)
        register_checkpoint_conversion_mapping(MODEL_TYPE, _expert_stacking(), overwrite=True)


# The shape fields (retrofit.tiny's dims).
_DIMS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "num_experts", "num_experts_per_tok", "expert_intermediate_size", "max_position_embeddings")

LLADA_MOE = LLaDAMoEFamily()
