"""The interface through which an Engram layer reaches its embedding table.

The layer only ever asks for rows by index (differentiably) and, in a sparse optimizer, adds
updates to rows. Keeping the table behind this interface lets tables that live on the device, in
host memory, on disk or across machines plug in without touching the layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from engram._checks import as_id_tensor, check_id_range


class TableStorage(nn.Module, ABC):
    """A table of ``num_rows`` rows of width ``dim``.

    Subclasses implement ``lookup`` (differentiable gather), ``read_rows`` and
    ``apply_sparse_update``.
    """

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a table needs num_rows >= 1 and dim >= 1, got ({num_rows}, {dim})")
        self.num_rows = int(num_rows)
        self.dim = int(dim)

    @abstractmethod
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows for ``indices`` of any shape: (*indices.shape, dim); gradients flow to the table."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``lookup(indices)``, so that module hooks see table reads."""
        return self.lookup(indices)

    @abstractmethod
    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``rows`` (U,) as (U, dim), outside autograd."""

    @abstractmethod
    def apply_sparse_update(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``delta`` (U, dim) to the rows ``rows`` (U,); repeated rows accumulate."""

    def check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Validate row indices (integer, in range) and return them as int64."""
        rows = as_id_tensor(rows, "rows")
        check_id_range(rows, 0, self.num_rows, "rows", f" of this {self.num_rows}-row table")
        return rows

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}"
