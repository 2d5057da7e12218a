"""Moving a training run's Engram tables between tiers (``engram tables convert``).

A run's newest checkpoint holds its device or host tables (and their optimizer state) in table
shard files, or refers to disk table folders. Converting rewrites that checkpoint with the tables in
the other form and records the new tier in ``run.json``; training, evaluation and generation then
use the new tier. Device and host checkpoints are identical, so converting between those two only
changes ``run.json``. Shards written by any number of ranks become one disk table per layer; disk
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

from engram._files import FolderLock, swap_into_place
from engram.storage.config import LAYER_FOLDER, StorageConfig
from engram.storage.disk import DiskTable, verify_tables
from engram.storage.table_file import TableFileError
from engram.training.checkpoint import (
    DENSE,
    ShardReader,
    new_manifest,
    read_manifest,
    shard_key,
    write_manifest,
    write_shard,
)
from engram.training.checkpoint_io import load_state, save_state
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

    manifest = read_manifest(checkpoint)
    tree = load_state(checkpoint / DENSE)
    meta = tree["meta"]
    source = StorageConfig.from_dict(meta.get("storage", {}))
    if source.tier == "disk" and saved.storage.tier == "disk":
        # the folder training uses (run.json's), not the one recorded when the checkpoint was written: a run
        # folder copied or moved since keeps its tables inside it
        source = saved.storage_for(run_dir)

    if (source.tier == "disk") != (target.tier == "disk"):
        staging = checkpoint.parent / f".convert-{checkpoint.name}-{secrets.token_hex(6)}"
        try:
            if target.tier == "disk":
                shard = _shards_to_disk(ShardReader(checkpoint, manifest), Path(target.directory), staging)
            else:
                shard = _disk_to_shard(manifest, source, staging)
            meta["storage"] = target.to_dict()
            save_state(staging / DENSE, tree)
            tables = {
                layer: {**entry, "persisted": target.tier == "disk"} for layer, entry in manifest["tables"].items()
            }
            shard["rows"] = {layer: [0, entry["num_rows"]] for layer, entry in tables.items()}
            write_manifest(staging, new_manifest(manifest["step"], 1, tables, [shard]))
            swap_into_place(staging, checkpoint)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the swap; left by a failure before it
    write_spec(run_dir, spec)
    return checkpoint


def _shards_to_disk(reader: ShardReader, directory: Path, staging: Path) -> dict:
    """One disk table per layer from the checkpoint's shards; returns the (empty) shard record of the new one."""
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; remove it or choose another --directory")
    tables_tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(6)}"
    step = int(reader.manifest["step"])
    try:
        for layer, entry in reader.manifest["tables"].items():
            rows = entry["num_rows"]
            weight = reader.read_rows(int(layer), "weight", 0, rows)
            states = {name: reader.read_rows(int(layer), name, 0, rows) for name in entry["states"]}
            folder = tables_tmp / LAYER_FOLDER.format(int(layer))
            DiskTable.from_tensors(folder, weight, states, committed_step=step).close()
        shard = write_shard(staging, 0, 1, {})
        if directory.exists():
            directory.rmdir()
        os.replace(tables_tmp, directory)
    except BaseException:
        shutil.rmtree(tables_tmp, ignore_errors=True)
        raise
    return shard


def _disk_to_shard(manifest: dict, source: StorageConfig, staging: Path) -> dict:
    """The disk tables of a one-process checkpoint, rolled back to it, as one shard file."""
    if manifest["world_size"] != 1:
        raise ValueError(
            f"the disk tables of this run are sharded over {manifest['world_size']} ranks; converting sharded disk "
            "tables is not supported: resume the run with that many ranks"
        )
    step = int(manifest["step"])
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
        tensors[shard_key(int(layer), "weight")] = table.weight.clone()
        for name, state in table.row_states().items():
            tensors[shard_key(int(layer), name)] = state.clone()
        table.close()
    return write_shard(staging, 0, 1, tensors)
