"""The interface through which an Engram layer and a sparse optimizer reach an embedding table.

The layer only asks for rows by index (differentiably), possibly through rows fetched ahead of
time (``prefetch``); a sparse optimizer takes the summed gradient of the rows a step looked up
(``take_row_grad``), reads and writes those rows and keeps its per-row state in arrays the table
allocates in its own tier (``row_state``). Tables on the device, in host memory, on disk or across
machines therefore plug in without touching the layer or the optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from engram._checks import as_id_tensor, check_id_range

if TYPE_CHECKING:
    from engram.storage.prefetch import PendingRows


class TableStorage(nn.Module, ABC):
    """A table of ``num_rows`` rows of width ``dim``.

    Subclasses implement ``lookup``, ``read_rows``, ``write_rows``, ``take_row_grad``,
    ``zero_row_grad`` and ``_new_row_state``; tiers off the device also override ``prefetch``
    and the checkpoint hooks.
    """

    #: True when the tier keeps the table and its optimizer state in files that are themselves the
    #: checkpoint (``prepare_checkpoint``/``commit_checkpoint``), so checkpoints must not copy them.
    persists_itself = False

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a table needs num_rows >= 1 and dim >= 1, got ({num_rows}, {dim})")
        self.num_rows = int(num_rows)
        self.dim = int(dim)
        self._row_states: dict[str, torch.Tensor] = {}

    # -- reading -----------------------------------------------------------------------------------
    @abstractmethod
    def lookup(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        """Rows for ``indices`` of any shape: (*indices.shape, dim); gradients flow to the table.

        ``prefetched`` is what ``prefetch(indices)`` returned for these same indices.
        """

    def prefetch(self, indices: torch.Tensor) -> PendingRows | None:
        """Start fetching the rows of ``indices`` in the background; None where there is nothing to gain."""
        return None

    def forward(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        """``lookup(indices, prefetched)``, so that module hooks see table reads."""
        return self.lookup(indices, prefetched)

    @abstractmethod
    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``rows`` (U,) as (U, dim), on ``home_device``, outside autograd."""

    # -- writing (sparse optimizers) -----------------------------------------------------------------
    @abstractmethod
    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set the distinct rows ``rows`` (U,) to ``values`` (U, dim)."""

    def apply_sparse_update(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``delta`` (U, dim) to the rows ``rows`` (U,); repeated rows accumulate."""
        rows = self.check_rows(rows)
        if delta.shape != (rows.numel(), self.dim):
            raise ValueError(f"delta must have shape ({rows.numel()}, {self.dim}), got {tuple(delta.shape)}")
        unique, inverse = torch.unique(rows, return_inverse=True)
        current = self.read_rows(unique)
        summed = torch.zeros_like(current).index_add_(0, inverse.to(current.device), delta.to(current))
        self.begin_update(unique)
        self.write_rows(unique, current + summed)

    @abstractmethod
    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gradient accumulated since the last call, per looked-up row, and clear it.

        Returns:
            ``(rows, grad)``: rows (U,) distinct, sorted, int64 and grad (U, dim) float, both on
            ``home_device``; rows that were looked up count even if their gradient is zero. None
            if no gradient reached the table.
        """

    @abstractmethod
    def zero_row_grad(self) -> None:
        """Forget any gradient accumulated since the last ``take_row_grad``."""

    def optimizer_target(self) -> TableStorage:
        """The table a sparse optimizer updates with the rows ``take_row_grad`` returns (and whose
        ``row_state`` it keeps): this table, or for a sharded table this rank's local shard."""
        return self

    def begin_update(self, rows: torch.Tensor) -> None:
        """Called by optimizers before they change ``rows`` (U,) of the table or its row state."""

    # -- optimizer state, kept in the table's tier ------------------------------------------------------
    def row_state(self, name: str, row_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The optimizer state array ``name``, (num_rows, *row_shape), zeros when first asked for.

        It lives where the table lives (device memory, host memory, a file next to the table), so
        a sparse optimizer reads and writes only the rows it updates.
        """
        state = self._row_states.get(name)
        if state is None:
            state = self._new_row_state(name, tuple(row_shape), dtype)
            self._row_states[name] = state
        elif state.shape[1:] != tuple(row_shape) or state.dtype != dtype:
            raise ValueError(
                f"row state {name!r} exists with shape {tuple(state.shape[1:])} and dtype {state.dtype}, "
                f"asked for {tuple(row_shape)} and {dtype}"
            )
        return state

    def read_state(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows (U,) of state array ``name``: (U, *row_shape)."""
        return self._row_states[name].index_select(0, rows)

    def write_state(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set the distinct rows (U,) of state array ``name`` to ``values`` (U, *row_shape)."""
        state = self._row_states[name]
        state.index_copy_(0, rows, values.to(state.dtype))

    def row_states(self) -> dict[str, torch.Tensor]:
        """Every optimizer state array allocated so far, by name."""
        return dict(self._row_states)

    @abstractmethod
    def _new_row_state(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate a zero state array (num_rows, *row_shape) in this tier."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows (tiers without a local ``weight`` override this)."""
        return self.weight.dtype

    # -- durability ---------------------------------------------------------------------------------
    @property
    def home_device(self) -> torch.device:
        """Where the rows (and the optimizer's row arithmetic) live."""
        return torch.device("cpu")

    def flush(self) -> None:
        """Make every write so far durable (file-backed tiers)."""

    def prepare_checkpoint(self, step: int) -> None:
        """First phase of a checkpoint at ``step``: make the table's state durable (``persists_itself`` tiers)."""

    def commit_checkpoint(self, step: int) -> None:
        """Second phase, after the checkpoint folder is complete: ``step`` is now the table's restore point."""

    def check_untrained(self) -> None:
        """Raise if a table that persists itself was already trained (a run starting at step 0 needs a fresh one)."""

    def restore_checkpoint(self, step: int) -> None:
        """Bring the table back to its state at checkpoint ``step`` (``persists_itself`` tiers), or raise."""

    # -- validation ---------------------------------------------------------------------------------
    def check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Validate row indices (integer, in range) and return them as int64."""
        rows = as_id_tensor(rows, "rows")
        check_id_range(rows, 0, self.num_rows, "rows", f" of this {self.num_rows}-row table")
        return rows

    def _check_values(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        if not isinstance(values, torch.Tensor) or values.shape != (rows.numel(), self.dim):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"values must have shape ({rows.numel()}, {self.dim}), got {shape}")

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}"
