"""The scripts in examples/ run for real (as a user would run them) and print what they claim to show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FLOAT = r"(-?\d+\.\d+)"


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` with the current interpreter; its stdout (fails with its stderr on error).

    One torch thread: these models are tiny, and two threads on a busy 2-core machine are far slower.
    """
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def walkthrough() -> str:
    return run_example("engram_walkthrough.py")


def test_walkthrough_reproduces_the_toy(walkthrough):
    # The facts the articles' toy must reproduce: compression, the 2-gram's head-0 row, the vector shape.
    assert "compressed   (42, 108, 256, 12)" in walkthrough
    assert (
        "2-gram (256, 12), head 0: (256*1 XOR 12*3 XOR 0*10007) mod 5003 = (256 XOR 36) mod 5003 = 292" in walkthrough
    )
    assert re.search(r"2-gram \(256, 12\)\s+rows of heads 0-3: \[292, ", walkthrough)
    assert "-> vector of shape (256,)" in walkthrough
    # Every other reading of the description misses 292.
    others = walkthrough.split("other readings of the description")[1].split("== 2.")[0]
    rows = [int(r) for r in re.findall(r"-> (\d+)", others)]
    assert len(rows) == 6 and 292 not in rows


def test_walkthrough_runs_the_real_definition(walkthrough):
    # The same ids through DeepSeek-V3's compression and the demo configuration's layer 1.
    assert "canonical ids  (42, 82, 227, 418)" in walkthrough
    assert "layer 1 multipliers m = [76993395940407, 4862694818241, 36129212583461]" in walkthrough
    assert "mod 646403 = 223913" in walkthrough
    assert "hash ids of the 4 positions: (1, 4, 16)" in walkthrough
    # The real pipeline on a sentence: the published primes, (B, T, 16) rows, the layer's output shape.
    assert "layer 1 2-gram primes: [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]" in walkthrough
    assert "layer 1 3-gram primes: [646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619]" in walkthrough
    assert "hash ids: {layer: shape} = {1: (1, 13, 16), 15: (1, 13, 16)}" in walkthrough
    assert "output (1, 13, 4, 1024) (B, T, M, d)" in walkthrough
    assert "' GREAT' -> [2049]" in walkthrough and "' great' -> [2049]" in walkthrough
    # The side-by-side list names everything the toy leaves out.
    side_by_side = walkthrough.split("== 4. What the toy leaves out ==")[1]
    for aspect in ("compression", "multipliers", "table sizes", "heads", "sequence start", "gating", "short conv"):
        assert f"\n{aspect}\n  toy " in side_by_side
    assert "multi-branch" in side_by_side


def test_add_engram_to_your_model():
    out = run_example("add_engram_to_your_model.py", "--steps", "25")
    assert "table DeviceTable of" in out
    assert re.search(r"table gradient: sparse=True, \d+ of [\d,]+ rows touched", out)
    first, last = (float(x) for x in re.search(rf"loss: first step {FLOAT} -> after training {FLOAT}", out).groups())
    assert last < first - 1.0  # a few sentences are memorised quickly
    gates = [float(g) for g in re.findall(rf"gate at [^:]+:\s+mean {FLOAT}", out)]
    assert len(gates) == 2 and all(0 < g < 1 for g in gates) and gates[0] != gates[1]
    assert re.search(rf"loss with Engram switched off: {FLOAT}", out)


def test_train_on_your_text(tmp_path):
    # The user's path: their own train and validation files (here cut from the bundled sonnets).
    text = (ROOT / "tests" / "data" / "sonnets.txt").read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:20_000], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[20_000:26_000], encoding="utf-8")
    out = run_example(
        "train_on_your_text.py",
        *("--train", str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt")),
        *("--steps", "6", "--batch-size", "4", "--seq-len", "32"),
    )
    experts = re.search(r"routed experts (\d+) -> (\d+), Engram base table size ([\d,]+)", out)
    assert experts and int(experts[2]) < int(experts[1])
    totals = [int(t.replace(",", "")) for t in re.findall(r"total ([\d,]+)", out)]
    assert len(totals) == 2 and abs(totals[1] - totals[0]) / totals[0] < 0.01  # iso-parameter
    losses = {
        name: float(re.search(rf"{re.escape(name)}\s+val loss {FLOAT}", out)[1])
        for name in ("MoE baseline", "Engram, rho=0.8", "Engram switched off")
    }
    assert all(0 < loss < 20 for loss in losses.values()), losses
    assert losses["MoE baseline"] != losses["Engram, rho=0.8"]


def test_train_on_your_text_default_files():
    # Without --train/--val the example writes its own files from the bundled sonnets.
    out = run_example("train_on_your_text.py", "--steps", "2", "--batch-size", "2", "--seq-len", "16")
    sizes = re.search(r"train train\.txt: ([\d,]+) tokens; val val\.txt: ([\d,]+) tokens", out)
    assert sizes and int(sizes[1].replace(",", "")) > 20_000 and int(sizes[2].replace(",", "")) > 2_000
    assert re.search(rf"Engram switched off\s+val loss {FLOAT}", out)
