"""Layers shared by the model families: RMSNorm in fp32, rotate-half rotary embeddings, a SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        """``positions`` ``[L]`` → tables ``[L, dims]``; per-row positions ``[B, L]`` (a left-padded batch) →
        ``[B, 1, L, dims]``, broadcasting over the heads."""
        freqs = positions.float()[..., None] * self.frequencies(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb.unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:  # ctx: a MoE block's routing context, unused
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
