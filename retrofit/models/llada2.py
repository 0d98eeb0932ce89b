"""LLaDA2.0 (inclusionAI/LLaDA2.0-mini, -flash; FSCCS/dMoE-16B): a native implementation with a swappable router.

Established from the public reference code (read, not copied; docs/llada2-reference-notes.md has the facts with
file and line references): dMoE's ``evaluations/models/modeling_llada2_moe.py`` (fscdc/dMoE @ a5b7679), the Hub
modeling file as copied in ZHZisZZ/dllm @ d8cc119 (``dllm/pipelines/llada2/models/modeling_llada2_moe.py``),
and inclusionAI/dInfer's ``python/dinfer/model/modeling_llada2_moe.py`` @ fce4e32. What differs from LLaDA-MoE:

- attention: one fused ``query_key_value`` projection (Q rows, then K, then V) and an output ``dense``;
  grouped-query attention (KV head j serves query heads j·g … j·g+g−1); per-head QK RMSNorm
  (``query_layernorm``/``key_layernorm``, one weight of ``head_dim`` shared by the heads) before the rotation;
  partial rotary: the first ``head_dim · partial_rotary_factor`` dims of each head rotate (rotate-half inside
  them), the rest pass through;
- the first ``first_k_dense_replace`` layers are a dense SwiGLU; the others a MoE with ``num_shared_experts``
  always-on shared experts (one SwiGLU of ``moe_intermediate_size · num_shared_experts``);
- routing (:class:`GroupLimitedSigmoid`): the gate runs in fp32, scores are sigmoids, a learned ``expert_bias``
  is added for *selection* only; experts are chosen group-limited (``n_group`` groups, group score = the sum of
  its two best biased scores, the best ``topk_group`` groups kept, then the top-k), gates are the unbiased
  scores renormalised over the k and times ``routed_scaling_factor``; a token's k outputs are summed in fp32;
- attention at sampling time is block-causal (``attention_blocks``: blocks counted from position 0, each sees
  itself and every earlier block), the mask LLaDA2.0 is trained and sampled with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from retrofit.errors import RetrofitError
from retrofit.models.family import ModelFamily, family_of
from retrofit.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, rotate_half
from retrofit.models.moe import SparseMoeBlock
from retrofit.models.kv_cache import BlockCache
from retrofit.models.native import Backbone, MaskedDiffusionLM, StreamedParts, init_weights
from retrofit.routers import RouterSettings, RoutingContext, Scoring, router_settings

MODEL_TYPE = "llada2_moe"
HUB_MODEL_TYPES = (MODEL_TYPE, "llada2_moe_veomni")  # the second is what dFactory/dMoE training writes
HUB_ARCHITECTURES = ("LLaDA2MoeModelLM", "LLaDA2MoeModel")
MASK_TOKEN_ID, EOS_TOKEN_ID = 156895, 156892  # not in config.json; the reference generate()'s defaults
# dMoE-16B's block router as it was trained (dMoE training/models/llada2_moe/modeling_llada2_moe.py: 32-token
# router blocks, guard 12; configuration: core_threshold 0.6); its evaluation code at HEAD uses guard 16.
DMOE_ROUTER = {"type": "block", "block_length": 32, "core_threshold": 0.6, "guard_size": 12}

# Fields of the public config.json the reference modeling code does not act on (it hard-codes what they say).
IGNORED_BY_REFERENCE = ("score_function", "router_dtype", "moe_router_enable_expert_bias", "norm_topk_prob",
                        "rotary_dim", "max_window_layers", "norm_head", "norm_softmax", "use_rmsnorm",
                        "embedding_dropout", "output_dropout", "output_router_logits", "use_cache")


class LLaDA2Config(PretrainedConfig):
    """Configuration of LLaDA2.0; the defaults are LLaDA2.0-mini's (16,255,638,528 parameters)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        intermediate_size: int = 5120,
        moe_intermediate_size: int = 512,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        first_k_dense_replace: int = 1,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 600000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 16384,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        use_qk_norm: bool = True,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        score_function: str = "sigmoid",
        router_dtype: str = "fp32",
        moe_router_enable_expert_bias: bool = True,
        norm_topk_prob: bool = True,
        rotary_dim: int | None = None,
        max_window_layers: int | None = None,
        norm_head: bool = False,
        norm_softmax: bool = False,
        use_rmsnorm: bool = True,
        embedding_dropout: float = 0.0,
        output_dropout: float = 0.0,
        output_router_logits: bool = False,
        use_cache: bool = False,
        core_threshold: float | None = None,
        mode: str | None = None,
        core_size: int | None = None,
        pad_token_id: int | None = EOS_TOKEN_ID,
        eos_token_id: int | None = EOS_TOKEN_ID,
        mask_token_id: int = MASK_TOKEN_ID,
        router: dict | RouterSettings | None = None,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        # transformers 5 keeps rotary settings in `rope_parameters`; the Hub config has `rope_scaling: null`.
        self._rope_scaling = rope_scaling
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta,
                                "partial_rotary_factor": partial_rotary_factor}
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.use_qk_norm = use_qk_norm
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.score_function = score_function
        self.router_dtype = router_dtype
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.norm_topk_prob = norm_topk_prob
        self.rotary_dim = rotary_dim
        self.max_window_layers = max_window_layers
        self.norm_head = norm_head
        self.norm_softmax = norm_softmax
        self.use_rmsnorm = use_rmsnorm
        self.embedding_dropout = embedding_dropout
        self.output_dropout = output_dropout
        self.output_router_logits = output_router_logits
        self.use_cache = use_cache
        # dMoE's config fields (its block router's top-p and vote mode; core_size is read by no code): a checkpoint
        # that carries them and no router section routes with dMoE's block router.
        self.core_threshold, self.mode, self.core_size = core_threshold, mode, core_size
        if router is None and core_threshold is not None:
            router = {**DMOE_ROUTER, "core_threshold": core_threshold}
        self.mask_token_id = mask_token_id
        settings = router if isinstance(router, RouterSettings) else router_settings(router or {}, stored=True)
        self.router = settings.model_dump()
        self._refuse_unsupported()
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def router_settings(self) -> RouterSettings:
        return router_settings(self.router)

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def _refuse_unsupported(self) -> None:
        """What the reference acts on (or what would change the computation) but this implementation does not."""
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if self._rope_scaling:
            problems.append(f"rope_scaling={self._rope_scaling} (only plain rotary)")
        if self.use_qkv_bias or self.use_bias:
            problems.append("use_qkv_bias/use_bias (no biases)")
        if self.use_sliding_window:
            problems.append("use_sliding_window=true (no sliding window)")
        if self.score_function not in (None, "sigmoid"):
            problems.append(f"score_function={self.score_function!r} (only 'sigmoid')")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            problems.append(f"n_group={self.n_group}/topk_group={self.topk_group} do not fit "
                            f"{self.num_experts} experts")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads is not a multiple of num_key_value_heads")
        if self.rotary_dims % 2:
            problems.append(f"head_dim·partial_rotary_factor = {self.rotary_dims} (must be even)")
        if problems:
            raise RetrofitError("unsupported LLaDA2.0 config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- routing


class GroupLimitedSigmoid(Scoring):
    """LLaDA2.0's own scoring (reference ``LLaDA2MoeGate``): fp32 gate, sigmoid scores, selection by the scores
    plus ``expert_bias`` limited to the best ``topk_group`` of ``n_group`` expert groups (a group's score is the
    sum of its two best biased scores), gates the *unbiased* scores of the k chosen, renormalised (+1e-20) and
    times ``routed_scaling_factor``."""

    name = "sigmoid-group-limited"
    logits_dtype = torch.float32
    uses_expert_bias = True
    renormalizes = True

    def __init__(self, n_group: int, topk_group: int, routed_scaling_factor: float):
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group, topk_group, routed_scaling_factor

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))

    def top_k(self, scores, k, bias=None, allowed=None):
        experts = self.choose(scores, k, bias, allowed)
        gates = scores.gather(-1, experts)
        if k > 1:
            gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        return gates * self.routed_scaling_factor, experts

    def gate_scale(self, scores, k, bias=None):
        """routed_scaling_factor over the sum of the scores of the token's own (group-limited) top-k (with one
        expert per token the reference does not renormalise: the factor alone)."""
        if k == 1:
            return torch.full_like(scores[..., :1], self.routed_scaling_factor)
        total = scores.gather(-1, self.choose(scores, k, bias)).sum(-1, keepdim=True)
        return self.routed_scaling_factor / (total + 1e-20)

    def choose(self, scores, k, bias=None, allowed=None) -> torch.Tensor:
        """The token's own k experts: the best biased scores among ``allowed`` experts, group-limited."""
        selection = self.selection(scores, bias)
        if allowed is not None:
            selection = selection.masked_fill(~allowed, float("-inf"))
        return self.limit_to_groups(selection).topk(k, dim=-1).indices

    def limit_to_groups(self, selection: torch.Tensor) -> torch.Tensor:
        """``selection`` with every expert outside its token's best ``topk_group`` groups set to −inf."""
        grouped = selection.unflatten(-1, (self.n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, kept, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)

    def __repr__(self) -> str:
        return (f"{self.name}(groups {self.topk_group}/{self.n_group}, scale {self.routed_scaling_factor})")


# ----------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Fused QKV, per-head QK norm, partial rotary, grouped-query attention; the additive mask decides what a
    query sees (padding keys, and the block-causal structure when asked for)."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rotary_dims = config.head_dim, config.rotary_dims
        self.dropout = config.attention_dropout
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=False)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        turned, kept = t[..., :self.rotary_dims], t[..., self.rotary_dims:]
        return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], attn_bias: torch.Tensor | None,
                cache: BlockCache | None = None):
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = rope
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.attend(self, k, v)
        # KV heads repeated as the reference does (each serves a contiguous run of query heads).
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class SharedExpertMoe(SparseMoeBlock):
    """Routed experts (combined in fp32 over the k slots, as the reference) plus the always-on shared experts."""

    def __init__(self, config: LLaDA2Config, settings: RouterSettings, scoring: Scoring):
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, settings, scoring, slot_sum_fp32=True)
        self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        return super().forward(x, ctx) + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2Config, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, rope, attn_bias, ctx: RoutingContext, cache: BlockCache | None = None):
        x = x + self.attention(self.input_layernorm(x), rope, attn_bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


# ------------------------------------------------------------------------------------------------ model


class LLaDA2PreTrainedModel(PreTrainedModel):
    config_class = LLaDA2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)


class LLaDA2Model(Backbone, LLaDA2PreTrainedModel):
    embedding_name = "word_embeddings"
    focus_on_maskable = True  # the sampler names the block it denoises: statistics count its experts (dMoE's)

    def __init__(self, config: LLaDA2Config):
        super().__init__(config)
        pad = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad
                                            if pad is not None and 0 <= pad < config.vocab_size else None)
        self.layers = nn.ModuleList(DecoderLayer(config, self.build_mlp(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dims, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def build_mlp(self, config: LLaDA2Config, layer: int) -> nn.Module:
        if layer < config.first_k_dense_replace:
            return SwiGLU(config.hidden_size, config.intermediate_size)
        return SharedExpertMoe(config, config.router_settings, family_of(config).scoring(config))


class LLaDA2ModelLM(MaskedDiffusionLM, LLaDA2PreTrainedModel):
    """The masked-diffusion LM: ``logits[B, L, V]`` (no shift). ``attention_blocks``: block-causal attention
    with blocks of that many positions from position 0 (how LLaDA2.0 samples); None: bidirectional."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: LLaDA2Config):
        super().__init__(config)
        self.model = LLaDA2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def streamed_parts(self) -> StreamedParts:
        head = "model.word_embeddings.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self.layer_stream("model.word_embeddings.weight", head)


# ---------------------------------------------------------------------------------------------- family


class LLaDA2Family(ModelFamily):
    """inclusionAI's LLaDA2.0 MoE (and dMoE's fine-tune of it): grouped sigmoid routing with an expert bias,
    a shared expert, a dense first layer, block-diffusion sampling."""

    name = "llada2"
    display_name = "LLaDA2.0"
    model_type = MODEL_TYPE
    architecture = "LLaDA2MoeModelLM"
    config_class = LLaDA2Config
    model_class = LLaDA2ModelLM
    count_fields = ("intermediate_size", "moe_intermediate_size", "head_dim", "n_group", "topk_group",
                    "num_shared_experts", "first_k_dense_replace")
    zero_allowed = ("num_shared_experts", "first_k_dense_replace")
    hub_models = {
        "llada2-mini": "inclusionAI/LLaDA2.0-mini",
        "llada2-mini-preview": "inclusionAI/LLaDA2.0-mini-preview",
        "llada2-flash": "inclusionAI/LLaDA2.0-flash",
        "dmoe-16b": "FSCCS/dMoE-16B",
        # LLaDA2.1: the same model_type, architecture and config fields as LLaDA2.0 (2.1-mini's config.json on the
        # Hub; -flash's from a third-party read of it) and the same MoE/attention code; a new sampler.
        "llada2.1-mini": "inclusionAI/LLaDA2.1-mini",
        "llada2.1-flash": "inclusionAI/LLaDA2.1-flash",
    }
    sampler = "llada2"
    alternative_samplers = ("llada2.1",)
    hub_samplers = {"llada2.1-mini": "llada2.1", "llada2.1-flash": "llada2.1"}
    training_block = 32  # its SFT: noisy and clean copies side by side, 32-token blocks (dFactory, dMoE)
    hub_routers = {"dmoe-16b": DMOE_ROUTER}

    def recognises(self, raw: dict) -> bool:
        return raw.get("model_type") in HUB_MODEL_TYPES or any(
            a in HUB_ARCHITECTURES for a in raw.get("architectures") or [])

    def moe_layers(self, config: LLaDA2Config) -> list[int]:
        return list(range(config.first_k_dense_replace, config.num_hidden_layers))

    def scoring(self, config: LLaDA2Config) -> Scoring:
        return GroupLimitedSigmoid(config.n_group, config.topk_group, config.routed_scaling_factor)

    def tiny_dims(self, hidden_size=64, layers=3, heads=4, experts=16, top_k=4, expert_size=24) -> dict[str, Any]:
        """LLaDA2.0-mini's structure in small: grouped-query attention (half as many KV heads), a dense first
        layer, one shared expert, four expert groups of which two are kept (one group if experts don't split)."""
        groups = 4 if experts % 4 == 0 and experts // 4 >= 2 else 1
        return dict(vocab_size=320, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 2), head_dim=hidden_size // heads,
                    intermediate_size=hidden_size * 3 // 2, moe_intermediate_size=expert_size, num_experts=experts,
                    num_experts_per_tok=top_k, num_shared_experts=1, n_group=groups, topk_group=max(1, groups // 2),
                    first_k_dense_replace=1, max_position_embeddings=1024)

    def hub_config(self, config: LLaDA2Config) -> dict[str, Any]:
        """The public config.json of LLaDA2.0-mini (as dMoE's copy has it) with ``config``'s values; like the
        Hub's, it has no mask token id."""
        fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                  "num_shared_experts", "n_group", "topk_group", "routed_scaling_factor", "score_function",
                  "router_dtype", "moe_router_enable_expert_bias", "norm_topk_prob", "first_k_dense_replace",
                  "use_qkv_bias", "use_bias", "partial_rotary_factor", "rotary_dim", "rope_theta",
                  "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
                  "pad_token_id", "eos_token_id", "attention_dropout", "embedding_dropout", "output_dropout",
                  "norm_head", "norm_softmax", "use_sliding_window", "use_rmsnorm", "max_window_layers",
                  "output_router_logits", "initializer_range", "use_cache")
        values = {k: getattr(config, k) for k in fields}
        values["rotary_dim"] = config.rotary_dims
        values["rope_scaling"] = None
        return {
            "architectures": ["LLaDA2MoeModelLM"],
            "auto_map": {
                "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
            },
            "model_type": MODEL_TYPE,
            "torch_dtype": "bfloat16",
            **values,
        }

    def register_with_transformers(self) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

        AutoConfig.register(MODEL_TYPE, LLaDA2Config, exist_ok=True)
        AutoModel.register(LLaDA2Config, LLaDA2ModelLM, exist_ok=True)
        AutoModelForMaskedLM.register(LLaDA2Config, LLaDA2ModelLM, exist_ok=True)


LLADA2 = LLaDA2Family()
