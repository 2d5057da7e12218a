"""The short causal convolution that follows the gated memory read (docs/definition.md, "The layer")."""

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
        """x: (B, T, M, d) -> (B, T, M, d), for a whole sequence."""
        h = self._normed(x)
        return self._convolve(F.pad(h, (self.left_pad, 0)), x.shape)  # left padding only: causal

    def step(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution of positions that continue a sequence, for incremental decoding.

        Args:
            x: (B, T, M, d) the new positions.
            state: (B, M*d, (kernel_size-1)*dilation) normalised inputs of the positions before
                them (oldest first), as returned by the previous call; ``None`` at the start of a
                sequence (zeros: the causal padding of ``forward``).

        Returns:
            ``(y, state)``: y (B, T, M, d) equal to the last T positions of ``forward`` over the
            whole sequence, and the state after the new positions.
        """
        h = self._normed(x)
        if state is None:
            extended = F.pad(h, (self.left_pad, 0))
        else:
            expected = (*h.shape[:2], self.left_pad)
            if tuple(state.shape) != expected:
                raise ValueError(f"conv state must have shape {expected}, got {tuple(state.shape)}")
            extended = torch.cat([state, h], dim=-1)
        # A copy, not a view: a view would keep the whole extended input (a long prefill) alive.
        new_state = extended[..., extended.shape[-1] - self.left_pad :].clone()
        return self._convolve(extended, x.shape), new_state

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, M, d) -> RMSNorm per branch, channels first (B, M*d, T)."""
        batch, length, branches, dim = x.shape
        return self.norm(x).reshape(batch, length, branches * dim).transpose(1, 2)

    def _convolve(self, extended: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Conv1D + SiLU of (B, M*d, left_pad + T) normalised inputs -> (B, T, M, d) of ``shape``."""
        return F.silu(self.conv(extended)).transpose(1, 2).reshape(shape)
