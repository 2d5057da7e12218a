"""The default tier: the table is an ordinary parameter on the model's device."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engram.storage.base import TableStorage
from engram.storage.init import draw_seed, fill_normal_rows
from engram.storage.prefetch import PendingRows


class DeviceTable(TableStorage):
    """Table held as an ``nn.Parameter`` (moves with ``model.to(...)``, saved in ``state_dict``).

    Args:
        num_rows, dim: table shape.
        init_std, seed, first_row: rows start as rows ``[first_row, first_row + num_rows)`` of the
            N(0, init_std^2) table of ``seed`` (``engram.storage.init``; None draws the seed from
            torch's global generator), identical in every tier.
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
        seed: int | None = None,
        first_row: int = 0,
    ):
        super().__init__(num_rows, dim)
        self.sparse_grad = sparse_grad
        self.weight = nn.Parameter(torch.empty(num_rows, dim, dtype=dtype, device=device))
        fill_normal_rows(self.weight.data, draw_seed() if seed is None else seed, init_std, first_row)

    @property
    def home_device(self) -> torch.device:
        return self.weight.device

    def lookup(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        return F.embedding(indices, self.weight, sparse=self.sparse_grad)

    @torch.no_grad()
    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[self.check_rows(rows).to(self.weight.device)].clone()

    @torch.no_grad()
    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        rows = self.check_rows(rows)
        self._check_values(rows, values)
        self.weight.index_copy_(0, rows.to(self.weight.device), values.to(self.weight))

    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        grad = self.weight.grad
        if grad is None:
            return None
        if not grad.is_sparse:
            raise RuntimeError(
                f"a sparse row optimizer needs sparse gradients, but this {self.num_rows}-row table has a dense "
                "gradient; build it with DeviceTable(..., sparse_grad=True), or use a dense optimizer such as AdamW"
            )
        self.weight.grad = None
        grad = grad.coalesce()  # sums repeated rows; keeps rows whose sum is zero (they were looked up)
        return grad.indices()[0], grad.values()

    def zero_row_grad(self) -> None:
        self.weight.grad = None

    def _new_row_state(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.num_rows, *row_shape, dtype=dtype, device=self.weight.device)

    def _apply(self, fn, recurse: bool = True):
        # Optimizer state follows the parameter when the model moves (model.to(device)).
        module = super()._apply(fn, recurse)
        self._row_states = {name: fn(state) for name, state in self._row_states.items()}
        return module
