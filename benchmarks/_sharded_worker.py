"""One rank of bench_sharded.py, run under torchrun: times lookups and training steps of a ShardedTable.

Usage::

    python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/_sharded_worker.py RUN_DIR

``RUN_DIR`` holds ``spec.json`` (table shape and seed, step counts, learning rate) and
``indices.pt``, the global batches' row ids, (steps, B, T, H) int64. Each rank builds only its own
shard (a ``HostTable`` whose rows equal the same rows of one seeded table, whatever the world size),
takes its B / N sequences of every batch, and times two phases, each step started together on every
rank by a barrier: lookups (eval, no grad), then training steps (lookup, backward of a weighted sum,
``RowAdam.step``), then lookups behind a fixed dense computation standing for the layers in front
of the Engram layer (``front_matmuls`` products of (tokens, front_dim) by (front_dim, front_dim)),
once with the rows exchange prefetched before that computation and once exchanged after it, the
order flipping every step. It writes ``rank<r>.json``: for every timed step of each phase, its wall
seconds, the seconds it spent inside the table's all_to_all calls (for a prefetched lookup, the
wait for the exchange), and the bytes it sent.
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


def behind_compute(spec: dict, tokens: int) -> Callable[[ShardedTable, torch.Tensor, bool], None]:
    """A step function: the front computation and a lookup, the exchange prefetched before it or not."""
    generator = torch.Generator().manual_seed(spec["seed"] + 2)
    hidden = torch.randn(tokens, spec["front_dim"], generator=generator)
    weight = torch.randn(spec["front_dim"], spec["front_dim"], generator=generator) / spec["front_dim"] ** 0.5

    def step(table: ShardedTable, indices: torch.Tensor, prefetch: bool) -> None:
        with torch.no_grad():
            pending = table.prefetch(indices) if prefetch else None  # EngramLM.forward does this at its start
            h = hidden
            for _ in range(spec["front_matmuls"]):
                h = torch.tanh(h @ weight)
            table.lookup(indices, pending)

    return step


def timed(table: ShardedTable, step: Callable[[], None]) -> dict[str, float]:
    """One step started together on every rank (a barrier), so the slowest rank's time is the step's."""
    dist.barrier()
    sent, comm = table.bytes_sent, table.comm_seconds
    began = time.perf_counter()
    step()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "comm_seconds": table.comm_seconds - comm, "bytes_sent": table.bytes_sent - sent}


def run_phase(
    table: ShardedTable, batches: torch.Tensor, warmup: int, step: Callable[[torch.Tensor], None]
) -> list[dict[str, float]]:
    """``step`` on every batch; the measurements of the batches after the first ``warmup``."""
    records = [timed(table, lambda indices=indices: step(indices)) for indices in batches]
    return records[warmup:]


def run_paired(
    table: ShardedTable, batches: torch.Tensor, warmup: int, step: Callable[[ShardedTable, torch.Tensor, bool], None]
) -> dict[str, list[dict[str, float]]]:
    """``step`` on every batch with prefetch on and off, the order flipping every batch; after ``warmup``."""
    records: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for i, indices in enumerate(batches):
        for prefetch in (True, False) if i % 2 == 0 else (False, True):
            record = timed(table, lambda indices=indices, prefetch=prefetch: step(table, indices, prefetch))
            if i >= warmup:
                records["on" if prefetch else "off"].append(record)
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
    table.eval()
    tokens = mine.shape[1] * mine.shape[2]
    overlap = run_paired(table, mine, spec["warmup"], behind_compute(spec, tokens))
    result = {"rank": rank, "world": world, "lookup": lookups, "training": training, "overlap": overlap}
    (run_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
