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
from tests.distributed import sharded_prefetch
from tests.distributed.sharded_step import DIM, ROWS, problem

SCRIPT = Path(__file__).resolve().parent / "distributed" / "sharded_step.py"
PREFETCH_SCRIPT = Path(sharded_prefetch.__file__)


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


def test_prefetched_sharded_lookups_equal_lookups_in_the_layer_and_one_process(tmp_path):
    """Two Engram layers sharded over 2 ranks, prefetch on and off, against one process on the combined batch."""
    code, output = finish(launch_torchrun(2, [str(PREFETCH_SCRIPT), str(tmp_path)]), timeout=120)
    assert code == 0, output[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for saved in ranks:  # prefetch changes when the rows travel, never what arrives
        for key in (k for k in saved if k.startswith("on/")):
            assert torch.equal(saved[key], saved["off/" + key[3:]]), key

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, so the same bits
    try:
        reference = sharded_prefetch.run(sharded_prefetch.build(True), sharded_prefetch.rank_parts(2))
    finally:
        torch.set_num_threads(threads)
    combined = {key: torch.cat([r[f"on/{key}"] for r in ranks]) for key in ("logits_before", "logits_after")}
    assert torch.equal(combined["logits_before"], reference["logits_before"])  # lookups are exact
    losses = torch.cat([r["on/losses"] for r in ranks], dim=1)  # (steps, ranks)
    assert torch.equal(losses[0], reference["losses"][0])  # before any update
    torch.testing.assert_close(losses, reference["losses"], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(combined["logits_after"], reference["logits_after"], rtol=1e-5, atol=1e-5)
    # The owners sum the ranks' row gradients in another association than one process: rows agree to
    # float rounding, except an element whose gradient is nearly zero, which Adam may move further
    # (at most the learning rate, 1e-2; a missed update moves whole rows by about that).
    for i in range(2):
        for name, tolerance in ((f"table{i}", 1e-4), (f"table{i}_exp_avg", 1e-8), (f"table{i}_exp_avg_sq", 1e-10)):
            shards = torch.cat([r[f"on/{name}"] for r in ranks])
            torch.testing.assert_close(
                shards, reference[name], rtol=1e-5, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}"
            )
    initial = sharded_prefetch.build(True).engram_tables()[0]
    assert not torch.equal(reference["table0"], initial.read_rows(torch.arange(initial.num_rows)))  # rows trained

    # Each misuse of a prefetched lookup was refused, with its own message, on every rank.
    cases = ("other_indices", "second_use", "write_while_outstanding", "stale_after_step")
    for saved in ranks:
        assert {key: float(saved.get(f"refused/{key}", 0)) for key in cases} == dict.fromkeys(cases, 1.0)
