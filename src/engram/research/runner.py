"""Run an experiment's grid: each run in its own process, at most ``jobs`` at a time, resumable.

Layout under the output folder (default ``runs/experiments``):

    data/<corpus>/                      the prepared corpus, shared by every experiment
    <experiment>/experiment.json        the experiment as last run
    <experiment>/<variant>/seed<k>/     one run: plan.json, run.json, metrics.jsonl, checkpoints/,
                                        log.txt (the worker's output) and, once done, final.json
    <experiment>/results.{json,csv,md}, <experiment>/*.png     the report (engram.research.report)

A run whose ``final.json`` carries its spec's fingerprint is complete and skipped; any other run is
started, and resumes from its newest checkpoint if an earlier attempt was interrupted. A run folder
that holds another spec (the experiment file changed) is refused before anything starts, naming the
folder. Ctrl-C or SIGTERM stops every running run after its current step, with a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engram._files import FolderLock, write_text_atomic
from engram.data import TokenDataset, prepare_dataset
from engram.indexing.compression import CompressedTokenizer
from engram.research.experiment import Experiment, RunPlan
from engram.training.run import SPEC_FILE, read_spec

PLAN_FILE = "plan.json"  # written by the runner: what the worker trains
FINAL_FILE = "final.json"  # written by the worker: the finished run's evaluation
CORPORA = ("shakespeare", "wikipedia")
SPLITS = (0.9, 0.05, 0.05)


@dataclass
class RunStatus:
    plan: RunPlan
    folder: Path
    fingerprint: str  # RunPlan.fingerprint on the experiment's dataset
    complete: bool


def experiment_folder(experiment: Experiment, out: Path, quick: bool = False) -> Path:
    return out / (experiment.name + ("-quick" if quick else ""))


def data_folder(experiment: Experiment, out: Path) -> Path:
    """Where the experiment's dataset is: ``out/data/<corpus>`` for a named corpus, else the given folder."""
    return out / "data" / experiment.data if experiment.data in CORPORA else Path(experiment.data)


def prepare_data(experiment: Experiment, out: Path, log: Callable[[str], None] = print) -> Path:
    """The experiment's dataset folder: a corpus prepared once under ``out/data``, or the given folder."""
    path = data_folder(experiment, out)
    if experiment.data not in CORPORA:
        TokenDataset(path)  # a prepared dataset folder, verified; the error names what is wrong
        return path
    if not (path / "manifest.json").is_file():
        log(f"preparing the {experiment.data} corpus in {path} ...")
        prepare_dataset(experiment.data, path, CompressedTokenizer(experiment.tokenizer), splits=SPLITS)
    return path


def plan_runs(
    experiment: Experiment,
    out: Path,
    data_dir: Path,
    quick: bool = False,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[RunStatus]:
    """The runs to consider (all, or those of the named variants and seeds) and whether each is complete.

    Raises:
        ValueError: a run folder holds a different spec than the experiment now gives it.
        KeyError: an unknown variant name.
    """
    for name in variants or []:
        experiment.variant(name)
    folder = experiment_folder(experiment, out, quick)
    data_fingerprint = TokenDataset(data_dir).fingerprint  # the manifest's, checked against its file hashes
    statuses = []
    for plan in experiment.runs(quick):
        if (variants and plan.variant not in variants) or (seeds is not None and plan.seed not in seeds):
            continue
        run_dir = folder / plan.folder
        _check_same_spec(run_dir, plan, data_dir)
        fingerprint = plan.fingerprint(data_fingerprint)
        statuses.append(RunStatus(plan, run_dir, fingerprint, is_complete(run_dir, fingerprint)))
    return statuses


def import_results(
    experiment: Experiment, out: Path, records: list[dict], quick: bool = False
) -> tuple[list[RunStatus], list[tuple[dict, str]]]:
    """Put finished runs' records (``final.json`` contents, e.g. the ``runs`` of a results.json)
    back as the ``final.json`` of their run folders, so ``run_experiment`` skips them.

    A record is taken only when its fingerprint equals that of the experiment's run of the same
    variant and seed on this dataset: results of another model, recipe or dataset are never mixed
    in. Runs already complete are left alone. Returns (the runs imported, the records not taken,
    each with the reason).
    """
    data_dir = prepare_data(experiment, out)
    statuses = {(s.plan.variant, s.plan.seed): s for s in plan_runs(experiment, out, data_dir, quick)}
    imported, refused = [], []
    for record in records:
        status = statuses.get((record.get("variant"), record.get("seed")))
        if status is None:
            refused.append((record, f"experiment {experiment.name!r} has no run of this variant and seed"))
            continue
        if record.get("fingerprint") != status.fingerprint:
            refused.append((record, "another model, recipe or dataset than this experiment's run (fingerprint)"))
            continue
        if not status.complete:
            status.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(status.folder / FINAL_FILE, json.dumps(record, indent=2) + "\n")
            status.complete = True
            imported.append(status)
    return imported, refused


def is_complete(run_dir: Path, fingerprint: str) -> bool:
    path = run_dir / FINAL_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("fingerprint") == fingerprint
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged result is computed again (written atomically, so only by hand)


def _check_same_spec(run_dir: Path, plan: RunPlan, data_dir: Path) -> None:
    if not (run_dir / SPEC_FILE).is_file():
        return
    if read_spec(run_dir) != plan.spec(data_dir):
        raise ValueError(
            f"{run_dir} holds a run of another spec than experiment {plan.experiment!r} now gives variant "
            f"{plan.variant!r} (the experiment or its data changed); use another --out folder, or delete {run_dir} "
            "to train it again"
        )


def run_experiment(
    experiment: Experiment,
    out: Path,
    jobs: int | None = None,
    quick: bool = False,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Train every incomplete run of ``experiment``; returns the number of runs that failed.

    ``jobs`` runs train at once (default: the CPU count divided by ``train.threads``, at least 1).

    Raises:
        KeyboardInterrupt: stopped by Ctrl-C or SIGTERM, after every running run saved a checkpoint.
    """
    folder = experiment_folder(experiment, out, quick)
    folder.mkdir(parents=True, exist_ok=True)
    with FolderLock(folder, "engram experiment run"):
        data_dir = prepare_data(experiment, out, log)
        (folder / "experiment.json").write_text(experiment.to_json() + "\n")
        statuses = plan_runs(experiment, out, data_dir, quick, variants, seeds)
        pending = [s for s in statuses if not s.complete]
        log(
            f"{experiment.name}: {len(statuses)} runs, {len(statuses) - len(pending)} complete, {len(pending)} to train"
        )
        threads = max(1, experiment.train.threads)
        jobs = jobs or max(1, (os.cpu_count() or 1) // threads)
        started = time.perf_counter()
        failed = _execute(pending, data_dir, jobs, log)
        minutes = (time.perf_counter() - started) / 60
        log(
            f"{experiment.name}: {len(pending) - failed} runs trained in {minutes:.1f} min, "
            f"{jobs} at a time; {failed} failed"
        )
        return failed


def _execute(pending: list[RunStatus], data_dir: Path, jobs: int, log: Callable[[str], None]) -> int:
    """Run the pending runs as worker processes, ``jobs`` at a time; the number that failed."""
    running: dict[subprocess.Popen, tuple[RunStatus, float]] = {}
    queue = list(pending)
    failed = started = 0

    def stop_on_sigterm(signum: int, frame: object) -> None:
        # Ctrl-C reaches the workers by the terminal's process group; SIGTERM to the runner alone
        # is passed on here. Each worker signalled once finishes its step and saves a checkpoint.
        for process in running:
            process.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                status = queue.pop(0)
                running[_start_worker(status, data_dir)] = (status, time.perf_counter())
                started += 1
                log(f"[{started}/{len(pending)}] {status.plan.variant} seed {status.plan.seed}: started")
            for process in [p for p in running if p.poll() is not None]:
                status, began = running.pop(process)
                elapsed = time.perf_counter() - began
                if process.returncode == 0:
                    log(f"  {status.plan.variant} seed {status.plan.seed}: {_summary(status.folder)} ({elapsed:.0f} s)")
                else:
                    failed += 1
                    log(
                        f"  {status.plan.variant} seed {status.plan.seed}: FAILED (exit {process.returncode}); "
                        f"last lines of {status.folder / 'log.txt'}:\n{_tail(status.folder / 'log.txt')}"
                    )
            time.sleep(0.2)
    except KeyboardInterrupt:
        log("stopping: every running run finishes its step and saves a checkpoint ...")
        for process in running:
            process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def _start_worker(status: RunStatus, data_dir: Path) -> subprocess.Popen:
    status.folder.mkdir(parents=True, exist_ok=True)
    plan = status.plan
    content = {
        "experiment": plan.experiment,
        "variant": plan.variant,
        "seed": plan.seed,
        "fingerprint": status.fingerprint,
        "spec": plan.spec(data_dir).to_dict(),
    }
    write_text_atomic(status.folder / PLAN_FILE, json.dumps(content, indent=2) + "\n")
    log_file = open(status.folder / "log.txt", "a")  # noqa: SIM115 (the child process writes it)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "engram.research.worker", str(status.folder)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        log_file.close()


def _summary(run_dir: Path) -> str:
    final = json.loads((run_dir / FINAL_FILE).read_text())
    text = f"val {final['val_loss']:.4f}, test {final['test_loss']:.4f}"
    if "val_loss_engram_off" in final:
        text += f" (Engram off: val {final['val_loss_engram_off']:.4f})"
    return text


def _tail(path: Path, lines: int = 8) -> str:
    if not path.is_file():
        return "    (no log)"
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
