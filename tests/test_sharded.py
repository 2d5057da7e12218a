"""Row-sharded tables on 2 and 4 processes (gloo on loopback) against one process on the combined batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engram.storage import HostTable
from engram.storage.sharded import shard_ranges
from engram.training import RowAdam
from tests.cli_runs import finish, launch_torchrun
from tests.distributed.sharded_step import DIM, ROWS, problem

SCRIPT = Path(__file__).resolve().parent / "distributed" / "sharded_step.py"


def _torchrun(nproc: int, out_dir: Path, tier: str) -> None:
    code, output = finish(launch_torchrun(nproc, [str(SCRIPT), str(out_dir), tier]), timeout=120)
    assert code == 0, output[-3000:]


def test_shard_ranges_cover_the_table_with_a_shorter_last_shard():
    assert shard_ranges(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert shard_ranges(8, 2) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="at least one row"):
        shard_ranges(3, 4)


@pytest.mark.parametrize(("nproc", "tier"), [(2, "host"), (4, "disk"), (4, "device")])
def test_a_sharded_step_equals_one_process_on_the_combined_batch(tmp_path, nproc, tier):
    _torchrun(nproc, tmp_path, tier)
    table, indices, weights = problem()
    reference = HostTable(ROWS, DIM)
    reference.write_rows(torch.arange(ROWS), table)
    reference.train()
    looked_up = reference(indices)
    loss = (looked_up * weights).sum()
    loss.backward()
    rows, grads = reference.take_row_grad()  # the summed gradient of every looked-up row
    reference(indices).mul(weights).sum().backward()  # again, for the optimizer
    RowAdam([reference], lr=0.1).step()
    expected_rows = reference.read_rows(torch.arange(ROWS))

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(nproc)]
    assert torch.equal(torch.cat([r["looked_up"] for r in ranks]), looked_up.detach())  # lookups are exact
    torch.testing.assert_close(sum(r["loss"] for r in ranks)[0], loss.detach(), rtol=1e-5, atol=1e-4)
    shards = torch.cat([r["shard"] for r in ranks])
    assert not torch.equal(shards, table)  # the step changed rows
    torch.testing.assert_close(shards, expected_rows, rtol=1e-5, atol=1e-6)
    # Averaging owners receive the combined batch's gradient over the number of ranks, for every looked-up row.
    assert torch.equal(torch.cat([r["grad_rows"] for r in ranks]), rows)
    torch.testing.assert_close(torch.cat([r["mean_grads"] for r in ranks]), grads / nproc)
    # Each distinct row of a rank's batch crossed once each way, with its id: the minimum exchange.
    for rank, saved in enumerate(ranks):
        mine = indices[rank * len(indices) // nproc : (rank + 1) * len(indices) // nproc]
        distinct = mine.unique().numel()
        assert int(saved["bytes_sent"]) >= distinct * DIM * 4  # at least its gradient rows went out
