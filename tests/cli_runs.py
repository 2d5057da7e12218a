"""The command line as a user runs it, in a subprocess, on the sonnets: shared by the workflow and distributed tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engram import EngramConfig
from engram.model import ModelConfig, MoEConfig
from tests.corpus import SONNETS, sonnets_tokenizer

REPO = Path(__file__).resolve().parents[1]


def run_engram(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENGRAM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engram.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )


def make_workspace(root: Path) -> dict[str, Path]:
    """A tokenizer, an Engram+MoE model config and the sonnets prepared by `engram data`, under ``root``."""
    tokenizer = root / "tokenizer.json"
    sonnets_tokenizer().save(str(tokenizer))
    model = root / "model.json"
    engram = EngramConfig(
        layer_ids=[1], n_head_per_ngram=2, n_embed_per_ngram=16, engram_vocab_size=[997, 997], pad_id=0
    )
    config = ModelConfig(
        vocab_size=2,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=64,
        engram=engram,
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_hidden=32),
    )
    model.write_text(config.to_json())
    data = root / "data"
    result = run_engram(
        "data",
        SONNETS,
        "--out",
        data,
        "--tokenizer",
        tokenizer,
        "--split",
        "0.8,0.1,0.1",
        "--max-doc-chars",
        "3000",
        "--quiet",
        cache=root,
    )
    assert result.returncode == 0, result.stderr
    return {"root": root, "tokenizer": tokenizer, "model": model, "data": data}


def launch_torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node N ARGS`` (``-m module ...`` or a script) in a session of
    its own, so that a hang can be cleaned up with every worker (``finish``). Output: stdout and stderr merged."""
    path = os.pathsep.join([str(REPO / "src"), str(REPO)])  # this checkout's engram before any installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.Popen(
        [*launcher, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """The exit code and output of a job from ``launch_torchrun``; fails the test (killing every
    worker) if it runs past ``timeout`` seconds."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{output[-3000:]}")
    return process.returncode, output
