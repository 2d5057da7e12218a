"""The command-line workflow as a user runs it: data -> train (and resume) -> eval -> generate, and the demo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli_runs import make_workspace, run_engram

_engram = run_engram


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("workflow"))


def _train(ws: dict[str, Path], run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    sets = [
        f"train.steps={steps}",
        "train.batch_size=2",
        "train.seq_len=32",
        "train.eval_every=3",
        "train.eval_batches=1",
        "train.checkpoint_every=3",
        "train.warmup_steps=1",
        "train.log_every=1",
    ]
    args = [
        "train",
        "--data",
        ws["data"],
        "--model",
        ws["model"],
        "--out",
        run,
        "--tokenizer",
        ws["tokenizer"],
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]
    return _engram(*args, cache=ws["root"])


def test_train_resume_eval_generate(workspace):
    run = workspace["root"] / "run"
    first = _train(workspace, run, 6)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.splitlines()[-3])
    assert summary["step"] == 6 and {"val_loss", "val_bpb", "val_loss_engram_off"} <= set(summary)
    assert first.stdout.splitlines()[-2] == f"checkpoint of step 6: {run / 'checkpoints' / 'step_00000006'}"
    assert {"run.json", "metrics.jsonl", "loss.png", "checkpoints"} <= {p.name for p in run.iterdir()}

    resumed = _train(workspace, run, 9)  # the same command with more steps continues the run
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "at step 6" in resumed.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 10))

    evaluation = _engram("eval", run, "--split", "test", cache=workspace["root"])
    assert evaluation.returncode == 0, evaluation.stderr
    result = json.loads(evaluation.stdout)
    assert result["split"] == "test" and result["tokens"] > 0
    assert 0 < result["loss"] < 10 and result["bits_per_byte"] > 0 and "loss_engram_off" in result

    generated = _engram(
        "generate",
        run,
        "--prompt",
        "Shall I compare thee",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        cache=workspace["root"],
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Shall I compare thee")
    assert len(generated.stdout.strip()) > len("Shall I compare thee")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.stepz=3"], "unknown key 'stepz'"),
        (["--set", "model.moe.top_k=9"], "top_k"),
        (["--set", "steps"], "must look like key=value"),
    ],
)
def test_train_rejects_bad_overrides(workspace, args, message):
    result = _train(workspace, workspace["root"] / "bad", 2, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_inputs_exit_with_code_2(workspace):
    root = workspace["root"]
    missing_data = _engram(
        "train", "--data", root / "nowhere", "--model", workspace["model"], "--out", root / "x", cache=root
    )
    assert missing_data.returncode == 2 and "not a dataset folder" in missing_data.stderr
    missing_model = _engram(
        "train", "--data", workspace["data"], "--model", root / "none.json", "--out", root / "x", cache=root
    )
    assert missing_model.returncode == 2 and "does not exist" in missing_model.stderr
    no_run = _engram("eval", root / "no-run", cache=root)
    assert no_run.returncode == 2 and "is not a training run" in no_run.stderr


def test_quick_demo_writes_the_table_and_the_pictures(tmp_path):
    result = _engram("demo", "--quick", "--out", tmp_path / "demo", "--no-progress", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "validation loss, Engram off" in result.stdout and "demo finished" in result.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) == {"MoE", "Engram+MoE"}
    assert abs(results["MoE"]["total"] / results["Engram+MoE"]["total"] - 1) < 0.01
    assert results["MoE"]["tables"] == 0 and results["Engram+MoE"]["tables"] > 0
    assert all(r["val_loss"] > 0 and r["val_bpb"] > 0 for r in results.values())
    for picture in ("loss_curves.png", "gate_heatmap.png"):
        assert (tmp_path / "demo" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_move_between_tiers_without_changing_the_run(workspace):
    """Train on disk, convert to the device, resume, convert back to disk, resume: the losses are those of a
    run that never left the disk."""
    root = workspace["root"]
    straight, moved = root / "straight", root / "moved"
    constant = ("--set", "train.schedule=constant")  # so that a run grown in three parts has the same learning rates
    assert _train(workspace, straight, 9, *constant, "--set", "storage.tier=disk").returncode == 0

    first = _train(workspace, moved, 3, *constant, "--set", "storage.tier=disk")
    assert first.returncode == 0, first.stderr
    info = _engram("tables", "info", moved / "tables", cache=root)
    assert info.returncode == 0, info.stderr
    assert "layer_01" in info.stdout and "'committed_step': 3" in info.stdout and "row_step.table" in info.stdout

    to_device = _engram("tables", "convert", moved, "--to", "device", cache=root)
    assert to_device.returncode == 0, to_device.stderr
    assert json.loads((moved / "run.json").read_text())["storage"]["tier"] == "device"
    assert _train(workspace, moved, 6, *constant).returncode == 0
    again = _engram("tables", "convert", moved, "--to", "disk", "--directory", moved / "tables", cache=root)
    assert again.returncode == 2 and "is not empty" in again.stderr  # the old table files are still there
    to_disk = _engram("tables", "convert", moved, "--to", "disk", "--directory", moved / "tables2", cache=root)
    assert to_disk.returncode == 0, to_disk.stderr
    assert _train(workspace, moved, 9, *constant).returncode == 0

    def losses(run: Path) -> list[float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    assert len(losses(straight)) == 9 and losses(moved) == losses(straight)
