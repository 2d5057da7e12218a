"""Which tier a model's Engram tables live in, chosen by config, and the factory that builds them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from engram._json_config import ConfigError, JsonConfig, require
from engram.storage.base import TableStorage
from engram.storage.device import DeviceTable
from engram.storage.disk import DiskTable
from engram.storage.init import draw_seed
from engram.storage.offload import HostTable
from engram.storage.sharded import ShardedTable, shard_ranges

Tier = Literal["device", "host", "disk"]
LAYER_FOLDER = "layer_{:02d}"  # the disk tier's folder of one layer's table, inside StorageConfig.directory
SHARD_FOLDER = "shard_{rank:05d}_of_{world:05d}"  # a rank's shard of a disk table, inside its layer folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StorageConfig(JsonConfig):
    """Where the Engram tables live; every tier gives the same lookups and updates.

    Attributes:
        tier: ``"device"``: a parameter on the model's device (default); ``"host"``: CPU memory
            (rows gathered and copied to the device per batch); ``"disk"``:
            memory-mapped files, one folder per layer under ``directory``. Under ``torchrun`` each
            rank keeps its shard of every table's rows in this tier (``ShardedTable``).
        directory: the disk tier's folder (``layer_<i>/`` inside); a training run defaults it to
            ``<run>/tables``.
        cache_mb: hot-row cache per table in MiB (host and disk tiers; 0 disables it).
        prefetch: fetch each layer's rows in a background thread as soon as a batch is known.
        journal: disk tier: keep an undo journal so a crash between checkpoints can be rolled back.
        write_buffer_mb: disk tier: memory per table for rows the optimizer rewrites, written back to
            the files when displaced or at a checkpoint (0: every update goes to the files at once).
        dtype: of the table rows (``float32``, ``bfloat16``, ``float16``); host and disk tiers only,
            a device table follows the model's dtype.
        pin_memory: host tier: page-lock the whole table (default no: rows bound for a GPU are
            gathered into page-locked staging memory per lookup either way).
        verify_rows: disk tier: check every row read from a table or optimizer-state file against
            its stored checksum (a damaged row stops the run with an error naming the file and row).
            Checksums are always written; this only switches the check on read.
    """

    tier: Tier = "device"
    directory: str | None = None
    cache_mb: float = 0.0
    prefetch: bool = True
    journal: bool = True
    write_buffer_mb: float = 64.0
    dtype: str = "float32"
    pin_memory: bool = False
    verify_rows: bool = True

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"expected a storage dtype, one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("cache_mb", "write_buffer_mb"):
            require(self, name, ge=0)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 2**20)

    def layer_directory(self, layer_id: int) -> Path:
        """The disk tier's folder of layer ``layer_id``."""
        if self.directory is None:
            raise ValueError("the disk tier needs storage.directory, the folder that holds the table files")
        return Path(self.directory) / LAYER_FOLDER.format(layer_id)


def build_table(
    config: StorageConfig, layer_id: int, num_rows: int, dim: int, init_std: float, sparse_grad: bool = True
) -> TableStorage:
    """The table of layer ``layer_id`` in the configured tier (a disk table is opened if it exists).

    Under ``torch.distributed`` with more than one rank the table is row-sharded
    (``ShardedTable``): this rank keeps its shard in the configured tier. A table's initial rows
    depend only on its seed, drawn here from torch's global generator, so a seeded model starts
    from the same rows in every tier and at every world size.
    """
    seed = draw_seed()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    start, end = shard_ranges(num_rows, world)[rank]
    directory = None
    if config.tier == "disk":
        directory = config.layer_directory(layer_id)
        if world > 1:
            directory = directory / SHARD_FOLDER.format(rank=rank, world=world)
    local = _local_table(config, directory, end - start, dim, init_std, seed, start, sparse_grad)
    return local if world == 1 else ShardedTable(num_rows, dim, local)


def _local_table(
    config: StorageConfig,
    directory: Path | None,
    num_rows: int,
    dim: int,
    init_std: float,
    seed: int,
    first_row: int,
    sparse_grad: bool,
) -> TableStorage:
    """Rows ``[first_row, first_row + num_rows)`` of a table, in the configured tier."""
    dtype = DTYPES[config.dtype]
    init = dict(init_std=init_std, seed=seed, first_row=first_row)
    if config.tier == "device":
        return DeviceTable(num_rows, dim, sparse_grad=sparse_grad, **init)
    if config.tier == "host":
        return HostTable(
            num_rows,
            dim,
            dtype=dtype,
            pin_memory=config.pin_memory,
            cache_bytes=config.cache_bytes,
            prefetch=config.prefetch,
            **init,
        )
    return DiskTable(
        directory,
        num_rows,
        dim,
        dtype=dtype,
        cache_bytes=config.cache_bytes,
        prefetch=config.prefetch,
        journal=config.journal,
        write_buffer_bytes=int(config.write_buffer_mb * 2**20),
        verify_rows=config.verify_rows,
        **init,
    )
