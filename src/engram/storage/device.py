"""The default tier: the table is an ordinary parameter on the model's device."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engram.storage.base import TableStorage


class DeviceTable(TableStorage):
    """Table held as an ``nn.Parameter`` (moves with ``model.to(...)``, saved in ``state_dict``).

    Args:
        num_rows, dim: table shape.
        init_std: rows start as N(0, init_std^2).
        sparse_grad: produce a sparse gradient (only looked-up rows), for sparse optimizers.
        dtype, device: of the parameter.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        init_std: float = 1.0,
        sparse_grad: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(num_rows, dim)
        self.sparse_grad = sparse_grad
        self.weight = nn.Parameter(torch.empty(num_rows, dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=init_std)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.weight, sparse=self.sparse_grad)

    @torch.no_grad()
    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[self.check_rows(rows).to(self.weight.device)].clone()

    @torch.no_grad()
    def apply_sparse_update(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        rows = self.check_rows(rows).to(self.weight.device)
        if delta.shape != (rows.numel(), self.dim):
            raise ValueError(f"delta must have shape ({rows.numel()}, {self.dim}), got {tuple(delta.shape)}")
        self.weight.index_add_(0, rows, delta.to(self.weight))
