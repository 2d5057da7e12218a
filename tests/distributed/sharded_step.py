"""One training step of a row-sharded table, run under torchrun; each rank writes what it saw.

Usage: torchrun --nproc-per-node N tests/distributed/sharded_step.py OUT_DIR TIER

Every rank builds the same full table and the same combined batch (seeded), keeps its shard of the
rows and its slice of the batch, looks up, backpropagates a sum loss and takes one RowAdam step.
It writes ``rank<r>.safetensors``: its loss, its shard's rows and the rows its lookup returned, and
the gradient its own rows receive when the ranks' gradients are averaged (``grad_reduction="mean"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from engram.storage import DeviceTable, DiskTable, HostTable
from engram.storage.sharded import ShardedTable, shard_ranges
from engram.training import RowAdam

ROWS, DIM, BATCH, LENGTH, HEADS = 1003, 6, 8, 5, 3


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full table (ROWS, DIM), the combined batch's indices (BATCH, LENGTH, HEADS) and loss weights."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(ROWS, DIM, generator=generator)
    indices = torch.randint(0, ROWS, (BATCH, LENGTH, HEADS), generator=generator)
    indices[:, :, 0] = indices[:, :, 0] % 50  # frequent rows, looked up by several ranks
    weights = torch.randn(BATCH, LENGTH, HEADS, DIM, generator=generator)
    return table, indices, weights


def main() -> None:
    out_dir, tier = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    table, indices, weights = problem()
    start, end = shard_ranges(ROWS, world)[rank]
    if tier == "device":
        local = DeviceTable(end - start, DIM)
    elif tier == "host":
        local = HostTable(end - start, DIM)
    else:
        local = DiskTable(out_dir / f"shard{rank}", end - start, DIM, init_std=0.0, write_buffer_bytes=1 << 16)
    local.write_rows(torch.arange(end - start), table[start:end])
    sharded = ShardedTable(ROWS, DIM, local, grad_reduction="sum").train()  # the loss is a sum over ranks
    optimizer = RowAdam([sharded], lr=0.1)
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # this rank's sequences
    looked_up = sharded(indices[mine])
    loss = (looked_up * weights[mine]).sum()
    loss.backward()
    optimizer.step()
    shard = local.read_rows(torch.arange(end - start))
    # The same loss through a table that averages the ranks' gradients (as DDP does for dense ones).
    averaging = ShardedTable(ROWS, DIM, local).train()
    (averaging(indices[mine]) * weights[mine]).sum().backward()
    grad_rows, grads = averaging.take_row_grad()
    save_file(
        {
            "loss": loss.detach().reshape(1),
            "shard": shard,
            "looked_up": looked_up.detach().contiguous(),
            "bytes_sent": torch.tensor([sharded.bytes_sent]),
            "grad_rows": grad_rows + start,
            "mean_grads": grads.contiguous(),
        },
        str(out_dir / f"rank{rank}.safetensors"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
