"""The short causal convolution that follows the gated memory read (ENGRAM.md 1, step 6)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BranchRMSNorm(nn.Module):
    """RMSNorm with a separate weight per residual branch: (..., M, dim) -> (..., M, dim)."""

    def __init__(self, n_branches: int, dim: int, eps: float | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_branches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


class ShortConv(nn.Module):
    """``SiLU(Conv1D(RMSNorm(x)))``: depthwise, causal, dilated, over all channels of all branches.

    Args:
        n_branches: M residual branches; each gets its own RMSNorm.
        dim: channels per branch (d).
        kernel_size: taps; tap j reads position ``t - j * dilation``.
        dilation: spacing of the taps (Engram uses N, the maximum n-gram order).
        norm_eps: RMSNorm epsilon.
        zero_init: start with zero weights, so the output is 0 and the layer's residual form
            ``x + ShortConv(x)`` starts as the identity.
    """

    def __init__(
        self,
        n_branches: int,
        dim: int,
        kernel_size: int = 4,
        dilation: int = 3,
        norm_eps: float = 1e-5,
        zero_init: bool = True,
    ):
        super().__init__()
        channels = n_branches * dim
        self.left_pad = (kernel_size - 1) * dilation
        self.norm = BranchRMSNorm(n_branches, dim, norm_eps)
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels, bias=False)
        if zero_init:
            nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, M, d) -> (B, T, M, d)."""
        batch, length, branches, dim = x.shape
        h = self.norm(x).reshape(batch, length, branches * dim).transpose(1, 2)  # (B, M*d, T)
        h = self.conv(F.pad(h, (self.left_pad, 0)))  # left padding only: causal
        return F.silu(h).transpose(1, 2).reshape(batch, length, branches, dim)
