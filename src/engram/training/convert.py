"""Moving a training run's Engram tables between tiers (``engram tables convert``).

A run's newest checkpoint holds its device or host tables (and their optimizer state) in its rank
files, or refers to disk table folders. Converting rewrites that checkpoint with the tables in
the other form and records the new tier in ``run.json``; training, evaluation and generation then
use the new tier. Device and host checkpoints are identical, so converting between those two only
changes ``run.json``. Tables written by any number of ranks become one disk table per layer; disk
tables sharded over several ranks are not converted (resume them at their world size).

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

import torch

from engram._files import FolderLock, swap_into_place
from engram.storage.config import LAYER_FOLDER, StorageConfig
from engram.storage.disk import DiskTable, verify_tables
from engram.storage.table_file import TableFileError
from engram.training.checkpoint import checkpoint_damage, read_manifest, read_tensors, write_checkpoint_folder
from engram.training.errors import DamagedCheckpointError
from engram.training.run import read_run, write_spec


def convert_run_tables(run_dir: str | Path, target: StorageConfig) -> Path:
    """Move the tables of the newest checkpoint of ``run_dir`` to ``target``'s tier; returns the checkpoint.

    ``target.directory`` (disk tier) defaults to ``<run>/tables``; it must not hold tables yet.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run or has no complete checkpoint.
        FileExistsError: the disk folder already holds tables.
        ValueError: the run has no Engram tables, or its disk tables are sharded over several ranks.
        FolderInUseError: another process (a training run) is working on ``run_dir``.
    """
    run_dir = Path(run_dir)
    read_run(run_dir)  # a run, with a checkpoint: refused before the lock file is created
    with FolderLock(run_dir, "engram tables convert"):
        return _convert(run_dir, target)


def _convert(run_dir: Path, target: StorageConfig) -> Path:
    saved, checkpoint = read_run(run_dir)
    if saved.model.engram is None:
        raise ValueError(f"the model of {run_dir} has no Engram tables")
    spec = dataclasses.replace(saved, storage=target)
    target = spec.storage_for(run_dir)

    damage = checkpoint_damage(checkpoint, hashes=True)  # every file, before anything is written
    if damage is not None:
        raise DamagedCheckpointError(checkpoint, damage)
    manifest = read_manifest(checkpoint)
    meta = manifest["meta"]
    source = StorageConfig.from_dict(meta.get("storage", {}))
    if source.tier == "disk" and saved.storage.tier == "disk":
        # the folder training uses (run.json's), not the one recorded when the checkpoint was written: a run
        # folder copied or moved since keeps its tables inside it
        source = saved.storage_for(run_dir)

    if (source.tier == "disk") != (target.tier == "disk"):
        staging = checkpoint.parent / f".convert-{checkpoint.name}-{secrets.token_hex(6)}"
        try:
            dense = read_tensors(checkpoint, ("model/", "optimizers/", "rng/"))
            if target.tier == "disk":
                _tables_to_disk(checkpoint, manifest, Path(target.directory))
                tensors = dense
            else:
                tensors = {**dense, **_disk_tables(manifest, source)}
            tables = {
                layer: {**entry, "persisted": target.tier == "disk"} for layer, entry in manifest["tables"].items()
            }
            meta["storage"] = target.to_dict()
            staging.mkdir()
            write_checkpoint_folder(
                staging,
                tensors,
                {},  # whole arrays: every table starts at row 0
                {"world_size": 1, "meta": meta, "tables": tables, "optimizers": manifest["optimizers"]},
            )
            swap_into_place(staging, checkpoint)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the swap; left by a failure before it
    write_spec(run_dir, spec)
    return checkpoint


def _tables_to_disk(checkpoint: Path, manifest: dict, directory: Path) -> None:
    """One disk table per layer from the checkpoint's table arrays (written by any number of ranks)."""
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; remove it or choose another --directory")
    tables_tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(6)}"
    step = int(manifest["meta"]["step"])
    try:
        for layer in manifest["tables"]:  # one layer in memory at a time
            arrays = read_tensors(checkpoint, (f"tables/{layer}/",))
            weight = arrays.pop(f"tables/{layer}/weight")
            states = {name.rsplit("/", 1)[1]: array for name, array in arrays.items()}
            folder = tables_tmp / LAYER_FOLDER.format(int(layer))
            DiskTable.from_tensors(folder, weight, states, committed_step=step).close()
        if directory.exists():
            directory.rmdir()
        os.replace(tables_tmp, directory)
    except BaseException:
        shutil.rmtree(tables_tmp, ignore_errors=True)
        raise


def _disk_tables(manifest: dict, source: StorageConfig) -> dict[str, torch.Tensor]:
    """The disk tables of a one-process checkpoint, rolled back to it, as checkpoint tensors."""
    if manifest["world_size"] != 1:
        raise ValueError(
            f"the disk tables of this run are sharded over {manifest['world_size']} ranks; converting sharded disk "
            "tables is not supported: resume the run with that many ranks"
        )
    step = int(manifest["meta"]["step"])
    tensors = {}
    for layer in manifest["tables"]:
        table = DiskTable(source.layer_directory(int(layer)))
        table.restore_checkpoint(step)  # rolls back anything written after the checkpoint
        damaged = [check for check in verify_tables(table.directory) if not check.intact]
        if damaged:  # the whole table is copied below, not read row by row through the checked reads
            table.close()
            listing = "; ".join(f"{check.path.name}: {check.error or f'{check.damaged_rows} damaged rows'}"
                                for check in damaged)  # fmt: skip
            raise TableFileError(
                f"the disk table at {table.directory} is damaged ({listing}); nothing was converted. "
                f"`engram tables verify {table.directory}` lists the rows"
            )
        tensors[f"tables/{layer}/weight"] = table.weight.clone()
        for name, state in table.row_states().items():
            tensors[f"tables/{layer}/{name}"] = state.clone()
        table.close()
    return tensors
