"""A table split by rows across the processes of a ``torch.distributed`` group.

Rank r owns the contiguous rows ``[starts[r], starts[r+1])`` (``shard_ranges``: equal shards, a
shorter last one) and keeps them in a local table of any tier (device, host, disk). Every lookup
is collective: all ranks call it in the same order, as they do when they run the same model.

Forward, for the distinct rows U of this rank's batch (sorted, so grouped by owner):

    counts  -- all_to_all -->  how many rows each rank asks of me
    rows    -- all_to_all -->  the rows asked of me;  I gather them from my local table
    values  <-- all_to_all --  the rows I asked for, in the order I asked (that is, sorted)

Backward leaves each rank a gradient for its U rows; ``take_row_grad`` sends every row's gradient
to its owner the same way, and the owner sums what it receives and divides by the world size: each
rank's loss is the mean over its own tokens, so this is the gradient of the mean over the combined
batch, as DDP's all-reduce gives the dense parameters. The sparse optimizer then updates the owner's
local table (``local_shard``), whose state lives in the local tier; a disk shard is checkpointed in
place (``Durable``), and the sharded table itself has no durability of its own.

Prefetch: ``prefetch(indices)`` runs the counts and ids exchanges and the owner's gather at once,
then *starts* the rows exchange (``all_to_all_single(..., async_op=True)``) and returns a
``PendingExchange``; the layer's ``lookup`` waits for it. ``EngramLM.forward`` calls ``prefetch``
for every Engram layer at its start, in layer order, so the rows of every sharded layer travel while
the layers in front of it compute. Every collective is still issued by the main thread, in program
order: forward start (each sharded layer in layer order), then, after backward, ``take_row_grad``
of each table in the optimizer's order. Every rank runs the same program, so every rank issues the
same collectives in the same order; gloo matches collectives by the order they were issued in (a
tag per call), and NCCL runs them in that order on the communicator's stream, so an exchange in
flight never meets another one across ranks. No background thread issues collectives.

A ``PendingExchange`` holds the rows as they were when it was started, so it is refused when that
may no longer be true: for other indices than it was started for, a second time, after an
optimizer step of the table (``take_row_grad``, a collective, so every rank refuses together), and
``write_rows`` is refused while one is outstanding.

Bytes exchanged per lookup: U x 8 (ids) out, U x dim x itemsize (rows) back, and the same row bytes
again for the gradient: the minimum for moving each distinct row once each way.
"""

from __future__ import annotations

import time
import weakref
from typing import Literal

import torch
import torch.distributed as dist

from engram.storage.base import LocalTable, TableStorage
from engram.storage.prefetch import FetchedRows, check_same_indices
from engram.storage.row_grad import RowGradients


def shard_ranges(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """The row range [start, end) of each rank: ceil(num_rows / world_size) rows each, the last shorter."""
    if num_rows < world_size:
        raise ValueError(f"cannot shard {num_rows} rows over {world_size} ranks: every rank needs at least one row")
    size = -(-num_rows // world_size)
    return [(min(r * size, num_rows), min((r + 1) * size, num_rows)) for r in range(world_size)]


class ShardedTable(TableStorage):
    """A ``num_rows`` x ``dim`` table whose rows are spread over the ranks of ``group``.

    Args:
        num_rows, dim: the whole table's shape.
        local: this rank's shard, a ``LocalTable`` of ``end - start`` rows (``shard_ranges``) in any tier.
        group: the process group (default: the world).
        grad_reduction: ``"mean"`` (default, as DDP) or ``"sum"`` of the ranks' gradients of a row.
        prefetch: ``prefetch`` starts the rows exchange (True, default); False: every lookup exchanges
            in the layer, and ``prefetch`` returns None.

    Attributes:
        bytes_sent: payload bytes this rank has passed to all_to_all (ids, rows and gradients), for
            benchmarks; this includes the part addressed to the rank itself, a local copy.
        comm_seconds: wall time this rank has spent in the exchanges (host side: with NCCL this is
            the time to enqueue them unless the caller synchronises).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        local: LocalTable,
        group: dist.ProcessGroup | None = None,
        grad_reduction: Literal["mean", "sum"] = "mean",
        prefetch: bool = True,
    ):
        super().__init__(num_rows, dim)
        if not dist.is_initialized():
            raise RuntimeError("a ShardedTable needs torch.distributed: call init_process_group first (torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.ranges = shard_ranges(num_rows, self.world_size)  # every rank's [start, end)
        self.start, self.end = self.ranges[self.rank]
        if not isinstance(local, LocalTable):
            raise TypeError(f"a ShardedTable's local shard must be a LocalTable (a tier), got {type(local).__name__}")
        if (local.num_rows, local.dim) != (self.end - self.start, dim):
            raise ValueError(
                f"rank {self.rank} owns rows [{self.start}, {self.end}) of the table: its local table must be "
                f"({self.end - self.start}, {dim}), got ({local.num_rows}, {local.dim})"
            )
        self.local = local
        bounds = torch.tensor([end for _, end in self.ranges[:-1]], dtype=torch.long)  # first row of ranks 1..W-1
        self.register_buffer("bounds", bounds, persistent=False)
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
        self.grad_reduction = grad_reduction
        self._row_grads = RowGradients()
        self.prefetch_enabled = prefetch
        self._updates = 0  # optimizer steps so far (take_row_grad calls), equal on every rank: they are collective
        self._pending: weakref.WeakSet[PendingExchange] = weakref.WeakSet()  # started, not yet consumed
        self.bytes_sent = 0
        self.comm_seconds = 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def home_device(self) -> torch.device:
        return self.local.home_device

    def local_shard(self) -> LocalTable:
        """This rank's rows ``[start, end)``: the optimizer updates them, and checkpoints save (or, for a
        ``Durable`` shard, bracket) them."""
        return self.local

    # -- the exchange ------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        """Where tensors must be for the group's backend (the current GPU for NCCL, else the CPU)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _exchange(
        self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], async_op: bool = False
    ) -> tuple[torch.Tensor, dist.Work | None]:
        """all_to_all of ``tensor`` (sum(send_counts), ...) grouped by destination rank.

        Returns the received (sum(recv_counts), ...) tensor and, with ``async_op``, the work to wait
        for before reading it (None otherwise).
        """
        device = self._comm_device()
        out = torch.empty(sum(recv_counts), *tensor.shape[1:], dtype=tensor.dtype, device=device)
        tensor = tensor.to(device).contiguous()
        began = time.perf_counter()
        work = dist.all_to_all_single(out, tensor, recv_counts, send_counts, group=self.group, async_op=async_op)
        self.comm_seconds += time.perf_counter() - began
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return out, work

    def _counts(self, rows: torch.Tensor) -> tuple[list[int], list[int]]:
        """Rows (U,) sorted -> how many go to each owner, and how many each rank sends to me."""
        owners = torch.bucketize(rows, self.bounds.to(rows.device), right=True)
        send = torch.bincount(owners, minlength=self.world_size).to(self._comm_device())
        recv = torch.empty_like(send)
        began = time.perf_counter()
        dist.all_to_all_single(recv, send, group=self.group)
        self.comm_seconds += time.perf_counter() - began
        return send.tolist(), recv.tolist()

    # -- reading ------------------------------------------------------------------------------------------
    def _start_fetch(self, indices: torch.Tensor, async_op: bool) -> tuple[FetchedRows, dist.Work | None]:
        """Collective: the distinct rows of ``indices``, their owners asked and the rows sent back.

        Returns the ``FetchedRows`` (rows (U,) on the CPU, inverse (*indices.shape), values (U, dim)
        on the exchange's device, in the order of rows) and, with ``async_op``, the work of the rows
        exchange, which must be waited for before ``values`` are read.
        """
        rows, inverse = torch.unique(indices.reshape(-1), sorted=True, return_inverse=True)
        rows = self.check_rows(rows)
        send, recv = self._counts(rows)
        asked, _ = self._exchange(rows, send, recv)  # rows other ranks want from me (global ids)
        # in range by construction: each rank checked its own rows and sent them to their owners
        served = self.local.gather(asked.to(self.local.home_device) - self.start)
        values, work = self._exchange(served, recv, send, async_op=async_op)
        return FetchedRows(rows.cpu(), inverse.view(indices.shape), values), work

    def fetch(self, indices: torch.Tensor) -> FetchedRows:
        """Collective: the distinct rows of ``indices``, gathered from their owners."""
        fetched, _ = self._start_fetch(indices, async_op=False)
        fetched.values = fetched.values.to(indices.device)  # (U, dim), in the order of rows
        return fetched

    def prefetch(self, indices: torch.Tensor) -> PendingExchange | None:
        """Collective: start the exchange of the rows of ``indices``; ``lookup(indices, <this>)`` waits for it.

        Every rank must call it where the others do (``EngramLM.forward`` does, at its start, for
        every Engram layer in layer order). None when ``prefetch_enabled`` is False.
        """
        if not self.prefetch_enabled:
            return None
        fetched, work = self._start_fetch(indices, async_op=True)
        pending = PendingExchange(self, indices, fetched, work)
        self._pending.add(pending)
        return pending

    def lookup(self, indices: torch.Tensor, prefetched: PendingExchange | None = None) -> torch.Tensor:
        fetched = prefetched.result(indices) if prefetched is not None else self.fetch(indices)
        return self._row_grads.expand(fetched, track=self.training and torch.is_grad_enabled())

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Collective: rows (U,) distinct, global ids, from their owners."""
        rows = self.check_rows(rows)
        fetched = self.fetch(rows)
        return fetched.values[fetched.inverse]

    # -- writing ------------------------------------------------------------------------------------------
    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows this rank owns (global ids); other ranks' rows are refused."""
        rows = self.check_rows(rows)
        self._check_values(rows, values)
        if len(self._pending):
            raise RuntimeError(
                f"{len(self._pending)} prefetched lookup(s) of this table are outstanding and hold rows read before "
                "this write; look them up (or drop them) before writing rows"
            )
        if rows.numel() and (int(rows.min()) < self.start or int(rows.max()) >= self.end):
            owned = f"[{self.start}, {self.end})"
            raise ValueError(f"rank {self.rank} owns rows {owned} only; write the others on their owners")
        self.local.write_rows(rows - self.start, values)

    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Collective: the gradient of the rows this rank owns (mean or sum over ranks), as ids of ``local``."""
        self._updates += 1  # the rows change now: prefetches started before are stale (PendingExchange.result)
        total = self._row_grads.take(self.num_rows, self.dim)
        if total is not None:
            rows, grads = total.indices()[0], total.values()
        else:  # this rank looked nothing up, but the others may send it gradients
            rows = torch.empty(0, dtype=torch.long)
            grads = torch.empty(0, self.dim, dtype=torch.float32)
        send, recv = self._counts(rows.cpu())
        owned_rows, _ = self._exchange(rows, send, recv)
        owned_grads, _ = self._exchange(grads.float(), send, recv)
        if owned_rows.numel() == 0:
            return None
        shape = (self.end - self.start, self.dim)
        local = owned_rows.to(self.local.home_device) - self.start
        grads = owned_grads.to(local.device)
        if self.grad_reduction == "mean":
            grads = grads / self.world_size
        summed = torch.sparse_coo_tensor(local.unsqueeze(0), grads, shape, check_invariants=False).coalesce()
        return summed.indices()[0], summed.values()

    def zero_row_grad(self) -> None:
        self._row_grads.zero()

    def extra_repr(self) -> str:
        rows = f"rows=[{self.start}, {self.end})"
        return f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, {rows}, prefetch={self.prefetch_enabled}"


class PendingExchange:
    """A sharded lookup whose rows exchange was started by ``ShardedTable.prefetch``; single use.

    ``result(indices)`` waits for the exchange and returns the rows; it raises (on every rank alike
    where the cause is collective) instead of serving rows that may be wrong.
    """

    def __init__(self, table: ShardedTable, indices: torch.Tensor, fetched: FetchedRows, work: dist.Work | None):
        self.table = table
        self.indices = indices
        self._fetched = fetched
        self._work = work
        self._updates = table._updates
        self.consumed = False

    def result(self, indices: torch.Tensor) -> FetchedRows:
        """The rows of ``indices``, once the exchange has arrived.

        Raises:
            RuntimeError: ``indices`` are not those of the prefetch; the result was taken already;
                or the table took an optimizer step since the prefetch (its rows changed: prefetch
                after the step).
        """
        check_same_indices(self.indices, indices)
        if self.consumed:
            raise RuntimeError("this prefetched lookup was used already; call prefetch() again for another lookup")
        self.consumed = True
        self.table._pending.discard(self)
        if self._work is not None:  # wait even when refusing below: the exchange was issued on every rank
            began = time.perf_counter()
            self._work.wait()
            self.table.comm_seconds += time.perf_counter() - began
            self._work = None
        if self._updates != self.table._updates:
            raise RuntimeError(
                f"these rows were prefetched before {self.table._updates - self._updates} optimizer step(s) of the "
                "table and may be stale; prefetch after the step (EngramLM.forward does, at its start)"
            )
        self._fetched.values = self._fetched.values.to(indices.device)
        return self._fetched
