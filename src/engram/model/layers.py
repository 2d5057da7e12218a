"""Backbone building blocks: SwiGLU FFN, rotary position embedding, causal self-attention (with a KV cache).

Shapes: B batch, T positions, d model width, h heads of size d/h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class SwiGLU(nn.Module):
    """``W_down(SiLU(W_gate x) * W_up x)``: (..., d) -> (..., d)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Rotary(nn.Module):
    """Rotary position embedding tables for positions 0..max_len-1 (rotate-half convention)."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, head_dim/2)
        # Kept in float64 and cast on use, so that a float64 model gets exact tables.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x (B, h, T, head_dim) as positions ``start .. start+T-1``."""
        length = x.shape[-2]
        if start + length > self.cos.shape[0]:
            raise ValueError(f"sequence reaches position {start + length}, beyond max_seq_len={self.cos.shape[0]}")
        cos = self.cos[start : start + length].to(x.dtype)
        sin = self.sin[start : start + length].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class KVCache:
    """Keys and values of the positions one attention layer has seen, for incremental decoding.

    The tensors are allocated on the first ``append``, (B, h, capacity, head_dim) with the dtype
    and device of the first keys, and written in place: decoding copies each new position once
    instead of re-concatenating the whole past at every step. Inference only: the in-place writes
    do not support backpropagating through several calls.
    """

    capacity: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    length: int = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys and values (B, h, T, head_dim); return all of them so far, (B, h, length, head_dim)."""
        new = keys.shape[2]
        if self.length + new > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.capacity} positions; {self.length} are used and {new} more do not fit"
            )
        if self.keys is None:
            shape = (*keys.shape[:2], self.capacity, keys.shape[3])
            self.keys, self.values = keys.new_empty(shape), values.new_empty(shape)
        elif keys.shape[:2] != self.keys.shape[:2]:  # the slice assignment below would broadcast a batch of 1
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not fit a cache of {tuple(self.keys.shape)}")
        end = self.length + new
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, n_heads: int, rotary: Rotary):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d).

        Without ``cache`` x is a whole sequence. With one, x holds the positions that follow the
        ``cache.length`` cached ones: they are rotated as those absolute positions, appended to the
        cache and attend to every cached position and causally among themselves.
        """
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        start = 0 if cache is None else cache.length
        q, k = self.rotary(q, start), self.rotary(k, start)  # (B, h, T, head_dim)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, h, start + T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, **_causal_mask(start, length, x.device))
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


def _causal_mask(start: int, length: int, device: torch.device) -> dict[str, bool | torch.Tensor]:
    """SDPA's masking arguments for ``length`` queries at positions ``start ..`` over keys ``0 .. start+length-1``.

    ``is_causal`` aligns its triangle to the top-left corner, which is right only when queries and
    keys start together; after a cached past query i must see keys up to ``start + i``.
    """
    if start == 0:
        return {"is_causal": True}
    if length == 1:
        return {}  # one new position sees everything
    keys = torch.arange(start + length, device=device)
    queries = torch.arange(start, start + length, device=device)
    return {"attn_mask": keys <= queries[:, None]}  # (T, start+T), True = attend
