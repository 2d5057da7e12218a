"""`engram train` on several processes (torchrun, gloo on loopback) against one process on the same batches.

A step on N ranks splits the batch, shards the tables and averages the gradients; it must compute
what one process computes on the whole batch, whatever the number of ranks, and a run must move
between world sizes through its checkpoints (re-sharding the tables) without changing its course.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engram.storage import DiskTable
from engram.storage.sharded import shard_ranges
from engram.training.checkpoint import latest_checkpoint, load_checkpoint, read_manifest, read_tensors
from engram.training.errors import DamagedCheckpointError
from engram.training.run import load_run
from tests.cli_runs import finish, launch_torchrun, make_workspace, run_engram
from tests.distributed import checkpoint_ranks

CHECKPOINT_RANKS = Path(checkpoint_ranks.__file__)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("distributed"))


def _train_args(ws: dict[str, Path], run: Path, steps: int, *sets: str) -> list[str]:
    # A constant schedule, so that a run continued with more steps follows the one trained straight through.
    settings = [
        f"train.steps={steps}",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.schedule=constant",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "train.checkpoint_every=3",
        "train.log_every=1",
        *sets,
    ]
    files = ["--data", ws["data"], "--model", ws["model"], "--tokenizer", ws["tokenizer"], "--out", run]
    return ["train", *map(str, files), "--no-progress", *[a for s in settings for a in ("--set", s)]]


def _launch(nproc: int, args: list[str], cache: Path) -> subprocess.Popen:
    return launch_torchrun(nproc, ["-m", "engram", *args], env={"ENGRAM_CACHE_DIR": str(cache)})


def _train(ws: dict[str, Path], nproc: int, run: Path, steps: int, *sets: str) -> None:
    args = _train_args(ws, run, steps, *sets)
    if nproc == 1:  # no launcher: the plain command
        result = run_engram(*args, cache=ws["root"])
        assert result.returncode == 0, result.stderr[-3000:]
        return
    code, output = finish(_launch(nproc, args, ws["root"]), timeout=240)
    assert code == 0, output[-3000:]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _state(run: Path) -> dict[str, torch.Tensor]:
    """Every table array (``tables/<layer>/<name>``, whole) and every dense weight (``model/...``) of the newest
    checkpoint."""
    return read_tensors(latest_checkpoint(run / "checkpoints"), ("model/", "tables/"))


def _assert_same_training(run: Path, reference: Path, steps: range, reference_state: dict[str, torch.Tensor]):
    """The losses of ``steps`` and the newest checkpoint of ``run`` are those of ``reference``, to float rounding.

    Adam divides by the root of the second moment, so an element whose gradient is nearly zero (near
    Adam's eps) can move by up to the learning rate (3e-3) on rounding alone. So: at most 0.1% of the
    elements of an array differ by more than 1e-4, the mean difference stays below 1e-5 (a wrong
    gradient or a missed update moves whole arrays by about the learning rate), integer state is equal.
    """
    losses, expected = _losses(run), _losses(reference)
    for step in steps:
        assert losses[step] == pytest.approx(expected[step], rel=1e-6), step
    _assert_close_states(_state(run), reference_state)


def _assert_close_states(state: dict[str, torch.Tensor], reference_state: dict[str, torch.Tensor]) -> None:
    """``_assert_same_training``'s comparison of arrays."""
    assert state.keys() == reference_state.keys()
    for name, value in reference_state.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(state[name], value), name
            continue
        difference = (state[name].double() - value.double()).abs()
        far = (difference > 1e-4).double().mean()
        assert far <= 1e-3 and difference.mean() < 1e-5, (name, float(far), float(difference.mean()))


@pytest.fixture(scope="module")
def reference(workspace) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """One process trained 3, 6 and 9 steps (resuming each time), and its checkpoint after each."""
    run = workspace["root"] / "reference"
    expected = {}
    for steps in (3, 6, 9):
        _train(workspace, 1, run, steps)
        expected[steps] = _state(run)
    changed = expected[9]["tables/1/weight"] != expected[3]["tables/1/weight"]
    assert changed.any(dim=1).sum() > 100  # the steps update many rows, all of them compared
    return run, expected


def test_ranks_2_then_4_then_one_process_train_like_one_process_and_reshard(workspace, reference):
    reference, expected = reference
    sharded = workspace["root"] / "sharded"
    # 3 steps on 2 ranks, then 3 on 4 ranks, then 3 on one process: each leg re-shards the checkpoint
    for nproc, steps in ((2, 3), (4, 6), (1, 9)):
        _train(workspace, nproc, sharded, steps)
        checkpoint = latest_checkpoint(sharded / "checkpoints")
        assert checkpoint.name == f"step_{steps:08d}"
        assert read_manifest(checkpoint)["world_size"] == nproc
        assert len(list(checkpoint.glob("shard_*.safetensors"))) == nproc
        _assert_same_training(sharded, reference, range(steps - 2, steps + 1), expected[steps])

    # A checkpoint that lacks a rank's file, or holds another checkpoint's, is refused by name.
    model = load_run(sharded, device="cpu")[0]
    damaged = workspace["root"] / "damaged"
    shutil.copytree(sharded / "checkpoints" / "step_00000006", damaged)
    shard = damaged / "shard_00002_of_00004.safetensors"
    shutil.copy(damaged / "shard_00001_of_00004.safetensors", shard)  # another rank's rows
    with pytest.raises(ValueError, match=r"shard_00002_of_00004\.safetensors does not match manifest\.json"):
        load_checkpoint(damaged, model)
    shard.unlink()
    with pytest.raises(DamagedCheckpointError, match=r"lacks its file shard_00002_of_00004\.safetensors"):
        load_checkpoint(damaged, model)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_a_checkpoint_of_2_ranks_loads_bit_exactly_on_3_ranks_and_on_one_process(tmp_path):
    """Rows, row optimizer state, dense weights (tied), AdamW state and the random state, to the bit; 2 ranks in the
    device tier, then 3 in the host tier and one process in the device tier."""
    code, output = finish(launch_torchrun(2, [str(CHECKPOINT_RANKS), "save", str(tmp_path), "device"]), timeout=180)
    assert code == 0, output[-3000:]
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "manifest.json", "shard_00000_of_00002.safetensors", "shard_00001_of_00002.safetensors"
    ]  # fmt: skip
    code, output = finish(launch_torchrun(3, [str(CHECKPOINT_RANKS), "load", str(tmp_path), "host"]), timeout=180)
    assert code == 0, output[-3000:]
    saved = load_file(tmp_path / "saved.safetensors")
    assert {"tables/1/weight", "tables/1/exp_avg", "tables/1/row_step", "model/head.weight"} <= saved.keys()
    loaded = {(3, r): load_file(tmp_path / f"loaded_rank{r}.safetensors") for r in range(3)}
    loaded[1, 0] = checkpoint_ranks.load(tmp_path, "device")
    for (world, rank), held in loaded.items():
        assert held.keys() == saved.keys()
        for name, value in saved.items():
            if name.startswith("tables/"):
                start, end = shard_ranges(value.shape[0], world)[rank]
                value = value[start:end]
            assert held[name].dtype == value.dtype and held[name].shape == value.shape, (world, rank, name)
            assert torch.equal(_bits(held[name]), _bits(value)), (world, rank, name)


def test_prefetching_the_table_exchange_changes_no_bit_of_a_run(workspace):
    """``engram train`` on 2 ranks, sharded lookups prefetched at forward start (the default) and exchanged in
    the layer (``storage.prefetch=false``): the same losses, table rows, optimizer state and dense weights."""
    runs = {prefetch: workspace["root"] / f"prefetch-{prefetch}" for prefetch in ("true", "false")}
    for prefetch, run in runs.items():
        _train(workspace, 2, run, 3, f"storage.prefetch={prefetch}")
    assert _losses(runs["true"]) == _losses(runs["false"])
    on, off = _state(runs["true"]), _state(runs["false"])
    assert on.keys() == off.keys() and "tables/1/weight" in on
    for name, value in on.items():
        assert torch.equal(_bits(value), _bits(off[name])), name


def test_disk_shards_train_like_one_process_and_resume_only_at_their_world_size(workspace, reference):
    reference, expected = reference
    run = workspace["root"] / "disk"
    _train(workspace, 2, run, 6, "storage.tier=disk")
    for rank in range(2):  # each rank's rows live in its own disk table, not in the checkpoint
        assert (run / "tables" / "layer_01" / f"shard_{rank:05d}_of_00002" / "weight.table").is_file()
    assert not any(name.startswith("tables/") for name in read_tensors(latest_checkpoint(run / "checkpoints")))
    info = run_engram("tables", "info", run / "tables", cache=workspace["root"])
    assert info.returncode == 0 and all(f"shard_{r:05d}_of_00002" in info.stdout for r in range(2)), info.stderr
    state = _state(run)  # the dense weights; and the table rows and Adam state from the disk shards:
    for name in ("weight", "exp_avg", "exp_avg_sq", "row_step"):
        shards = [DiskTable(run / "tables" / "layer_01" / f"shard_{r:05d}_of_00002") for r in range(2)]
        state[f"tables/1/{name}"] = torch.cat([s.weight if name == "weight" else s.row_states()[name] for s in shards])
    _assert_close_states(state, expected[6])
    code, output = finish(_launch(4, _train_args(workspace, run, 9, "storage.tier=disk"), workspace["root"]), 240)
    assert code != 0 and "are sharded over 2 ranks and this job has 4" in output, output[-3000:]
    _train(workspace, 2, run, 9, "storage.tier=disk")
    assert _losses(run)[9] == pytest.approx(_losses(reference)[9], rel=1e-6)


def _rank_pid(run: Path, rank: int) -> int:
    """The process id of the worker of ``rank`` training into ``run`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(run).encode() in command and f"RANK={rank}".encode() in environ and b"-m" in command[:3]:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} for {run}")


def _alive(pid: int) -> bool:
    """False once the process has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and max(_losses(run), default=0) >= step:
            return
        assert process.poll() is None, "the job ended before the fault was injected"
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach step {step}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_hung_or_stopped_job_resumes_and_the_rerun_loses_nothing(workspace):
    run, reference = workspace["root"] / "faults", workspace["root"] / "faults-reference"
    steps, sets = 100, ("train.checkpoint_every=10", "train.dist_timeout_s=5")
    _train(workspace, 2, reference, steps, *sets)  # the uninterrupted job

    # A rank killed mid-run: torchrun stops the other one and names the failure.
    job = _launch(2, _train_args(workspace, run, steps, *sets), workspace["root"])
    _wait_for_step(run, 25, job)  # past the checkpoint of step 20
    os.kill(_rank_pid(run, 1), signal.SIGKILL)
    code, output = finish(job, timeout=60)
    assert code != 0 and "Signal 9 (SIGKILL) received by PID" in output, output[-3000:]
    killed_at = max(_losses(run))

    # A rank that hangs (stopped): the other gives up after train.dist_timeout_s with an explanation.
    job = _launch(2, _train_args(workspace, run, steps, *sets), workspace["root"])
    _wait_for_step(run, killed_at + 15, job)  # the rerun went on from step 20 and wrote more checkpoints
    waiting, hung = _rank_pid(run, 0), _rank_pid(run, 1)
    os.kill(hung, signal.SIGSTOP)
    began = time.monotonic()
    while _alive(waiting) and time.monotonic() - began < 60:
        time.sleep(0.1)
    assert time.monotonic() - began < 30  # 5 s of timeout, then the error
    os.kill(hung, signal.SIGCONT)  # lets the SIGTERM from torchrun take effect now rather than after its grace
    code, output = finish(job, timeout=60)
    assert code != 0
    rank0 = "\n".join(line for line in output.splitlines() if line.startswith("[rank0]"))
    assert "rank 0 of 2 stopped at step" in output and "did not answer within train.dist_timeout_s=5 s" in output, (
        rank0[-3000:]  # the waiting rank's own error, not the stopped rank's that torchrun prints last
    )
    assert "Start the same command again to resume" in output

    # SIGTERM to the launcher (a scheduler taking the machine back): every rank finishes the same step, and
    # that step is checkpointed.
    stale = max(_losses(run))  # the metrics past the newest checkpoint, dropped when the job resumes
    job = _launch(2, _train_args(workspace, run, steps, *sets), workspace["root"])
    _wait_for_step(run, stale + 5, job)
    os.kill(job.pid, signal.SIGTERM)
    code, output = finish(job, timeout=60)
    stopped = max(_losses(run))
    assert code != 0 and f"stopped by SIGTERM after step {stopped}; its checkpoint is" in output, output[-3000:]
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint.name == f"step_{stopped:08d}" and read_manifest(checkpoint)["world_size"] == 2

    # The same command again resumes from the newest complete checkpoint and ends exactly where the
    # uninterrupted job ends: every logged loss of the resumed steps, every weight and table row.
    _train(workspace, 2, run, steps, *sets)
    assert _losses(run) == _losses(reference)
    state, expected = _state(run), _state(reference)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
