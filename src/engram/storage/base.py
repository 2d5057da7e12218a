"""The three interfaces of an Engram table: what the layer sees, what a row optimizer updates, durability.

- ``TableStorage``: the table an Engram layer looks rows up in (``lookup``, ``prefetch``,
  ``read_ahead``), with its
  shape, dtype and home device, the public (checked) ``read_rows``/``write_rows``, and the gradient
  of the rows looked up since the last step (``take_row_grad``, ``zero_row_grad``). Every tier is
  one, and so is a table sharded across processes (``ShardedTable``).
- ``LocalTable``: a ``TableStorage`` whose rows all live in this process, in one tier (device, host
  memory, disk). It is what a sparse row optimizer updates: unchecked row access (``gather``,
  ``scatter``) for the rows ``take_row_grad`` returned, ``begin_update``, and the row optimizer
  state it allocates in its own tier (``row_state``, ``read_state``, ``write_state``,
  ``row_states``). ``local_shard()`` leads from any table to its ``LocalTable``: the table itself,
  or a sharded table's shard on this rank.
- ``Durable``: a local table whose files are themselves the checkpoint (the disk tier): two-phase
  checkpoints, restore, ``check_untrained``. Checkpoint code asks ``durable(table)`` and copies the
  rows of every other table into the checkpoint instead.

Tables on the device, in host memory, on disk or across machines therefore plug in without
touching the layer or the optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from engram._checks import as_id_tensor, check_id_range

if TYPE_CHECKING:
    from concurrent.futures import Future

    from engram.storage.prefetch import PendingRows


class TableStorage(nn.Module, ABC):
    """A table of ``num_rows`` rows of width ``dim``: what an Engram layer and a trainer see.

    Subclasses implement ``lookup``, ``read_rows``, ``write_rows``, ``take_row_grad``,
    ``zero_row_grad``, ``local_shard``, ``dtype`` and ``home_device``; tiers off the device also
    override ``prefetch``, and the disk tier ``read_ahead``.
    """

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a table needs num_rows >= 1 and dim >= 1, got ({num_rows}, {dim})")
        self.num_rows = int(num_rows)
        self.dim = int(dim)

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the rows."""

    @property
    @abstractmethod
    def home_device(self) -> torch.device:
        """Where the rows (and the optimizer's row arithmetic) live."""

    # -- lookups ------------------------------------------------------------------------------------
    @abstractmethod
    def lookup(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        """Rows for ``indices`` of any shape: (*indices.shape, dim); gradients flow to the table.

        ``prefetched`` is what ``prefetch(indices)`` returned for these same indices.
        """

    def prefetch(self, indices: torch.Tensor) -> PendingRows | None:
        """Start fetching the rows of ``indices`` in the background; None where there is nothing to gain."""
        return None

    @property
    def reads_ahead(self) -> bool:
        """Whether ``read_ahead`` does anything for this table (only tiers whose rows may not be in memory)."""
        return False

    def read_ahead(self, indices: torch.Tensor) -> Future | None:
        """Start bringing the rows of a later lookup of ``indices`` (any shape) into memory; a hint only.

        Nothing is read for the lookup and nothing is kept for it, so the lookup returns the same
        values, however the table changes in between (an optimizer step): a disk table asks the kernel
        to read the rows' file pages into the page cache. Returns the background task (None when
        there is nothing to do; tiers whose rows are in memory always return None).
        """
        return None

    def forward(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        """``lookup(indices, prefetched)``, so that module hooks see table reads."""
        return self.lookup(indices, prefetched)

    # -- rows, checked: the way in for users, placement and checkpoints --------------------------------
    @abstractmethod
    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``rows`` (U,) as (U, dim), on ``home_device``, outside autograd."""

    @abstractmethod
    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set the distinct rows ``rows`` (U,) to ``values`` (U, dim)."""

    # -- row gradients ------------------------------------------------------------------------------
    @abstractmethod
    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gradient accumulated since the last call, per looked-up row, and clear it.

        Returns:
            ``(rows, grad)``: rows (U,) distinct, sorted, int64 and in range of ``local_shard()``,
            grad (U, dim) float, both on ``home_device``; rows that were looked up count even if
            their gradient is zero. None if no gradient reached the table.
        """

    @abstractmethod
    def zero_row_grad(self) -> None:
        """Forget any gradient accumulated since the last ``take_row_grad``."""

    @abstractmethod
    def local_shard(self) -> LocalTable:
        """This process's rows of the table: the table itself, or a sharded table's local shard.

        A sparse row optimizer updates it with the rows ``take_row_grad`` returns; the optimizer
        state and the durability (``durable``) of those rows belong to it.
        """

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


class LocalTable(TableStorage):
    """A table whose rows all live in this process, in one tier: what a sparse row optimizer updates.

    ``read_rows``/``write_rows`` check their rows and call ``gather``/``scatter``. The optimizer
    calls those directly, with the rows ``take_row_grad`` returned (distinct, sorted, int64, in
    range, on ``home_device``), and they trust them: no check runs inside a training step.

    Subclasses implement ``weight``, ``lookup``, ``take_row_grad``, ``zero_row_grad``, ``gather``,
    ``scatter``, ``_new_row_state``, ``dtype`` and ``home_device``.
    """

    def __init__(self, num_rows: int, dim: int):
        super().__init__(num_rows, dim)
        self._row_states: dict[str, torch.Tensor] = {}

    @property
    @abstractmethod
    def weight(self) -> torch.Tensor:
        """The (num_rows, dim) rows as the tier stores them (a parameter, a CPU tensor, a memory-mapped file),
        not a copy: for reading every row at once (checkpoints, conversion). Write through ``write_rows``."""

    def local_shard(self) -> LocalTable:
        return self

    @torch.no_grad()
    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.gather(self.check_rows(rows).to(self.home_device))

    @torch.no_grad()
    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        rows = self.check_rows(rows)
        self._check_values(rows, values)
        self.scatter(rows.to(self.home_device), values)

    # -- the optimizer's row access: rows as ``take_row_grad`` returns them, not checked -----------------
    @abstractmethod
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of the distinct in-range rows ``rows`` (U,) (int64, on ``home_device``): (U, dim), no autograd."""

    @abstractmethod
    def scatter(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set the distinct in-range rows ``rows`` (U,) (int64, on ``home_device``) to ``values`` (U, dim), cast."""

    def begin_update(self, rows: torch.Tensor) -> None:
        """Called by optimizers before they change ``rows`` (U,) of the table or its row state."""

    # -- row optimizer state, kept in the table's tier ------------------------------------------------
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


class Durable(ABC):
    """A local table that keeps its rows and optimizer state in files that are themselves the checkpoint.

    Checkpoints do not copy such a table; they bracket the checkpoint folder with two phases
    instead (docs/memory-tiers.md, "Disk tables"): ``prepare_checkpoint(step)``, write the folder,
    ``commit_checkpoint(step)``. Only the disk tier implements it.
    """

    @abstractmethod
    def flush(self) -> None:
        """Make every write so far durable."""

    @abstractmethod
    def prepare_checkpoint(self, step: int) -> None:
        """First phase of a checkpoint at ``step``: make the table's state durable."""

    @abstractmethod
    def commit_checkpoint(self, step: int) -> None:
        """Second phase, after the checkpoint folder is complete: ``step`` is now the table's restore point."""

    @abstractmethod
    def restore_checkpoint(self, step: int) -> None:
        """Bring the table back to its state at checkpoint ``step``, or raise."""

    @abstractmethod
    def check_untrained(self) -> None:
        """Raise if the table was already trained (a run starting at step 0 needs a fresh one)."""


def durable(table: TableStorage) -> Durable | None:
    """The part of ``table`` this process checkpoints in place (its local shard, if that is ``Durable``), or None."""
    shard = table.local_shard()
    return shard if isinstance(shard, Durable) else None
