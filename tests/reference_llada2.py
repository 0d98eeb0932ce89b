"""A deliberately plain LLaDA2.0 MoE forward (``llada2_moe``: LLaDA2.0-mini/-flash) on Hub-named tensors, for parity
tests of the native model. Written for clarity, not speed: explicit loops over heads, rotary pairs, tokens and
experts, at the tiny sizes tests use (hidden 32-64, 8-16 experts, 2-3 layers, length <= 16).

It follows the public reference modeling code ("DM-eval" = fscdc/dMoE @ a5b7679
``evaluations/models/modeling_llada2_moe.py``; "HFc" = the Hub file as copied in ZHZisZZ/dllm @ d8cc119
``dllm/pipelines/llada2/models/modeling_llada2_moe.py``); "spec §" names the section of docs/llada2-reference-notes.md:

- tensor names and the fused QKV row layout (Q rows, then K, then V): spec §2, DM-eval:653-668, 695-702;
- pre-norm layer ``x + attn(norm(x))``, ``h + mlp(norm(h))``: spec §3.1, DM-eval:877-922;
- GQA (KV head j serves query heads j*g .. j*g+g-1), scale 1/sqrt(head_dim): spec §3.1, DM-eval:578-589, 650;
- per-head QK RMSNorm (one head_dim weight shared by the heads) before the rotation: spec §3.2, DM-eval:707-714;
- RMSNorm numerics (fp32 inside, cast back to the input dtype, then times the weight): spec §3.2, DM-eval:115-120;
- partial rotate-half rotary on the first int(head_dim * partial_rotary_factor) dims of each head, inv_freq
  1/theta^(2i/rot_dim), positions 0..L-1, cos/sin in fp32 cast to the activations' dtype: spec §3.3,
  DM-eval:148-218;
- the block-causal mask (a query in block floor(q/B) sees keys in blocks <= its own; tril over blocks, ``.log()``,
  bf16, additive into SDPA): spec §3.4, HFc:1339-1349, DM-eval:1669-1679;
- dense SwiGLU for layers < first_k_dense_replace: spec §4.1, DM-eval:233-234, 763-770;
- the gate (fp32 linear, sigmoid, expert_bias for selection only, group-limited top-k with group score = sum of the
  two best biased scores, unbiased weights renormalised with +1e-20, times routed_scaling_factor): spec §4.2,
  DM-eval:260-306;
- expert execution and combine (experts in ascending id, outputs to fp32, times the fp32 weights, summed over the
  k slots in fp32, cast to bf16; shared expert added in bf16): spec §4.3, DM-eval:448-449, 543-574;
- final norm, lm_head, ``logits.float()``: spec §4.4, DM-eval:1380-1381.

Three entry points: :func:`reference_logits` (everything in float64, the math), :func:`reference_routing` (one MoE
layer's choice and weights, float64) and :func:`reference_order_logits` (bf16 in the reference code's order of
operations, for tight bf16 parity). :func:`tiny_llada2_tensors` makes random tensors for ``TINY_LLADA2_CONFIG``.

Decisions where the reference leaves room (see also the spec §4.3(b), §9):
- ``expert_bias`` keeps its stored dtype in :func:`reference_order_logits` and is added in fp32; the HF reference
  loaded with ``torch_dtype=bf16`` holds it in bf16, so pass a bf16 bias to emulate that. The tiny tensors store it
  as float32 holding bf16-exact values, so both readings give the same numbers.
- with num_experts_per_tok == 1 the reference does not renormalise (DM-eval:285-306); both references follow it.
- ties in the float64 routing (practically never met) go to the lower group / expert index.
- :func:`reference_order_logits` always passes an additive bf16 mask (all zeros when bidirectional), as the
  reference model requires a [B, 1, L, L] mask (DM-eval ``LLaDA2MoeModel.forward``); with a mask, transformers'
  SDPA path repeats the KV heads and sets ``is_causal=False``.
- a token's rows inside one expert's batch go in ascending token order (the reference's argsort is unstable; the
  order only matters for kernels that depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

F = torch.nn.functional

TINY_LLADA2_CONFIG = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4, num_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, partial_rotary_factor=0.5,
    rope_theta=600000.0, rms_norm_eps=1e-6,
)

_KEYS = tuple(TINY_LLADA2_CONFIG)


def _config(config) -> dict:
    """The keys this file reads, from a plain dict or from a config object with those attributes."""
    if isinstance(config, Mapping):
        return {k: config[k] for k in _KEYS}
    return {k: getattr(config, k) for k in _KEYS}


def _is_moe_layer(c: dict, layer: int) -> bool:
    return layer >= c["first_k_dense_replace"]


# ------------------------------------------------------------------------------------------------ float64 reference


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _swiglu(t: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for the MLP whose weights are named ``{prefix}{gate,up,down}_proj.weight``."""
    gate = x @ t[prefix + "gate_proj.weight"].T
    up = x @ t[prefix + "up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ t[prefix + "down_proj.weight"].T


def _rotate(vec: torch.Tensor, position: int, rot_dim: int, theta: float) -> torch.Tensor:
    """Partial rotate-half rotary of one head vector: dims (i, i + rot_dim/2) for i < rot_dim/2 turn by the angle
    position / theta^(2i/rot_dim); dims rot_dim.. pass through."""
    out = vec.clone()
    half = rot_dim // 2
    for i in range(half):
        angle = position * theta ** (-2.0 * i / rot_dim)
        c, s = math.cos(angle), math.sin(angle)
        a, b = vec[i], vec[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def reference_routing(tensors: dict, config, layer: int, hidden: torch.Tensor):
    """One MoE layer's routing of its normed input ``hidden`` [T, d] (float64): returns the chosen expert ids [T, k]
    (long, in descending order of the biased selection score) and their final weights [T, k] (float64; they sum to
    routed_scaling_factor per token when k > 1)."""
    c = _config(config)
    prefix = f"model.layers.{layer}.mlp.gate."
    weight = tensors[prefix + "weight"].double()
    bias = tensors[prefix + "expert_bias"].double()
    experts, groups, k = c["num_experts"], c["n_group"], c["num_experts_per_tok"]
    per_group = experts // groups
    assert per_group * groups == experts and per_group >= 2, "groups of at least two experts"
    all_ids, all_weights = [], []
    for x in hidden.double():
        scores = torch.sigmoid(weight @ x).tolist()  # unbiased: these become the weights
        select = [scores[e] + float(bias[e]) for e in range(experts)]  # biased: these choose
        group_score = []
        for g in range(groups):
            members = sorted((select[e] for e in range(g * per_group, (g + 1) * per_group)), reverse=True)
            group_score.append(members[0] + members[1])
        kept = sorted(range(groups), key=lambda g: -group_score[g])[: c["topk_group"]]
        candidates = sorted(e for g in kept for e in range(g * per_group, (g + 1) * per_group))
        chosen = sorted(candidates, key=lambda e: -select[e])[:k]
        w = [scores[e] for e in chosen]
        if k > 1:
            total = sum(w)
            w = [v / (total + 1e-20) for v in w]
        all_ids.append(chosen)
        all_weights.append([v * c["routed_scaling_factor"] for v in w])
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float64)


def _moe(t: dict, c: dict, layer: int, h: torch.Tensor) -> torch.Tensor:
    """Routed experts, one (token, chosen expert) pair at a time, plus the shared expert."""
    prefix = f"model.layers.{layer}.mlp."
    ids, weights = reference_routing(t, c, layer, h)
    out = torch.zeros_like(h)
    for tok in range(h.shape[0]):
        for e, w in zip(ids[tok].tolist(), weights[tok].tolist()):
            out[tok] += w * _swiglu(t, f"{prefix}experts.{e}.", h[tok])
        if c["num_shared_experts"]:
            out[tok] += _swiglu(t, prefix + "shared_experts.", h[tok])
    return out


def reference_logits(tensors: dict, config, input_ids: torch.Tensor, attention_blocks: int | None = None,
                     padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, L, vocab] in float64. ``attention_blocks`` = B makes attention block-causal (the query at q sees
    keys k with k // B <= q // B); None is fully bidirectional. ``padding_mask`` [batch, L] (False = padding) hides
    padding keys from every query."""
    c = _config(config)
    t = {name: v.double() for name, v in tensors.items()}
    eps = c["rms_norm_eps"]
    heads, kv_heads, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    per_kv = heads // kv_heads
    rot_dim = int(hd * c["partial_rotary_factor"])
    batch, length = input_ids.shape
    out = []
    for b in range(batch):
        keep = torch.ones(length, dtype=torch.bool) if padding_mask is None else padding_mask[b].bool()
        allowed = torch.zeros(length, length, dtype=torch.bool)  # [query, key]
        for q in range(length):
            for k in range(length):
                visible = attention_blocks is None or k // attention_blocks <= q // attention_blocks
                allowed[q, k] = visible and bool(keep[k])
        x = t["model.word_embeddings.weight"][input_ids[b]]
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = _rms(x, t[p + "input_layernorm.weight"], eps)
            qkv = h @ t[p + "attention.query_key_value.weight"].T  # [L, (heads + 2 kv_heads) * hd]
            q_all = qkv[:, : heads * hd]
            k_all = qkv[:, heads * hd: (heads + kv_heads) * hd]
            v_all = qkv[:, (heads + kv_heads) * hd:]
            attn = torch.zeros(length, heads * hd, dtype=torch.float64)
            for head in range(heads):
                j = head // per_kv  # the KV head serving this query head
                q = _rms(q_all[:, head * hd: (head + 1) * hd], t[p + "attention.query_layernorm.weight"], eps)
                k = _rms(k_all[:, j * hd: (j + 1) * hd], t[p + "attention.key_layernorm.weight"], eps)
                v = v_all[:, j * hd: (j + 1) * hd]
                q = torch.stack([_rotate(q[i], i, rot_dim, c["rope_theta"]) for i in range(length)])
                k = torch.stack([_rotate(k[i], i, rot_dim, c["rope_theta"]) for i in range(length)])
                scores = (q @ k.T) / math.sqrt(hd)
                scores = scores.masked_fill(~allowed, float("-inf"))
                attn[:, head * hd: (head + 1) * hd] = torch.softmax(scores, dim=-1) @ v
            x = x + attn @ t[p + "attention.dense.weight"].T
            h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
            x = x + (_moe(t, c, layer, h) if _is_moe_layer(c, layer) else _swiglu(t, p + "mlp.", h))
        out.append(_rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T)
    return torch.stack(out)


# --------------------------------------------------------------------------------- bf16, the reference's order


def _rms_like_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 inside, cast back to the input's dtype, then times the (bf16) weight in that dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _swiglu_like_reference(t: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    gate = F.linear(x, t[prefix + "gate_proj.weight"])
    return F.linear(F.silu(gate) * F.linear(x, t[prefix + "up_proj.weight"]), t[prefix + "down_proj.weight"])


def _gate_like_reference(t: dict, c: dict, layer: int, x: torch.Tensor):
    """The reference gate on flat tokens x [N, d]: expert ids [N, k] and fp32 weights [N, k]."""
    prefix = f"model.layers.{layer}.mlp.gate."
    n, experts, groups, k = x.shape[0], c["num_experts"], c["n_group"], c["num_experts_per_tok"]
    logits = F.linear(x.float(), t[prefix + "weight"].float())
    scores = torch.sigmoid(logits)
    select = scores + t[prefix + "expert_bias"].float()
    group_scores = select.view(n, groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=c["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(n, groups, experts // groups).reshape(n, -1)
    ids = torch.topk(select.masked_fill(~expert_mask.bool(), float("-inf")), k=k, dim=-1)[1]
    weights = torch.gather(scores, 1, ids)
    if k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * c["routed_scaling_factor"]


def _moe_like_reference(t: dict, c: dict, layer: int, h: torch.Tensor) -> torch.Tensor:
    """The reference sparse block at inference (moe_infer): experts in ascending id on their tokens in bf16, each
    (token, slot) output to fp32, times the fp32 weight, summed over the slots in fp32, to bf16; plus shared."""
    prefix = f"model.layers.{layer}.mlp."
    flat = h.reshape(-1, h.shape[-1])
    ids, weights = _gate_like_reference(t, c, layer, flat)
    outs = torch.empty(*ids.shape, flat.shape[-1], dtype=flat.dtype)  # [N, k, d] in (token, slot) order
    for e in range(c["num_experts"]):
        tokens, slots = torch.where(ids == e)
        if tokens.numel():
            outs[tokens, slots] = _swiglu_like_reference(t, f"{prefix}experts.{e}.", flat[tokens])
    y = (outs.float() * weights.unsqueeze(-1)).sum(dim=1).to(flat.dtype).view_as(h)
    if c["num_shared_experts"]:
        y = y + _swiglu_like_reference(t, prefix + "shared_experts.", h)
    return y


def reference_order_logits(tensors: dict, config, input_ids: torch.Tensor,
                           attention_blocks: int | None = None) -> torch.Tensor:
    """Logits [batch, L, vocab] as float32 from a bf16 forward in the public reference code's order of operations
    (no padding). Weights are cast to bf16; ``expert_bias`` keeps its stored dtype and is added in fp32."""
    c = _config(config)
    bf16 = torch.bfloat16
    t = {name: (v if name.endswith(".expert_bias") else v.to(bf16)) for name, v in tensors.items()}
    eps = c["rms_norm_eps"]
    heads, kv_heads, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    rot_dim = int(hd * c["partial_rotary_factor"])
    batch, length = input_ids.shape

    # Rotary tables: fp32 inv_freq from an int64 arange, fp32 outer product with the positions, cast to bf16.
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    positions = torch.arange(length)[None, :].float()
    freqs = (inv_freq[None, :, None] @ positions[:, None, :]).transpose(1, 2)  # [1, L, rot_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(bf16).unsqueeze(1), emb.sin().to(bf16).unsqueeze(1)  # [1, 1, L, rot_dim]

    # Additive bf16 mask [batch, 1, L, L]: 0 where visible, -inf where not.
    if attention_blocks is None:
        mask = torch.zeros(batch, 1, length, length, dtype=bf16)
    else:
        blocks = -(-length // attention_blocks)
        visible = torch.tril(torch.ones(blocks, blocks))
        visible = visible.repeat_interleave(attention_blocks, 0).repeat_interleave(attention_blocks, 1)
        mask = visible[:length, :length].log().to(bf16)[None, None].expand(batch, 1, length, length)

    x = F.embedding(input_ids, t["model.word_embeddings.weight"])
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms_like_reference(x, t[p + "input_layernorm.weight"], eps)
        qkv = F.linear(h, t[p + "attention.query_key_value.weight"]).view(batch, length, heads + 2 * kv_heads, hd)
        q, k, v = (s.transpose(1, 2) for s in qkv.split([heads, kv_heads, kv_heads], dim=-2))
        q = _rms_like_reference(q, t[p + "attention.query_layernorm.weight"], eps)
        k = _rms_like_reference(k, t[p + "attention.key_layernorm.weight"], eps)
        q = torch.cat((q[..., :rot_dim] * cos + _rotate_half(q[..., :rot_dim]) * sin, q[..., rot_dim:]), dim=-1)
        k = torch.cat((k[..., :rot_dim] * cos + _rotate_half(k[..., :rot_dim]) * sin, k[..., rot_dim:]), dim=-1)
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # KV head j -> query heads j*g .. j*g+g-1
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        attn = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask,
                                              dropout_p=0.0, is_causal=False, scale=hd**-0.5)
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, length, heads * hd), t[p + "attention.dense.weight"])
        h = _rms_like_reference(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + (_moe_like_reference(t, c, layer, h) if _is_moe_layer(c, layer)
                 else _swiglu_like_reference(t, p + "mlp.", h))
    x = _rms_like_reference(x, t["model.norm.weight"], eps)
    return F.linear(x, t["lm_head.weight"]).float()


# ------------------------------------------------------------------------------------------------ random tensors


def tiny_llada2_tensors(config=None, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Random Hub-named tensors for ``config`` (default TINY_LLADA2_CONFIG): router gate weights N(0, 0.5^2),
    ``expert_bias`` N(0, 0.1^2), norm weights U[0.5, 1.5], everything else N(0, 0.02^2). Values are rounded to
    ``dtype`` (bf16 by default, so the float64, fp32 and bf16 paths all see the same numbers). ``expert_bias`` is
    stored as float32 (as SGLang loads it) holding bf16-exact values, so a bf16 buffer would hold the same."""
    c = _config(TINY_LLADA2_CONFIG if config is None else config)
    gen = torch.Generator().manual_seed(seed)
    d, hd, v = c["hidden_size"], c["head_dim"], c["vocab_size"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    t: dict[str, torch.Tensor] = {}

    def normal(name, *shape, std=0.02):
        t[name] = (torch.randn(*shape, generator=gen) * std).to(dtype)

    def norm(name, size):
        t[name] = (0.5 + torch.rand(size, generator=gen)).to(dtype)

    def mlp(prefix, inner):
        normal(prefix + "gate_proj.weight", inner, d)
        normal(prefix + "up_proj.weight", inner, d)
        normal(prefix + "down_proj.weight", d, inner)

    normal("model.word_embeddings.weight", v, d)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        norm(p + "input_layernorm.weight", d)
        normal(p + "attention.query_key_value.weight", (heads + 2 * kv_heads) * hd, d)
        norm(p + "attention.query_layernorm.weight", hd)
        norm(p + "attention.key_layernorm.weight", hd)
        normal(p + "attention.dense.weight", d, heads * hd)
        norm(p + "post_attention_layernorm.weight", d)
        if not _is_moe_layer(c, layer):
            mlp(p + "mlp.", c["intermediate_size"])
            continue
        normal(p + "mlp.gate.weight", c["num_experts"], d, std=0.5)
        bias = torch.randn(c["num_experts"], generator=gen) * 0.1
        t[p + "mlp.gate.expert_bias"] = bias.to(torch.bfloat16).float()
        for e in range(c["num_experts"]):
            mlp(f"{p}mlp.experts.{e}.", c["moe_intermediate_size"])
        if c["num_shared_experts"]:
            mlp(p + "mlp.shared_experts.", c["moe_intermediate_size"] * c["num_shared_experts"])
    norm("model.norm.weight", d)
    normal("lm_head.weight", v, d)
    return t
