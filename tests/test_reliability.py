"""What engram guarantees about runs and files, tried the way they break: signals, kill -9, damaged
checkpoints, non-finite steps, two processes on one folder, refused commands, bad inputs at the boundary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram import EngramConfig
from engram._files import FolderInUseError, FolderLock
from engram.memory.layer import Engram
from engram.model import EngramLM, ModelConfig
from engram.storage.table_file import TableFile
from engram.training import TrainConfig, Trainer
from engram.training.checkpoint import load_checkpoint
from engram.training.errors import NonFiniteError, NoUsableCheckpointError, TrainingInterrupted
from engram.training.run import RunSpec, start_run
from tests.cli_runs import make_workspace, run_engram
from tests.test_training import _trainer as training_run

TRAIN = TrainConfig(
    steps=6,
    batch_size=2,
    seq_len=32,
    warmup_steps=1,
    log_every=1,
    eval_every=0,
    checkpoint_every=4,
    device="cpu",
)


def _trainer(compressor, out_dir, seed=0, **train) -> Trainer:
    """The trainer of tests/test_training.py's Engram+MoE model, with ``TRAIN`` changed by ``train``."""
    return training_run(compressor, out_dir, train_config=dataclasses.replace(TRAIN, **train), seed=seed)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` by relative path, with the SHA-256 of its bytes (the lock file, which
    names its latest holder, aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".engram.lock"
    }


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- a run always ends with a checkpoint of its last step ----------------------------------------------------------
def test_a_run_ends_with_a_checkpoint_of_its_last_step_whatever_the_interval(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path / "a", checkpoint_every=4)
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert trainer.last_checkpoint == tmp_path / "a" / "checkpoints" / "step_00000006"

    never = _trainer(compressor, tmp_path / "b", checkpoint_every=0)
    never.train(until=3)  # stopped early by the caller: still saved
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_00000003"]
    resumed = _trainer(compressor, tmp_path / "b", checkpoint_every=0, seed=9)
    assert resumed.resume() and resumed.step == 3


def test_sigint_finishes_the_step_saves_and_resumes_exactly(compressor, tmp_path):
    expected = _trainer(compressor, None).train()
    trainer = _trainer(compressor, tmp_path, checkpoint_every=0)
    real_step = trainer.train_step

    def step_with_ctrl_c() -> float:
        if trainer.step == 1:  # Ctrl-C arrives during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step()

    trainer.train_step = step_with_ctrl_c
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN in a background job
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGINT after step 2; its checkpoint is .*step_00000002"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert _steps(tmp_path) == [1, 2]

    resumed = _trainer(compressor, tmp_path, checkpoint_every=0, seed=3)
    assert resumed.resume() and resumed.step == 2
    assert resumed.train() == expected[2:]
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_second_signal_stops_at_once(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path, checkpoint_every=0)
    real_step = trainer.train_step

    def step_with_two_signals() -> float:
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step()

    trainer.train_step = step_with_two_signals
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "checkpoints").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- non-finite losses and gradients -------------------------------------------------------------------------------
def _poison_dense_gradient(trainer: Trainer, steps: set[int]) -> None:
    """Make the gradient of the LM head NaN during the given (1-based) steps."""
    trainer.model.head.weight.register_hook(lambda grad: grad * float("nan") if trainer.step + 1 in steps else grad)


def test_a_nan_gradient_stops_training_before_the_update_and_keeps_the_last_good_state(compressor, tmp_path):
    reference = _trainer(compressor, None)
    reference.train(until=2)
    trainer = _trainer(compressor, tmp_path, checkpoint_every=0)
    _poison_dense_gradient(trainer, {3})
    with pytest.raises(NonFiniteError, match=r"dense gradient of step 3 is NaN.*step 2, is saved in .*step_00000002"):
        trainer.train()
    assert trainer.step == 2
    for name, value in _state(reference).items():  # step 3 changed nothing
        assert torch.equal(trainer.model.state_dict()[name], value), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]


def test_skip_mode_drops_the_step_counts_it_and_resumes_the_count(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path, nonfinite="skip", checkpoint_every=0)
    _poison_dense_gradient(trainer, {3})
    states = []
    real_step = trainer.train_step
    trainer.train_step = lambda: (real_step(), states.append(_state(trainer)))[0]
    losses = trainer.train()
    assert [loss != loss for loss in losses] == [False, False, True, False, False, False]
    assert trainer.skipped_steps == 1
    for name, value in states[1].items():  # the skipped step 3 applied nothing
        assert torch.equal(states[2][name], value), name
    assert not all(torch.equal(states[3][k], v) for k, v in states[2].items())  # step 4 trained again
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "skipped": "non-finite dense gradient", "skipped_steps": 1} in records
    resumed = _trainer(compressor, tmp_path, nonfinite="skip", checkpoint_every=0)
    assert resumed.resume() and resumed.skipped_steps == 1


def test_skip_mode_stops_after_max_skipped_steps_in_a_row(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path, nonfinite="skip", max_skipped_steps=3, checkpoint_every=0)
    _poison_dense_gradient(trainer, {2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(the last: step 4\) had a non-finite dense gradient"):
        trainer.train()
    assert trainer.step == 3 and trainer.skipped_steps == 2


def test_nan_table_row_gradients_and_nan_losses_are_named(compressor):
    rows = _trainer(compressor, None)

    def poison_rows(module, args, out) -> None:  # NaN flows into the table's rows only, not the dense weights
        out.register_hook(lambda grad: grad * float("nan"))

    rows.model.engram_tables()[0].register_forward_hook(poison_rows)
    with pytest.raises(NonFiniteError, match="the table row gradient of step 1 is NaN"):
        rows.train()

    loss = _trainer(compressor, None)
    loss.model.head.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(NonFiniteError, match="the loss and dense gradient and table row gradient of step 1"):
        loss.train()


def test_a_checkpoint_with_non_finite_values_is_never_written(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path)
    trainer.train(until=1)
    with torch.no_grad():
        trainer.model.blocks[1].engram.value_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 1 was not written: .*model/blocks\.1\.engram\.value_proj\.weight"):
        trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


# -- damaged checkpoints --------------------------------------------------------------------------------------------
def _flip_byte(path: Path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_changed_table_shard_is_caught_before_loading_and_the_older_checkpoint_used(compressor, tmp_path):
    expected = _trainer(compressor, None, checkpoint_every=2).train()
    trainer = _trainer(compressor, tmp_path, checkpoint_every=2)
    trainer.train(until=5)  # checkpoints 4 and 5 are kept; metrics reach step 5
    _flip_byte(tmp_path / "checkpoints" / "step_00000005" / "shard_00000_of_00001.safetensors")

    resumed = _trainer(compressor, tmp_path, checkpoint_every=2, seed=4)
    with pytest.warns(UserWarning, match="step_00000005 cannot be used: checkpoint file .* does not match"):
        assert resumed.resume() and resumed.step == 4
    assert _steps(tmp_path) == [1, 2, 3, 4]  # nothing past the step resumed from
    assert resumed.train() == expected[4:]
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # the damaged one set aside, kept
    assert (
        names[0] == "step_00000004" and names[1].startswith("step_00000005.damaged-") and names[2:] == ["step_00000006"]
    )


def test_when_every_checkpoint_is_damaged_nothing_starts_over(compressor, tmp_path):
    _trainer(compressor, tmp_path, checkpoint_every=2).train(until=4)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000004" / "manifest.json").write_text("{")
    _flip_byte(checkpoints / "step_00000002" / "shard_00000_of_00001.safetensors")
    before = _snapshot(tmp_path)
    with pytest.raises(NoUsableCheckpointError) as refused:
        _trainer(compressor, tmp_path).resume()
    message = str(refused.value)
    assert "no checkpoint of" in message and "Nothing was changed" in message and f"move {tmp_path} away" in message
    assert "step_00000004: corrupt checkpoint" in message and "manifest.json is not valid JSON" in message
    assert "step_00000002: checkpoint file" in message and "does not match manifest.json" in message
    assert _snapshot(tmp_path) == before


def test_a_torn_last_metrics_line_is_dropped_on_resume(compressor, tmp_path):
    _trainer(compressor, tmp_path).train(until=4)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a line
    resumed = _trainer(compressor, tmp_path)
    assert resumed.resume() and resumed.step == 4
    resumed.train()
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]


# -- the run folder lock --------------------------------------------------------------------------------------------
def test_one_process_per_folder_and_a_dead_holder_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engram._files import FolderLock; "
         "FolderLock(sys.argv[1], 'engram train').acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError) as refused:
            FolderLock(tmp_path, "engram tables convert").acquire()
        assert f"is in use by engram train (process {holder.pid} on {socket.gethostname()}" in str(refused.value)
    finally:
        holder.kill()  # kill -9: the holder never releases the lock itself
        holder.wait()
    with FolderLock(tmp_path, "engram train") as lock:
        assert lock.held and json.loads((tmp_path / ".engram.lock").read_text())["pid"] == os.getpid()


# -- the command line: several processes, kill -9, refused commands ---------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("reliability"))


def _train(ws: dict[str, Path], run: Path, *sets: str, background: bool = False):
    args = ["train", "--data", ws["data"], "--model", ws["model"], "--out", run, "--tokenizer", ws["tokenizer"]]
    defaults = ["train.batch_size=2", "train.seq_len=32", "train.eval_every=0", "train.eval_batches=1",
                "train.warmup_steps=1", "train.log_every=1", "train.schedule=constant"]  # fmt: skip
    args += [a for s in (*defaults, *sets) for a in ("--set", s)] + ["--no-progress"]
    if not background:
        return run_engram(*args, cache=ws["root"])
    env = {**os.environ, "ENGRAM_CACHE_DIR": str(ws["root"]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "engram.cli.main", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture(scope="module")
def disk_run(workspace) -> Path:
    """A finished 5-step run with its tables on disk."""
    run = workspace["root"] / "straight"
    result = _train(workspace, run, "train.steps=5", "storage.tier=disk")
    assert result.returncode == 0, result.stderr
    return run


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and len(_steps(run)) >= step:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended early: {process.communicate()[1][-2000:]}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def test_while_a_disk_run_trains_other_writers_are_refused_and_sigterm_saves_it(workspace):
    run = workspace["root"] / "busy"
    trainer = _train(workspace, run, "train.steps=1000000", "train.checkpoint_every=2", "storage.tier=disk",
                     background=True)  # fmt: skip
    try:
        _wait_for_step(run, 3, trainer)  # a checkpoint exists: eval and convert would have something to read
        for command, args in (
            ("train", None),
            ("eval", ["eval", run]),  # reading disk tables may roll them back: refused too
            ("tables convert", ["tables", "convert", run, "--to", "device"]),
        ):
            result = (
                _train(workspace, run, "train.steps=3") if args is None else run_engram(*args, cache=workspace["root"])
            )
            assert result.returncode == 1, (command, result.stderr)
            assert f"is in use by engram train (process {trainer.pid} on {socket.gethostname()}" in result.stderr
            assert "Traceback" not in result.stderr
        trainer.send_signal(signal.SIGTERM)
        _, err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 128 + signal.SIGTERM, err
    stopped_at = _steps(run)[-1]
    assert f"stopped by SIGTERM after step {stopped_at}; its checkpoint is" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step_{stopped_at:08d}"
    resumed = _train(workspace, run, f"train.steps={stopped_at + 2}", "train.checkpoint_every=0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} at step {stopped_at}" in resumed.stdout
    assert _steps(run) == list(range(1, stopped_at + 3))


def test_a_disk_run_killed_before_its_first_checkpoint_starts_over_cleanly(workspace, disk_run):
    run = workspace["root"] / "killed"
    trainer = _train(workspace, run, "train.steps=1000000", "train.checkpoint_every=0", "storage.tier=disk",
                     background=True)  # fmt: skip
    _wait_for_step(run, 3, trainer)
    trainer.kill()  # kill -9, with the tables trained and no checkpoint
    trainer.wait()
    again = _train(workspace, run, "train.steps=5")  # the same command: the tables stay on disk
    assert again.returncode == 0, again.stderr
    assert "never checkpointed; starting them over" in again.stderr
    losses = [
        [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        for folder in (disk_run, run)
    ]
    assert losses[1] == losses[0] and _steps(run) == [1, 2, 3, 4, 5]


def test_a_refused_command_leaves_the_run_folder_as_it_was(workspace, disk_run, tmp_path):
    run = workspace["root"] / "device-run"
    assert _train(workspace, run, "train.steps=2").returncode == 0
    before = _snapshot(run)
    moved = _train(workspace, run, "train.steps=4", "storage.tier=disk")
    assert moved.returncode == 2 and "engram tables convert" in moved.stderr and "Traceback" not in moved.stderr
    assert _snapshot(run) == before  # run.json unchanged, no table folder created

    (run / "checkpoints" / "step_00000002" / "manifest.json").write_text("")
    before = _snapshot(run)
    damaged = _train(workspace, run, "train.steps=4")
    assert damaged.returncode == 2 and "no checkpoint of" in damaged.stderr and "Nothing was changed" in damaged.stderr
    assert _snapshot(run) == before

    # A new run whose storage.directory holds another run's trained tables: refused, and no run folder is left.
    elsewhere = _train(workspace, tmp_path / "new", "train.steps=2", "storage.tier=disk",
                       f"storage.directory={disk_run / 'tables'}")  # fmt: skip
    assert elsewhere.returncode == 2 and "has already been trained" in elsewhere.stderr
    assert not (tmp_path / "new").exists()


def test_start_run_holds_the_lock_until_released(workspace, tmp_path):
    train = dataclasses.replace(TRAIN, steps=2)
    model = ModelConfig.load(workspace["model"])
    spec = RunSpec(model=model, train=train, data=str(workspace["data"]), tokenizer=str(workspace["tokenizer"]))
    trainer = start_run(spec, tmp_path / "run", progress=False)
    assert trainer.lock is not None and trainer.lock.held
    with pytest.raises(FolderInUseError, match="in use by engram train"):
        start_run(spec, tmp_path / "run", progress=False)
    trainer.lock.release()
    start_run(spec, tmp_path / "run", progress=False).lock.release()


# -- bad inputs at the library's boundary ---------------------------------------------------------------------------
def test_the_layer_and_the_model_refuse_empty_sequences_wide_dtypes_and_wrapping_ids():
    config = EngramConfig(layer_ids=[0], n_head_per_ngram=2, n_embed_per_ngram=16, engram_vocab_size=[101, 101])
    layer = Engram(config, 0, 32)
    hash_ids = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"at least one sequence of one position, got shape \(2, 0, 32\)"):
        layer(torch.zeros(2, 0, 32), hash_ids=hash_ids[:, :0])
    with pytest.raises(TypeError, match=r"hidden_states are torch\.float64 but this layer computes in torch\.float32"):
        layer(torch.zeros(2, 3, 32, dtype=torch.float64), hash_ids=hash_ids)
    assert layer.double()(torch.zeros(2, 3, 32, dtype=torch.float64), hash_ids=hash_ids).dtype == torch.float64

    model = EngramLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=16))
    with pytest.raises(ValueError, match=r"input_ids \(B, T\) must have B >= 1 and T >= 1, got shape \(1, 0\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids contains id 9223372036854775809 \\(uint64\\), beyond any vocab"):
        model(torch.tensor([[3, 2**63 + 1]], dtype=torch.uint64))
    assert model(torch.tensor([[3, 7]], dtype=torch.uint64)).logits.shape == (1, 2, 50)


def test_load_checkpoint_leaves_the_model_untouched_when_a_shard_is_damaged(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path)
    trainer.train(until=2)
    shard = tmp_path / "checkpoints" / "step_00000002" / "shard_00000_of_00001.safetensors"
    _flip_byte(shard)
    fresh = _trainer(compressor, None, seed=11)
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"cannot be used: checkpoint file .* does not match manifest\.json"):
        load_checkpoint(shard.parent, fresh.model, fresh.optimizers)
    for name, value in before.items():
        assert torch.equal(fresh.model.state_dict()[name], value), name


def test_damaged_disk_tables_are_never_converted_and_verify_names_the_row(workspace, disk_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(disk_run, run)
    weight = run / "tables" / "layer_01" / "weight.table"
    with TableFile.open(weight) as table:
        record = table.dim * 4 + 4
    with open(weight, "r+b") as f:  # a byte of row 3: after the 8 KiB header, records of dim float32 and a checksum
        f.seek(8192 + 3 * record + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    before = _snapshot(run)
    converted = run_engram("tables", "convert", run, "--to", "device", cache=workspace["root"])
    assert converted.returncode == 2 and "is damaged (weight.table: 1 damaged rows); nothing was converted" in (
        converted.stderr
    )
    assert _snapshot(run) == before
    verified = run_engram("tables", "verify", run, cache=workspace["root"])
    assert verified.returncode == 1 and "1 damaged, rows 3" in verified.stdout, verified.stdout
