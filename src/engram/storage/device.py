"""The default tier: the table is an ordinary parameter on the model's device."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engram.storage.base import LocalTable
from engram.storage.init import draw_seed, fill_normal_rows
from engram.storage.prefetch import PendingRows


class DeviceTable(LocalTable):
    """Table held as an ``nn.Parameter`` (moves with ``model.to(...)``, saved in ``state_dict``).

    The rows are drawn when first used, not when the table is built: until then the parameter is a
    ``meta`` tensor of the table's shape and dtype (what ``parameters()`` yields, so parameter
    counts hold) and the table costs no memory. This is what lets a model be built plainly and its
    tables be placed in another tier afterwards (``engram.storage.place_tables``), even a table
    larger than RAM. Reading ``weight``, a lookup, reading or writing rows, ``state_dict`` and
    ``load_state_dict`` draw the rows; ``model.to(device, dtype)`` only records where and in which
    dtype they will be drawn.

    Args:
        num_rows, dim: table shape.
        init_std, seed, first_row: rows start as rows ``[first_row, first_row + num_rows)`` of the
            N(0, init_std^2) table of ``seed`` (``engram.storage.init``; None draws the seed from
            torch's global generator, now), identical in every tier.
        sparse_grad: produce a sparse gradient (only looked-up rows), for sparse optimizers.
        dtype, device: of the parameter.

    Attributes:
        seed, init_std, first_row: what the initial rows are drawn from.
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
        self.seed = draw_seed() if seed is None else seed
        self.init_std = init_std
        self.first_row = first_row
        like = torch.empty(0, dtype=dtype, device=device)  # resolves the defaults (torch.device context, dtype)
        self._pending_device: torch.device | None = like.device  # where the rows will be drawn; None once they are
        # registered directly, not by attribute: the ``weight`` property below draws the rows on first access
        self._parameters["weight"] = nn.Parameter(torch.empty(num_rows, dim, dtype=like.dtype, device="meta"))

    @property
    def weight(self) -> nn.Parameter:
        """The (num_rows, dim) parameter, its rows drawn first if they were not yet."""
        if self._pending_device is not None:  # checked here, so a compiled lookup of drawn rows never calls it
            self.materialize()
        return self._parameters["weight"]

    @property
    def materialized(self) -> bool:
        """Whether the rows have been drawn (and may since have changed); False: still the seed's rows, unallocated."""
        return self._pending_device is None

    @torch.no_grad()
    @torch.compiler.disable  # a generator and swap_tensors cannot be traced: a compiled first lookup runs this eagerly
    def materialize(self) -> None:
        """Allocate and draw the rows now, if they were not yet (``weight`` and every use do this on demand)."""
        if self._pending_device is None:
            return
        placeholder = self._parameters["weight"]
        rows = torch.empty(self.num_rows, self.dim, dtype=placeholder.dtype, device=self._pending_device)
        fill_normal_rows(rows, self.seed, self.init_std, self.first_row)
        # in place, so that whoever holds the parameter object (an optimizer, parameters()) sees the rows
        torch.utils.swap_tensors(placeholder, nn.Parameter(rows, requires_grad=placeholder.requires_grad))
        self._pending_device = None

    @property
    def home_device(self) -> torch.device:
        return self._parameters["weight"].device if self._pending_device is None else self._pending_device

    @property
    def dtype(self) -> torch.dtype:
        return self._parameters["weight"].dtype

    def lookup(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        return F.embedding(indices, self.weight, sparse=self.sparse_grad)

    @torch.no_grad()
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(0, rows)

    @torch.no_grad()
    def scatter(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.weight.index_copy_(0, rows, values.to(self.weight))

    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        grad = self._parameters["weight"].grad  # None while the rows are not drawn
        if grad is None:
            return None
        if not grad.is_sparse:
            raise RuntimeError(
                f"a sparse row optimizer needs sparse gradients, but this {self.num_rows}-row table has a dense "
                "gradient; place the model's tables with engram.storage.place_tables(..., sparse_grad=True) (or build "
                "the table with DeviceTable(..., sparse_grad=True)), or use a dense optimizer such as AdamW"
            )
        self._parameters["weight"].grad = None
        grad = grad.coalesce()  # sums repeated rows; keeps rows whose sum is zero (they were looked up)
        return grad.indices()[0], grad.values()

    def zero_row_grad(self) -> None:
        self._parameters["weight"].grad = None

    def _new_row_state(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.num_rows, *row_shape, dtype=dtype, device=self.home_device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.materialize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        self.materialize()  # the loaded rows then replace the drawn ones
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _apply(self, fn, recurse: bool = True):
        if self._pending_device is None:
            module = super()._apply(fn, recurse)
        else:  # rows not drawn yet: only record where, and in which dtype, they will be
            placeholder = self._parameters.pop("weight")
            like = fn(torch.empty(0, dtype=placeholder.dtype, device=self._pending_device))
            self._pending_device = like.device
            placeholder.data = torch.empty(placeholder.shape, dtype=like.dtype, device="meta")
            module = super()._apply(fn, recurse)
            self._parameters["weight"] = placeholder
        # Optimizer state follows the parameter when the model moves (model.to(device)).
        self._row_states = {name: fn(state) for name, state in self._row_states.items()}
        return module
