"""A deliberately plain LLaDA-MoE forward, written from docs/algorithms.md §1 and the public reference code's
behaviour, on Hub-named tensors. Slow and obvious: explicit per-head attention, rotary pairs (i, i + d/2),
and a per-token loop over the token-choice MoE. The native model must match it."""

from __future__ import annotations

import math

import torch


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rotary(x, position, theta):
    """Rotate-half rotary embedding of one head vector at one position."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for i in range(half):
        angle = position * theta ** (-2.0 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def moe_token_choice(h, t: dict, prefix: str, num_experts: int, k: int):
    """The checkpoint's routing: softmax over experts, top-k, raw (unnormalised) gates."""
    out = torch.zeros_like(h)
    for tok in range(h.shape[0]):
        probs = torch.softmax(h[tok] @ t[prefix + "gate.weight"].T, dim=-1)
        gates, experts = probs.topk(k)
        for g, e in zip(gates.tolist(), experts.tolist()):
            ep = f"{prefix}experts.{e}."
            a = torch.nn.functional.silu(t[ep + "gate_proj.weight"] @ h[tok]) * (t[ep + "up_proj.weight"] @ h[tok])
            out[tok] += g * (t[ep + "down_proj.weight"] @ a)
    return out


def reference_logits(t: dict, cfg, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    t = {k: v.double() for k, v in t.items()}
    eps, heads = cfg.rms_norm_eps, cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    out = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b]
        valid = torch.ones(len(ids), dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        x = t["model.embed_tokens.weight"][ids]
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = rms(x, t[p + "input_layernorm.weight"], eps)
            attn = torch.zeros_like(x)
            for head in range(heads):
                sl = slice(head * hd, (head + 1) * hd)
                q = rms(h @ t[p + "self_attn.q_proj.weight"][sl].T, t[p + "self_attn.q_norm.weight"], eps)
                k = rms(h @ t[p + "self_attn.k_proj.weight"][sl].T, t[p + "self_attn.k_norm.weight"], eps)
                v = h @ t[p + "self_attn.v_proj.weight"][sl].T
                q = torch.stack([rotary(q[i], i, cfg.rope_theta) for i in range(len(ids))])
                k = torch.stack([rotary(k[i], i, cfg.rope_theta) for i in range(len(ids))])
                scores = (q @ k.T) / math.sqrt(hd)
                scores[:, ~valid] = float("-inf")  # padding keys are hidden; nothing is causal
                attn[:, sl] = torch.softmax(scores, dim=-1) @ v
            x = x + attn @ t[p + "self_attn.o_proj.weight"].T
            h = rms(x, t[p + "post_attention_layernorm.weight"], eps)
            x = x + moe_token_choice(h, t, p + "mlp.", cfg.num_experts, cfg.num_experts_per_tok)
        out.append(rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T)
    return torch.stack(out)


def _rms_like_reference(x, weight, eps):
    """The reference RMSNorm: fp32 inside, the input's dtype out, then the weight."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _moe_like_reference(h, t: dict, prefix: str, num_experts: int, k: int):
    """The reference sparse MoE block: fp32 softmax, top-k, gates cast to the activations' dtype; experts in
    order, each on torch.where of its [k, T] mask, down_proj then gate, index_add_."""
    F = torch.nn.functional
    logits = F.linear(h, t[prefix + "gate.weight"])
    weights, selected = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(k, dim=-1)
    weights = weights.to(h.dtype)
    out = torch.zeros_like(h)
    mask = F.one_hot(selected, num_classes=num_experts).permute(2, 1, 0)  # [E, k, T]
    for e in range(num_experts):
        slot, tokens = torch.where(mask[e])
        if tokens.numel():
            ep = f"{prefix}experts.{e}."
            x = h[tokens]
            y = F.linear(F.silu(F.linear(x, t[ep + "gate_proj.weight"])) * F.linear(x, t[ep + "up_proj.weight"]),
                         t[ep + "down_proj.weight"])
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(h.dtype))
    return out


def reference_order_logits(t: dict, cfg, input_ids: torch.Tensor):
    """A forward in the reference modeling code's order of operations, in the tensors' own dtype (no padding),
    for bit-exact comparisons in bf16. Rotary angles are computed in fp32 from fp32 frequencies."""
    F = torch.nn.functional
    eps, heads = cfg.rms_norm_eps, cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    batch, length = input_ids.shape
    x = t["model.embed_tokens.weight"][input_ids]
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = (inv_freq[:, None] @ torch.arange(length).float()[None, :]).T
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = _rms_like_reference(x, t[p + "input_layernorm.weight"], eps)
        q, k, v = (F.linear(h, t[p + f"self_attn.{n}_proj.weight"]).view(batch, length, heads, hd) for n in "qkv")
        q = _rms_like_reference(q, t[p + "self_attn.q_norm.weight"], eps).transpose(1, 2)
        k = _rms_like_reference(k, t[p + "self_attn.k_norm.weight"], eps).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, length, -1), t[p + "self_attn.o_proj.weight"])
        h = _rms_like_reference(x, t[p + "post_attention_layernorm.weight"], eps)
        moe = _moe_like_reference(h.reshape(-1, h.shape[-1]), t, p + "mlp.", cfg.num_experts, cfg.num_experts_per_tok)
        x = x + moe.view_as(x)
    return F.linear(_rms_like_reference(x, t["model.norm.weight"], eps), t["lm_head.weight"])
