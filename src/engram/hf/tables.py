"""Engram tables in a transformers folder: which tier they were saved from, and where they load to.

A saved folder keeps a table's rows where its tier keeps them (docs/memory-tiers.md):

- device and host tables: in the safetensors weights, under the key a device table has
  (``lm.blocks.<i>.engram.table.weight``; a ``HostTable`` saves its rows under the same key);
- disk tables: as engram table folders next to the weights, ``tables/layer_<i>/weight.table``
  (engram's self-checking table file, rows only, no optimizer state), never in the safetensors,
  so that a table bigger than memory is neither saved nor loaded through it.

``config.json`` records the tier (``engram_storage``: a ``StorageConfig`` without its directory),
which ``from_pretrained`` uses unless given another ``StorageConfig``. Loading disk tables:

- with no ``storage.directory`` the saved files are opened where they are, memory-mapped and
  read-only (inference: nothing is read until looked up, and nothing can change the saved model);
- with a ``storage.directory`` they are copied there first (checked row by row against their
  checksums) and opened writable, for training;
- into the device or host tier their rows are read (checked) into memory.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from engram._files import fsync_dir, swap_into_place
from engram.model.lm import EngramLM
from engram.storage.config import DTYPES, LAYER_FOLDER, StorageConfig
from engram.storage.device import DeviceTable
from engram.storage.disk import DiskTable
from engram.storage.offload import HostTable
from engram.storage.table_file import TableFileError

TABLES_FOLDER = "tables"  # a saved folder's disk tables: tables/layer_<i>/weight.table
_TIERS = {DeviceTable: "device", HostTable: "host", DiskTable: "disk"}


def table_key(layer_id: int) -> str:
    """The state-dict key of layer ``layer_id``'s table rows, in every tier that saves them as a tensor."""
    return f"lm.blocks.{layer_id}.engram.table.weight"


def tier_of(lm: EngramLM) -> str:
    """The one tier all of ``lm``'s Engram tables are in (``"device"`` without Engram layers).

    Raises:
        NotImplementedError: a table sharded over a process group (``ShardedTable``), or of another kind.
        ValueError: tables in different tiers.
    """
    tiers = {}
    for layer_id, layer in lm.engram_layers().items():
        tier = _TIERS.get(type(layer.table))
        if tier is None:
            raise NotImplementedError(
                f"the table of Engram layer {layer_id} is a {type(layer.table).__name__}; EngramForCausalLM holds "
                "tables of one process (device, host or disk tier): save a sharded model with engram's own "
                "checkpoints, or load its run in one process (engram export-hf RUN OUT does)"
            )
        tiers[layer_id] = tier
    if len(set(tiers.values())) > 1:
        raise ValueError(f"the Engram tables are in different tiers ({tiers}); place them all in one tier")
    return next(iter(tiers.values()), "device")


def describe_storage(lm: EngramLM) -> dict[str, Any]:
    """What ``config.json`` records of ``lm``'s tables: its ``StorageConfig`` as a dict, without a directory.

    The options (cache, prefetch, ...) are ``lm.placement``'s where ``place_tables`` set one; the tier
    and, for host and disk tables, the row dtype are read from the tables themselves.
    """
    tier = tier_of(lm)
    placed = getattr(lm, "placement", None)
    storage = placed if isinstance(placed, StorageConfig) else StorageConfig()
    fields: dict[str, Any] = {"tier": tier, "directory": None}
    if tier != "device":
        dtype = next(iter(lm.engram_layers().values())).table.dtype
        fields["dtype"] = next(name for name, value in DTYPES.items() if value == dtype)
    return dataclasses.replace(storage, **fields).to_dict()


def saved_table_folder(folder: Path, layer_id: int) -> Path:
    """Where a saved folder keeps layer ``layer_id``'s disk table."""
    return folder / TABLES_FOLDER / LAYER_FOLDER.format(layer_id)


def write_disk_tables(lm: EngramLM, folder: Path) -> None:
    """Copy ``lm``'s disk tables (rows only) into ``folder/tables/``, atomically.

    Every row is checked against its checksum before it is copied (a damaged table is refused, not
    exported), and the copy is written into a temporary sibling folder, fsynced and renamed into
    place, so ``folder/tables`` holds either the previous complete tables or the new ones. Tables that
    already are ``folder``'s (a model loaded from it in place, read-only, so unchanged) are kept.

    Raises:
        ValueError: a row of a source table does not match its checksum.
    """
    layers = lm.engram_layers()
    sources = {layer_id: layer.table for layer_id, layer in layers.items()}
    if all(t.directory.resolve() == saved_table_folder(folder, i).resolve() for i, t in sources.items()):
        return  # saving a model into the folder it was opened from (read-only): the files are already there
    tmp = folder / f".{TABLES_FOLDER}.tmp-{secrets.token_hex(8)}"
    try:
        for layer_id, source in sources.items():
            source.flush()  # rows still in the write-back buffer reach the file, so the copy has them
            _check_intact(source, "not saved")
            copy = DiskTable.from_tensors(tmp / LAYER_FOLDER.format(layer_id), source.weight, journal=False)
            copy.close()
        fsync_dir(tmp)
        swap_into_place(tmp, folder / TABLES_FOLDER)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_intact(table: DiskTable, action: str) -> None:
    """Raise unless every row of ``table``'s weight file matches its checksum (read in ~64 MiB chunks)."""
    check = table.weight_file.verify()
    if not check.intact:
        problem = check.error or f"rows {check.damaged} do not match their checksums"
        raise ValueError(f"{check.path}: {problem}; {action}. `engram tables verify {table.directory}` checks it")


def open_saved_table(folder: Path, layer_id: int, plain: DeviceTable, storage: StorageConfig) -> DiskTable:
    """Layer ``layer_id``'s saved disk table, memory-mapped read-only (nothing is read until looked up).

    ``plain`` is the table the config builds (its shape is what the file must hold); ``storage`` gives
    the row dtype and the lookup options (hot-row cache, prefetch, read-ahead, row checks).

    Raises:
        OSError: the folder has no table for the layer.
        ValueError: the file holds another shape or dtype, or is damaged (``TableFileError``).
    """
    directory = saved_table_folder(folder, layer_id)
    if not (directory / "weight.table").is_file():
        raise FileNotFoundError(
            f"{directory / 'weight.table'} is missing: config.json says the Engram tables were saved in the disk "
            "tier, as table folders next to the weights; copy the whole saved folder"
        )
    try:
        return DiskTable(
            directory,
            plain.num_rows,
            plain.dim,
            dtype=DTYPES[storage.dtype],
            cache_bytes=storage.cache_bytes,
            prefetch=storage.prefetch,
            read_ahead=storage.read_ahead,
            journal=False,
            writable=False,
            verify_rows=storage.verify_rows,
        )
    except TableFileError as exc:
        raise ValueError(f"the saved table of Engram layer {layer_id} cannot be opened: {exc}") from exc


def copy_saved_table(source: DiskTable, directory: Path, storage: StorageConfig) -> DiskTable:
    """A writable copy of a saved (read-only) disk table in ``directory``, every row checked first.

    Raises:
        ValueError: ``directory`` already holds a table, or a row of ``source`` is damaged.
    """
    _check_intact(source, "not copied")
    if (directory / "weight.table").exists():
        raise ValueError(
            f"{directory} already holds a table; from_pretrained copies the saved tables into an empty "
            "storage.directory (or give none to open the saved ones read-only)"
        )
    return DiskTable.from_tensors(directory, source.weight, **storage.disk_options())


def same_folder(a: str | os.PathLike | None, b: Path) -> bool:
    """Whether ``a`` names the folder ``b`` (None does not)."""
    return a is not None and Path(a).resolve() == b.resolve()


def read_all_rows(table: DiskTable) -> torch.Tensor:
    """Every row of ``table`` in memory, (R, D), each checked against its checksum (``verify_rows``)."""
    return table.read_rows(torch.arange(table.num_rows))
