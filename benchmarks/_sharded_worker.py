"""One rank of bench_sharded.py, run under torchrun: times lookups and training steps of a ShardedTable.

Usage::

    python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/_sharded_worker.py RUN_DIR

``RUN_DIR`` holds ``spec.json`` (table shape and seed, step counts, learning rate) and
``indices.pt``, the global batches' row ids, (steps, B, T, H) int64. Each rank builds only its own
shard (a ``HostTable`` whose rows equal the same rows of one seeded table, whatever the world size),
takes its B / N sequences of every batch, and times two phases, each step started together on every
rank by a barrier: lookups (eval, no grad), then training steps (lookup, backward of a weighted sum,
``RowAdam.step``). It writes ``rank<r>.json``: for every timed step of each phase, its wall seconds,
the seconds it spent inside the table's all_to_all calls, and the bytes it sent.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from engram.storage import HostTable, ShardedTable, shard_ranges
from engram.training import RowAdam


def build_table(spec: dict, rank: int, world: int) -> ShardedTable:
    """This rank's shard of the seeded table, in host memory, wrapped in a ShardedTable."""
    start, end = shard_ranges(spec["rows"], world)[rank]
    local = HostTable(end - start, spec["dim"], init_std=spec["init_std"], seed=spec["seed"], first_row=start)
    return ShardedTable(spec["rows"], spec["dim"], local)


def loss_weights(spec: dict, shape: torch.Size) -> torch.Tensor:
    """Fixed random weights (B, T, H, dim) of the whole batch, the same for every world size."""
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    return torch.randn(*shape, spec["dim"], generator=generator)


def lookup_step(table: ShardedTable, indices: torch.Tensor) -> None:
    with torch.no_grad():
        table(indices)


def training_step(table: ShardedTable, optimizer: RowAdam, weights: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A step function: lookup, backward of a weighted mean over this rank's tokens, RowAdam step."""
    tokens = weights.shape[0] * weights.shape[1]

    def step(indices: torch.Tensor) -> None:
        rows = table(indices)
        loss = (rows * weights).sum() / tokens
        loss.backward()
        optimizer.step()  # collective: sends every row's gradient to its owner

    return step


def run_phase(
    table: ShardedTable, batches: torch.Tensor, warmup: int, step: Callable[[torch.Tensor], None]
) -> list[dict[str, float]]:
    """``step`` on every batch; the measurements of the batches after the first ``warmup``."""
    records = []
    for i, indices in enumerate(batches):
        dist.barrier()  # every rank starts the step together, so the slowest rank's time is the step's
        sent, comm = table.bytes_sent, table.comm_seconds
        began = time.perf_counter()
        step(indices)
        seconds = time.perf_counter() - began
        if i >= warmup:
            records.append(
                {"seconds": seconds, "comm_seconds": table.comm_seconds - comm, "bytes_sent": table.bytes_sent - sent}
            )
    return records


def main() -> None:
    run_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = json.loads((run_dir / "spec.json").read_text())
    indices = torch.load(run_dir / "indices.pt")
    per_rank = indices.shape[1] // world
    mine = indices[:, rank * per_rank : (rank + 1) * per_rank]  # this rank's sequences of every batch

    table = build_table(spec, rank, world)
    optimizer = RowAdam([table], lr=spec["lr"])  # allocates its state now, outside the timed steps
    weights = loss_weights(spec, indices.shape[1:])[rank * per_rank : (rank + 1) * per_rank]

    table.eval()
    lookups = run_phase(table, mine, spec["warmup"], lambda batch: lookup_step(table, batch))
    table.train()
    training = run_phase(table, mine, spec["warmup"], training_step(table, optimizer, weights))
    result = {"rank": rank, "world": world, "lookup": lookups, "training": training}
    (run_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
