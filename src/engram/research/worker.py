"""One run of an experiment, in its own process: ``python -m engram.research.worker RUN_DIR``.

The runner writes ``RUN_DIR/plan.json`` (the run's spec and fingerprint); the worker trains the run
(resuming from its newest checkpoint, as ``engram train`` does), evaluates the final model on the
**full** validation and test splits with Engram on and off, and writes ``RUN_DIR/final.json``
atomically. A run with a ``final.json`` of the same fingerprint is complete.

Exit codes are those of ``engram train``: 0 done, 2 bad input, 1 a run that cannot go on, 128 + N
stopped by signal N after a checkpoint (run the experiment again to resume).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engram._files import FolderInUseError, write_text_atomic
from engram.data import TokenDataset
from engram.eval.evaluate import evaluate_with_and_without_engram
from engram.model.accounting import count_parameters
from engram.model.lm import EngramLM
from engram.research.runner import FINAL_FILE, PLAN_FILE
from engram.training.errors import NonFiniteError, TrainingInterrupted
from engram.training.metrics import MetricsLog
from engram.training.run import RunSpec, start_run

# Windows per evaluation batch: the windows (and so the result) do not depend on it, only the speed.
EVAL_BATCH_SIZE = 64


def final_evaluation(
    model: EngramLM, spec: RunSpec, dataset: TokenDataset, byte_lengths: np.ndarray
) -> dict[str, float]:
    """Loss and bits per byte of ``model`` on the whole validation and test splits, Engram on and off.

    Keys ``{split}_loss``, ``{split}_bpb``, ``{split}_tokens`` and, for models with Engram,
    ``{split}_loss_engram_off`` and ``{split}_bpb_engram_off``.
    """
    result: dict[str, float] = {}
    for split in ("val", "test"):
        on, off = evaluate_with_and_without_engram(
            model,
            dataset.tokens(split),
            batch_size=EVAL_BATCH_SIZE,
            seq_len=spec.train.seq_len,
            byte_lengths=byte_lengths,
        )
        result.update({f"{split}_loss": on.loss, f"{split}_bpb": on.bits_per_byte, f"{split}_tokens": on.tokens})
        if off is not None:
            result.update({f"{split}_loss_engram_off": off.loss, f"{split}_bpb_engram_off": off.bits_per_byte})
    return result


def run_plan(run_dir: Path) -> dict[str, Any]:
    """Train (or resume) the run planned in ``run_dir`` and write its ``final.json``; returns its content."""
    plan = json.loads((run_dir / PLAN_FILE).read_text())
    spec = RunSpec.from_dict(plan["spec"])
    started = time.perf_counter()
    trainer = start_run(spec, run_dir, progress=False)
    try:
        trainer.train()
        model = trainer.model
        dataset = TokenDataset(spec.data)
        evaluation = final_evaluation(model, spec, dataset, trainer.byte_lengths)
    finally:
        trainer.close()
    counts = count_parameters(model)
    speeds = [r["tokens_per_s"] for r in MetricsLog(run_dir / "metrics.jsonl").read() if "tokens_per_s" in r]
    final = {
        "fingerprint": plan["fingerprint"],
        "experiment": plan["experiment"],
        "variant": plan["variant"],
        "seed": plan["seed"],
        "step": trainer.step,
        "params_total": counts.total,
        "params_active": counts.active,
        "params_tables": counts.engram_tables,
        "params_embedding": counts.embedding,
        "tokens_per_s": float(np.median(speeds)) if speeds else None,
        "seconds_this_attempt": time.perf_counter() - started,
        **evaluation,
    }
    write_text_atomic(run_dir / FINAL_FILE, json.dumps(final, indent=2) + "\n")
    return final


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m engram.research.worker RUN_DIR", file=sys.stderr)
        return 2
    try:
        final = run_plan(Path(args[0]))
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 128 + stop.signal_number
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FolderInUseError, NonFiniteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
