"""Training checkpoints: weights, optimizer states, random generators and step, written atomically.

Each checkpoint is a folder ``step_00001234`` written by ``checkpoint_io.save_state`` (safetensors
plus JSON, no pickle, renamed into place only when complete). Older checkpoints beyond ``keep_last``
are removed only after the new one is complete, so a crash at any point leaves a good one.

Tables that persist themselves (the disk tier) are not copied: the checkpoint records where they
are, and saving is two-phase around the folder (``prepare_checkpoint``, write the folder,
``commit_checkpoint``), so the tables and the newest complete folder always agree after a crash.
Such tables can only be restored to the newest checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from engram.model.lm import EngramLM
from engram.training.checkpoint_io import checkpoint_complete, load_state, save_state
from engram.training.config import TrainConfig

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: EngramLM,
    optimizers: dict[str, torch.optim.Optimizer],
    train_config: TrainConfig,
    run_info: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``directory/step_<step>`` and prune older checkpoints; returns the new folder."""
    directory = Path(directory)
    persisted = [table for table in model.engram_tables() if table.persists_itself]
    for table in persisted:
        table.prepare_checkpoint(step)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    tree = {
        "meta": {
            "step": step,
            "model_config": model.config.to_dict(),
            "train_config": train_config.to_dict(),
            "run_info": run_info or {},
            "storage": model.storage.to_dict(),
        },
        "model": model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": rng,
    }
    path = save_state(directory / f"step_{step:08d}", tree)
    for table in persisted:
        table.commit_checkpoint(step)
    complete = [p for _, p in _checkpoints(directory) if checkpoint_complete(p)]
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory`` (damaged ones are skipped)."""
    for _, path in reversed(_checkpoints(Path(directory))):
        if checkpoint_complete(path):
            return path
    return None


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, current {b!r}")
    return diffs


def load_checkpoint(
    path: str | Path,
    model: EngramLM,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    run_info: dict[str, Any] | None = None,
) -> int:
    """Restore a checkpoint into ``model`` (and ``optimizers``); returns its step.

    Raises:
        ValueError: the checkpoint was written for a different model config, different run facts
            (e.g. another tokenizer), or different optimizers; the message lists the differences.
    """
    device = next(model.parameters()).device
    tree = load_state(path, map_location=device)
    meta = tree["meta"]
    diffs = _differences(meta["model_config"], model.config.to_dict())
    if diffs:
        raise ValueError(f"checkpoint {path} was written for another model config: " + "; ".join(diffs))
    if run_info:
        diffs = _differences({k: meta["run_info"].get(k) for k in run_info}, run_info)
        if diffs:
            raise ValueError(f"checkpoint {path} belongs to another run: " + "; ".join(diffs))
    saved_tier = meta.get("storage", {}).get("tier", "device")
    if (saved_tier == "disk") != (model.storage.tier == "disk"):
        raise ValueError(
            f"checkpoint {path} keeps its Engram tables in the {saved_tier!r} tier and this model in the "
            f"{model.storage.tier!r} tier; convert the tables with `engram tables convert` or build the model with "
            f"storage tier {saved_tier!r}"
        )
    for table in model.engram_tables():
        if table.persists_itself:
            table.restore_checkpoint(int(meta["step"]))
    model.load_state_dict(tree["model"])
    if optimizers is not None:
        if set(tree["optimizers"]) != set(optimizers):
            raise ValueError(
                f"checkpoint {path} holds optimizers {sorted(tree['optimizers'])}, this run has {sorted(optimizers)}"
            )
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(tree["optimizers"][name])
    torch.set_rng_state(tree["rng"]["torch"].cpu())
    if "cuda" in tree["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in tree["rng"]["cuda"]])
    return int(meta["step"])
