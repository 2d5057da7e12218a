"""Placement: moving a plainly built model's Engram tables into a tier, sharded over a process group.

A model is built plainly (``EngramLM(config)``, or any module holding ``Engram`` layers): each
layer's table is a ``DeviceTable`` whose rows are not drawn until first used, so building costs no
table memory. ``place_tables`` then puts every table where a ``StorageConfig`` says, as one step
of its own (the order torchtitan follows: build the model, then apply its parallelism):

    model = EngramLM(config, indexer)                                   # plain, tables unallocated
    place_tables(model, StorageConfig(tier="disk", directory="tables")) # -> tables/layer_XX/

Over a process group of W > 1 ranks each table becomes a ``ShardedTable``: this rank keeps rows
``shard_ranges(rows, W)[rank]`` in the configured tier. A table's initial rows are a function of
its seed (drawn when the model was built) and the row (``engram.storage.init``), so a seeded model
starts from the same rows in every tier and at every world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from engram.storage.base import LocalTable, TableStorage
from engram.storage.config import DTYPES, StorageConfig
from engram.storage.device import DeviceTable
from engram.storage.disk import WEIGHT_FILE, DiskTable
from engram.storage.offload import HostTable
from engram.storage.sharded import ShardedTable, shard_ranges

SHARD_FOLDER = "shard_{rank:05d}_of_{world:05d}"  # a rank's shard of a disk table, inside its layer folder

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place_tables(
    model: ModuleT,
    storage: StorageConfig,
    process_group: dist.ProcessGroup | None = None,
    sparse_grad: bool = True,
) -> ModuleT:
    """Put the table of every ``Engram`` layer of ``model`` in ``storage``'s tier; returns ``model``.

    Each layer's plain ``DeviceTable`` (R, D) is replaced by a table of the configured tier
    (``DeviceTable``, ``HostTable``, ``DiskTable`` in ``storage.layer_directory(layer_id)``), or,
    when ``process_group`` has W > 1 ranks, by a ``ShardedTable`` whose local shard of
    ``shard_ranges(R, W)[rank]`` rows is in that tier (a disk shard in
    ``layer_XX/shard_<rank>_of_<W>/``). On one rank the device tier keeps the table as it is.
    ``storage`` is recorded as ``model.placement`` (checkpoints record it).

    Where the rows come from:

    - a table whose rows were never drawn (``DeviceTable.materialized`` False, as after building)
      starts from its seed in the target tier, never allocated in full elsewhere: a disk table
      bigger than RAM is written chunk by chunk, and a disk table already in its folder is opened
      as it is (a run resumed from a checkpoint);
    - a table whose rows were drawn (used, loaded or trained) has them copied into the target
      tier, this rank's shard only. A disk folder that already holds a table is then refused
      rather than overwritten or silently preferred.

    Call it once per model, after joining the process group and before building optimizers: a
    table with optimizer state (``row_states``) is refused, since the optimizer would keep updating
    the old table; moving a run's tables and their optimizer state is ``engram tables convert``.
    Calling it again on one rank with the device tier only sets ``sparse_grad``; any other second
    call (tables already in the host or disk tier, or sharded) is refused. The device tables it
    leaves (all of them on one rank, local shards otherwise) take ``sparse_grad``.

    Args:
        model: a module holding ``Engram`` layers (``EngramLM``, or your own model).
        storage: the tier and its options.
        process_group: the ranks to shard over; None: the default group if ``torch.distributed``
            is initialised, else a single process (no sharding).
        sparse_grad: device tables produce sparse gradients (only the looked-up rows), as the row
            optimizers (``RowAdam``, ``RowAdagrad``) need; False for dense optimizers.

    Raises:
        ValueError: a table is already placed, has optimizer state, or would overwrite a disk table;
            the disk tier without ``storage.directory``; or a table too small to shard.
    """
    from engram.memory.layer import Engram  # imported here: the layer itself imports engram.storage

    layers = [module for module in model.modules() if isinstance(module, Engram)]
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        world, rank = 1, 0
    else:
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    placed = {}
    for layer in layers:
        table = layer.table
        _check_plain(table, layer.layer_id)
        if world == 1 and storage.tier == "device":
            table.sparse_grad = sparse_grad
            continue
        start, end = shard_ranges(table.num_rows, world)[rank]
        directory = None
        if storage.tier == "disk":
            directory = storage.layer_directory(layer.layer_id)
            if world > 1:
                directory = directory / SHARD_FOLDER.format(rank=rank, world=world)
        local = _local_table(storage, directory, table, start, end, sparse_grad)
        local.train(table.training)
        placed[layer] = (
            local
            if world == 1
            else ShardedTable(table.num_rows, table.dim, local, group=process_group, prefetch=storage.prefetch)
        )
    for layer, table in placed.items():  # every table built before any is replaced
        layer.table = table
    model.placement = storage
    return model


def _check_plain(table: TableStorage, layer_id: int) -> None:
    """Raise unless ``table`` is a plain device table without optimizer state."""
    if not isinstance(table, DeviceTable):
        raise ValueError(
            f"the table of Engram layer {layer_id} is already placed ({type(table).__name__}); place_tables places "
            "a model's plain device tables once: build a new model to place it differently, or move a run's tables "
            "with `engram tables convert`"
        )
    if table.row_states():
        raise ValueError(
            f"the table of Engram layer {layer_id} has optimizer state ({', '.join(table.row_states())}); place the "
            "tables before building the optimizer, which would otherwise keep updating the old table"
        )


def _local_table(
    storage: StorageConfig, directory: Path | None, source: DeviceTable, start: int, end: int, sparse_grad: bool
) -> LocalTable:
    """Rows ``[start, end)`` of ``source`` in the configured tier: from its seed, or copied if it has drawn them."""
    dtype = DTYPES[storage.dtype]
    rows = source.weight.detach()[start:end] if source.materialized else None  # (end - start, D) or None
    init = dict(init_std=source.init_std, seed=source.seed, first_row=source.first_row + start)
    if storage.tier == "device":
        table = DeviceTable(
            end - start, source.dim, sparse_grad=sparse_grad, dtype=source.dtype, device=source.home_device, **init
        )
    elif storage.tier == "host":
        table = HostTable(
            end - start,
            source.dim,
            dtype=dtype,
            pin_memory=storage.pin_memory,
            cache_bytes=storage.cache_bytes,
            prefetch=storage.prefetch,
            **init,
        )
    else:
        options = storage.disk_options()
        if rows is None:
            return DiskTable(directory, end - start, source.dim, dtype=dtype, **init, **options)
        if (directory / WEIGHT_FILE).exists():
            raise ValueError(
                f"{directory} already holds a table, and this model's table has rows of its own (drawn, loaded or "
                "trained) to place there; choose an empty storage.directory, or place a freshly built model to open "
                "the table on disk"
            )
        return DiskTable.from_tensors(directory, rows.to("cpu", dtype), **options)
    if rows is not None:
        with torch.no_grad():
            table.weight.copy_(rows)
    return table
