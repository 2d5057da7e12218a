"""Moving a training run's Engram tables between tiers (``engram tables convert``).

A run's newest checkpoint holds its device or host tables (and their optimizer state) as tensors,
or refers to disk table folders. Converting rewrites that checkpoint with the tables in the other
form and records the new tier in ``run.json``; training, evaluation and generation then use the new
tier. Device and host checkpoints are identical, so converting between those two only changes
``run.json``.

Order of writes, so that a crash never loses the run: disk tables are written into a temporary
folder and renamed into place; then the checkpoint is replaced atomically; then ``run.json``. A
checkpoint whose tier differs from ``run.json`` is refused by the trainer with a message that
points back here, and running the conversion again finishes it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from pathlib import Path

from engram.storage.config import LAYER_FOLDER, StorageConfig
from engram.storage.disk import DiskTable
from engram.training.checkpoint_io import load_state, save_state
from engram.training.run import read_run, write_spec


def _table_key(layer_id: int) -> str:
    return f"blocks.{layer_id}.engram.table.weight"


def convert_run_tables(run_dir: str | Path, target: StorageConfig) -> Path:
    """Move the tables of the newest checkpoint of ``run_dir`` to ``target``'s tier; returns the checkpoint.

    ``target.directory`` (disk tier) defaults to ``<run>/tables``; it must not hold tables yet.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run or has no complete checkpoint.
        FileExistsError: the disk folder already holds tables.
    """
    run_dir = Path(run_dir)
    spec, checkpoint = read_run(run_dir)
    if spec.model.engram is None:
        raise ValueError(f"the model of {run_dir} has no Engram tables")
    spec = dataclasses.replace(spec, storage=target)
    target = spec.storage_for(run_dir)

    tree = load_state(checkpoint)
    meta = tree["meta"]
    source = StorageConfig.from_dict(meta.get("storage", {}))
    if source.tier == "disk":
        source = spec.storage_for(run_dir) if source.directory is None else source
    step = int(meta["step"])
    layers = sorted(spec.model.engram.layer_ids)
    table_state = tree["optimizers"].get("tables", {}).get("state", {})

    if (source.tier == "disk") != (target.tier == "disk"):
        if target.tier == "disk":
            _tensors_to_disk(tree, table_state, layers, step, Path(target.directory))
        else:
            _disk_to_tensors(tree, table_state, layers, step, source)
        meta["storage"] = target.to_dict()
        save_state(checkpoint, tree)
    write_spec(run_dir, spec)
    return checkpoint


def _tensors_to_disk(tree: dict, table_state: dict, layers: list[int], step: int, directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; remove it or choose another --directory")
    staging = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(6)}"
    try:
        for index, layer in enumerate(layers):
            weight = tree["model"].pop(_table_key(layer))
            states = table_state.pop(index, {})
            DiskTable.from_tensors(staging / LAYER_FOLDER.format(layer), weight, states, committed_step=step).close()
        if directory.exists():
            directory.rmdir()
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _disk_to_tensors(tree: dict, table_state: dict, layers: list[int], step: int, source: StorageConfig) -> None:
    for index, layer in enumerate(layers):
        table = DiskTable(source.layer_directory(layer))
        table.restore_checkpoint(step)  # rolls back anything written after the checkpoint
        tree["model"][_table_key(layer)] = table.weight.clone()
        states = {name: state.clone() for name, state in table.row_states().items()}
        if states:
            table_state[index] = states
        table.close()
