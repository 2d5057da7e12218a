"""Hyper-connections: M residual branches instead of one (Zhu et al., "Hyper-Connections", 2024).

The residual stream is widened to M copies (B, T, M, d). Around each sublayer f, learned weights
read the sublayer's input as a mix of the branches, mix the branches among themselves, and write
f's output back into every branch:

    x  = sum_m a_in[m] h_m                    (B, T, d)
    h'_n = sum_m a_res[m, n] h_m + b_out[n] f(x)

This is the static form. At initialisation sublayer i reads branch ``i mod M`` alone, the
branches pass through unchanged and f's output is added to all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class HyperConnection(nn.Module):
    """Wraps one sublayer's residual connection for M branches."""

    def __init__(self, n_branches: int, sublayer_index: int):
        super().__init__()
        a_in = torch.zeros(n_branches)
        a_in[sublayer_index % n_branches] = 1.0
        self.a_in = nn.Parameter(a_in)
        self.a_res = nn.Parameter(torch.eye(n_branches))
        self.b_out = nn.Parameter(torch.ones(n_branches))

    def forward(self, h: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h: (B, T, M, d) -> (B, T, M, d)."""
        x = torch.einsum("btmd,m->btd", h, self.a_in.to(h.dtype))
        y = sublayer(x)
        mixed = torch.einsum("btmd,mn->btnd", h, self.a_res.to(h.dtype))
        return mixed + y.unsqueeze(2) * self.b_out.to(h.dtype)[:, None]
