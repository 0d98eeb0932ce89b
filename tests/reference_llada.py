"""A deliberately plain LLaDA-MoE forward, written from algorithms.md §1 and the public reference code's
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
