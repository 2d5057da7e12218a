"""Lookups as autograd leaves, and their gradient per table row, for tables that are not parameters.

Tables off the device (and sharded ones) fetch a lookup's U distinct rows as one (U, dim) block and
expand it with ``F.embedding(inverse, block, sparse=True)``. The block is an autograd leaf, so
backward leaves it a sparse gradient with one entry per looked-up index. ``RowGradients`` keeps
those leaves until the optimizer takes their gradient, summed per table row.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from engram.storage.prefetch import FetchedRows


class RowGradients:
    """The leaves of one table's lookups since the last ``take``."""

    def __init__(self) -> None:
        self._leaves: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows (U,), leaf (U, dim))

    def expand(self, fetched: FetchedRows, track: bool) -> torch.Tensor:
        """The lookup's rows (*indices.shape, dim); with ``track`` the block becomes a leaf whose gradient is kept."""
        values = fetched.values
        if track:
            values = values.detach().requires_grad_()
            self._leaves.append((fetched.rows, values))
        return F.embedding(fetched.inverse, values, sparse=True)

    def take(self, num_rows: int, dim: int) -> torch.Tensor | None:
        """The gradient of every looked-up row, a coalesced sparse (num_rows, dim) tensor; None if none.

        Each leaf's entries are mapped to table rows and the leaves are added one after another (as
        autograd accumulates a device table's sparse gradient), then coalesced, so the entries are
        summed in the same order as on a device table and every tier computes bit-identical updates.
        """
        total = None
        for rows, values in self._leaves:
            grad = values.grad
            if grad is None:
                continue
            positions = rows.to(grad.device)[grad._indices()[0]].unsqueeze(0)  # in range by construction
            entry = torch.sparse_coo_tensor(positions, grad._values(), (num_rows, dim), check_invariants=False)
            total = entry if total is None else total + entry
        self._leaves = []
        return None if total is None else total.coalesce()

    def zero(self) -> None:
        """Drop gradients already computed; lookups whose backward has not run yet keep their place
        (training loops commonly zero the gradients between the forward and the backward pass)."""
        self._leaves = [(rows, values) for rows, values in self._leaves if values.grad is None]
