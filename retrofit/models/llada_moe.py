"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*): a native implementation with a swappable router.

Architecture (algorithms.md §1): bidirectional transformer, RMSNorm computed in fp32, rotate-half rotary
embeddings over the full head, per-head QK RMSNorm before the rotation, every layer a SwiGLU MoE with no
shared expert. The router is ``mlp.gate`` (a :class:`retrofit.routers.Router` carrying the checkpoint's
``[E, d]`` gate weight), so swapping TC for EC or block routing replaces one module per layer and no tensor.

Experts are stored stacked (``mlp.experts.{gate,up}_proj`` ``[E, f, d]``, ``down_proj`` ``[E, d, f]``) so
expert choice runs every expert as one batched matmul; :func:`stack_expert_tensors` and
:func:`unstack_expert_tensors` map to and from the Hub's per-expert names, and a registered transformers
conversion does the same for ``from_pretrained``/``save_pretrained``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput

from retrofit.errors import RetrofitError, warn
from retrofit.routers import Router, RouterSettings, RoutingContext, RoutingStats, build_router

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
_META_FIELDS = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                "_name_or_path"}


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
        settings = router if isinstance(router, RouterSettings) else RouterSettings.model_validate(router or {})
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
        return RouterSettings.model_validate(self.router)

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


def known_config_fields() -> set[str]:
    import inspect

    params = set(inspect.signature(LLaDAMoEConfig.__init__).parameters) - {"self", "kwargs"}
    return params | set(PretrainedConfig().to_dict()) | _META_FIELDS


def is_llada_moe_config(raw: dict) -> bool:
    """Recognise the checkpoint by architecture, never by ``model_type`` alone: the Hub's MoE config says
    ``model_type: "llada"``, the same string as the dense LLaDA-8B."""
    if raw.get("model_type") == MODEL_TYPE:
        return True
    return any(a in HUB_ARCHITECTURES for a in raw.get("architectures") or []) and "num_experts" in raw


def config_from_checkpoint(raw: dict) -> LLaDAMoEConfig:
    """Build the config from a checkpoint's raw config.json, refusing fields this implementation doesn't know."""
    if not is_llada_moe_config(raw):
        arch = raw.get("architectures") or raw.get("model_type")
        raise RetrofitError(f"not a LLaDA-MoE checkpoint (architectures/model_type: {arch}); "
                            "retrofit supports LLaDA-MoE models only")
    # A real config.json may carry keys no public port names (export leftovers). Settings retrofit knows but
    # does not implement are refused by name (_refuse_unsupported, and the other MoE families' names for such
    # settings below); any other unknown key is kept and named.
    unknown = sorted(set(raw) - known_config_fields())
    changing = [k for k in unknown if k in _CHANGES_COMPUTATION and raw[k] not in (None, 0, False, [], {})]
    if changing:
        raise RetrofitError(f"unsupported field(s) in config.json: {', '.join(f'{k}={raw[k]!r}' for k in changing)}; "
                            "they change the computation and retrofit's LLaDA-MoE does not implement them")
    if unknown:
        warn(f"config.json has field(s) retrofit's LLaDA-MoE does not use: {', '.join(unknown)}; kept as they are")
    fields = {k: v for k, v in raw.items() if k not in _META_FIELDS}
    try:
        return LLaDAMoEConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise RetrofitError(f"invalid config.json: {exc}".splitlines()[0]) from None


# --------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary tables. The frequencies and angles are always computed in fp32, whatever the weights'
    dtype, as the reference does (its ``inv_freq`` buffer stays fp32): a bf16 ``inv_freq`` rounds every
    position's angle and, over 1000 positions, moves the argmax at ~5% of them. No buffer, so neither a cast of
    the module nor a meta-device build can change or lose them."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def frequencies(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.frequencies(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], key_bias: torch.Tensor | None):
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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_bias, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class StackedExperts(nn.Module):
    """All experts of a layer as three stacked tensors; ``gate_proj[e]`` is expert e's ``[f, d]`` weight."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        """``x``: ``[T, d]`` flat tokens → ``[T, d]`` gated sum of the chosen experts' outputs."""
        if routing.layout == "expert":
            return self._expert_major(x, routing.indices, routing.gates)
        return self._token_major(x, routing.indices, routing.gates)

    def _expert_major(self, x, tokens, gates):
        # EC: every expert has the same number of tokens, so one batched matmul per projection runs them all.
        # Why not the obvious forms: index_select's backward is an index_add, cheaper than x[tokens]'s
        # accumulating index_put; the gate scales the hidden activations [E, C, f] rather than the output
        # [E, C, d] (the same product, down_proj being linear) for half the elementwise traffic.
        chosen = x.index_select(0, tokens.reshape(-1)).view(*tokens.shape, x.shape[-1])  # [E, C, d]
        hidden = F.silu(torch.bmm(chosen, self.gate_proj.transpose(1, 2))) * torch.bmm(
            chosen, self.up_proj.transpose(1, 2))
        hidden = hidden * gates.to(x.dtype).unsqueeze(-1)
        out = torch.bmm(hidden, self.down_proj.transpose(1, 2))
        # Under autocast the matmuls return bf16 while x may be fp32: accumulate in x's dtype.
        return torch.zeros_like(x).index_add_(0, tokens.reshape(-1), out.reshape(-1, x.shape[-1]).to(x.dtype))

    def _token_major(self, x, experts, gates):
        # TC/block, in the reference block's order of operations so that bf16 results are bit-identical to it:
        # experts in ascending order, each on its (token, slot) pairs ordered by slot and then token (the order
        # torch.where gives the reference's [E, k, T] expert mask), down_proj first and then the gate (cast to
        # the activations' dtype), added in place. One gather split into per-expert views, so the backward
        # builds the gradient of the gathered rows once and no [T·k, d] concatenation is allocated.
        num_tokens, k = experts.shape
        flat = experts.reshape(-1)
        slot = torch.arange(k, device=x.device).repeat(num_tokens)
        token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
        order = torch.argsort((flat * k + slot) * num_tokens + token)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token_of = token[order]
        gate_of = gates.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        out = torch.zeros_like(x)
        runs = zip(x.index_select(0, token_of).split(counts), token_of.split(counts), gate_of.split(counts))
        for e, (h, rows, gate) in enumerate(runs):
            if rows.shape[0]:
                h = F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e])
                # .to(x.dtype): under autocast the product is bf16 while x may be fp32
                out.index_add_(0, rows, (F.linear(h, self.down_proj[e]) * gate).to(x.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Router (``gate``) + stacked experts. Optionally records routing statistics of each forward."""

    def __init__(self, config: LLaDAMoEConfig, settings: RouterSettings):
        super().__init__()
        self.gate: Router = build_router(settings, config.hidden_size, config.num_experts,
                                         config.num_experts_per_tok)
        self.experts = StackedExperts(config.num_experts, config.hidden_size, config.expert_intermediate_size)
        self.stats: RoutingStats | None = None  # recording is off unless enable_routing_stats() is called
        self.keep_router_logits = False  # set for auxiliary losses (z-loss) that need the gate's logits
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        batch, length, dim = x.shape
        routing = self.gate(x, ctx)
        if self.stats is not None:
            self.stats.update(routing, ctx.valid)
        if self.keep_router_logits:
            self.router_logits = routing.logits
        return self.experts(x.reshape(-1, dim), routing).view(batch, length, dim)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, settings: RouterSettings):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = SparseMoeBlock(config, settings)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, key_bias, ctx: RoutingContext):
        x = x + self.self_attn(self.input_layernorm(x), rope, key_bias)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


# ----------------------------------------------------------------------------------------------- model


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init functions skip tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, StackedExperts):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    """Embeddings + decoder layers + final norm: hidden states out."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        settings = config.router_settings
        # As the reference: the padding token's row gets no gradient (full-parameter training).
        pad = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         padding_idx=pad if pad is not None and 0 <= pad < config.vocab_size else None)
        self.layers = nn.ModuleList(DecoderLayer(config, settings) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def routing_context(self, input_ids, attention_mask, mask_ratio, maskable=None, block_start=0) -> RoutingContext:
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask_ratio is None:
            # Observed mask ratio: masked positions / maskable positions of each sequence (algorithms.md §2).
            # A prompt is never masked, so counting it would pull r towards 0 with every prompt token.
            region = valid if maskable is None else maskable.bool() & valid
            masked = ((input_ids == self.config.mask_token_id) & region).sum(-1)
            mask_ratio = masked.float() / region.sum(-1).clamp(min=1).float()
        return RoutingContext(valid=valid, mask_ratio=mask_ratio.float(), block_start=int(block_start))

    def prepare(self, input_ids, attention_mask=None, mask_ratio=None, embeds=None, maskable=None, block_start=0):
        """The embeddings (``embeds`` when given) and everything the layers need besides them: rotary tables,
        padding bias, routing context."""
        ctx = self.routing_context(input_ids, attention_mask, mask_ratio, maskable, block_start)
        x = self.embed_tokens(input_ids) if embeds is None else embeds
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = self.rotary_emb(positions, x.dtype)
        key_bias = None
        if not bool(ctx.valid.all()):
            key_bias = torch.zeros(ctx.valid.shape, dtype=x.dtype, device=x.device)
            key_bias = key_bias.masked_fill(~ctx.valid, torch.finfo(x.dtype).min)[:, None, None, :]
        return x, (rope, key_bias, ctx)

    def forward(self, input_ids, attention_mask=None, mask_ratio=None, maskable=None, block_start=0) -> torch.Tensor:
        x, layer_args = self.prepare(input_ids, attention_mask, mask_ratio, maskable=maskable, block_start=block_start)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # Recompute each layer in the backward pass instead of keeping its activations.
                x = torch.utils.checkpoint.checkpoint(layer, x, *layer_args, use_reentrant=False)
            else:
                x = layer(x, *layer_args)
        return self.norm(x)


class LLaDAMoEModelLM(LLaDAMoEPreTrainedModel):
    """The full masked-diffusion LM: ``logits[B, L, V]`` for every position (no shift: it is not causal)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, mask_ratio=None, logits_to_keep: slice | None = None,
                maskable=None, block_start: int = 0, **unused) -> MaskedLMOutput:
        """``logits_to_keep``: the positions whose logits are wanted (all by default). The output head is the
        largest single matmul (157k rows at 7B) and its logits the largest tensor, so callers that read a few
        positions (the sampler's current block, a continuation) ask for just those. ``maskable`` (``[B, L]``
        bool) and ``block_start``: see :class:`retrofit.routers.RoutingContext`."""
        hidden = self.model(input_ids, attention_mask=attention_mask, mask_ratio=mask_ratio, maskable=maskable,
                            block_start=block_start)
        if logits_to_keep is not None:
            hidden = hidden[:, logits_to_keep]
        return MaskedLMOutput(logits=self.lm_head(hidden))

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers]

    def enable_routing_stats(self, enabled: bool = True, block_length: int = 32) -> None:
        """Start (or stop) recording routing statistics in every MoE layer; starting clears old ones.
        ``block_length`` sets the blocks over which unique experts per block are counted."""
        self._stats_block_length = block_length
        for block in self.moe_blocks():
            block.stats = RoutingStats(self.config.num_experts, block_length) if enabled else None

    def routing_stats(self) -> RoutingStats:
        """Statistics recorded since :meth:`enable_routing_stats`, merged over layers (unique experts is the
        mean per layer per forward)."""
        merged = RoutingStats(self.config.num_experts, getattr(self, "_stats_block_length", 32))
        for block in self.moe_blocks():
            if block.stats is None:
                raise RuntimeError("routing statistics are off; call enable_routing_stats() first")
            merged.merge(block.stats)
        return merged

    def set_router(self, settings: RouterSettings) -> None:
        """Replace every layer's router in place, keeping its gate weight (the retrofit itself)."""
        cfg = self.config
        for block in self.moe_blocks():
            old = block.gate
            new = build_router(settings, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok)
            new.weight = old.weight
            block.gate = new
        cfg.router = settings.model_dump()


# ------------------------------------------------------------------------------- checkpoint naming

def router_tensor_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def is_router_tensor(name: str) -> bool:
    """Router (gate) weights, also under a peft wrapper's longer prefix."""
    return name.endswith(".mlp.gate.weight")


_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def parse_expert_key(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.experts.7.up_proj.weight`` → ``("model.layers.3.mlp.experts", 7, "up_proj")``."""
    m = _EXPERT_KEY.match(name)
    return (m["prefix"], int(m["expert"]), m["proj"]) if m else None


def stack_expert_tensors(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Hub per-expert names → the model's stacked names; every other tensor passes through unchanged."""
    out, groups = {}, {}
    for name, t in tensors.items():
        parsed = parse_expert_key(name)
        if parsed is None:
            out[name] = t
        else:
            prefix, e, proj = parsed
            groups.setdefault((prefix, proj), {})[e] = t
    for (prefix, proj), by_expert in groups.items():
        missing = sorted(set(range(num_experts)) - set(by_expert))
        if missing:
            raise RetrofitError(f"checkpoint lacks {prefix}.N.{proj}.weight for experts {missing[:8]}")
        out[f"{prefix}.{proj}"] = torch.stack([by_expert[e] for e in range(num_experts)])
    return out


def unstack_expert_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's stacked names → the Hub's per-expert names (views, no copy)."""
    out = {}
    for name, t in tensors.items():
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith(".mlp.experts") and proj in EXPERT_PROJECTIONS:
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = t[e]
        else:
            out[name] = t
    return out


def hub_state_dict(model: LLaDAMoEModelLM) -> dict[str, torch.Tensor]:
    """The model's tensors under the exact names of the Hub checkpoint."""
    tensors = unstack_expert_tensors(dict(model.state_dict()))
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors

