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

Bytes exchanged per lookup: U x 8 (ids) out, U x dim x itemsize (rows) back, and the same row bytes
again for the gradient: the minimum for moving each distinct row once each way.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.distributed as dist

from engram.storage.base import LocalTable, TableStorage
from engram.storage.prefetch import FetchedRows, PendingRows
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

    def _exchange(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """all_to_all of ``tensor`` (sum(send_counts), ...) grouped by destination rank."""
        device = self._comm_device()
        out = torch.empty(sum(recv_counts), *tensor.shape[1:], dtype=tensor.dtype, device=device)
        tensor = tensor.to(device).contiguous()
        began = time.perf_counter()
        dist.all_to_all_single(out, tensor, recv_counts, send_counts, group=self.group)
        self.comm_seconds += time.perf_counter() - began
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return out

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
    def fetch(self, indices: torch.Tensor) -> FetchedRows:
        """Collective: the distinct rows of ``indices``, gathered from their owners."""
        rows, inverse = torch.unique(indices.reshape(-1), sorted=True, return_inverse=True)
        rows = self.check_rows(rows)
        send, recv = self._counts(rows)
        asked = self._exchange(rows, send, recv)  # rows other ranks want from me (global ids)
        # in range by construction: each rank checked its own rows and sent them to their owners
        served = self.local.gather(asked.to(self.local.home_device) - self.start)
        values = self._exchange(served, recv, send).to(indices.device)  # (U, dim), in the order of rows
        return FetchedRows(rows.cpu(), inverse.view(indices.shape), values)

    def prefetch(self, indices: torch.Tensor) -> PendingRows | None:
        # Collectives must be issued in the same order on every rank; a background thread per rank
        # would not guarantee it, so sharded lookups run in the layer.
        return None

    def lookup(self, indices: torch.Tensor, prefetched: PendingRows | None = None) -> torch.Tensor:
        return self._row_grads.expand(self.fetch(indices), track=self.training and torch.is_grad_enabled())

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
        if rows.numel() and (int(rows.min()) < self.start or int(rows.max()) >= self.end):
            owned = f"[{self.start}, {self.end})"
            raise ValueError(f"rank {self.rank} owns rows {owned} only; write the others on their owners")
        self.local.write_rows(rows - self.start, values)

    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Collective: the gradient of the rows this rank owns (mean or sum over ranks), as ids of ``local``."""
        total = self._row_grads.take(self.num_rows, self.dim)
        if total is not None:
            rows, grads = total.indices()[0], total.values()
        else:  # this rank looked nothing up, but the others may send it gradients
            rows = torch.empty(0, dtype=torch.long)
            grads = torch.empty(0, self.dim, dtype=torch.float32)
        send, recv = self._counts(rows.cpu())
        owned_rows = self._exchange(rows, send, recv)
        owned_grads = self._exchange(grads.float(), send, recv)
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
        return f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, rows=[{self.start}, {self.end})"
