"""Which tier a model's Engram tables live in, as a config (``engram.storage.place_tables`` applies it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from engram._json_config import ConfigError, JsonConfig, require

Tier = Literal["device", "host", "disk"]
LAYER_FOLDER = "layer_{:02d}"  # the disk tier's folder of one layer's table, inside StorageConfig.directory
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StorageConfig(JsonConfig):
    """Where the Engram tables live; every tier gives the same lookups and updates.

    Attributes:
        tier: ``"device"``: a parameter on the model's device (default); ``"host"``: CPU memory
            (rows gathered and copied to the device per batch); ``"disk"``:
            memory-mapped files, one folder per layer under ``directory``. Placed over a process
            group of several ranks, each rank keeps its shard of every table's rows in this tier
            (``ShardedTable``).
        directory: the disk tier's folder (``layer_<i>/`` inside); a training run defaults it to
            ``<run>/tables``.
        cache_mb: hot-row cache per table in MiB (host and disk tiers; 0 disables it).
        prefetch: fetch each layer's rows in a background thread as soon as a batch is known (a sharded
            table starts its rows exchange then, from the main thread).
        read_ahead: disk tier: when the next batch is known (the trainer and ``evaluate`` announce
            it), ask the kernel for its rows' file pages while the current batch computes. A hint to
            the page cache: results are the same either way.
        journal: disk tier: keep an undo journal so a crash between checkpoints can be rolled back.
        write_buffer_mb: disk tier: memory per table for rows the optimizer rewrites, written back to
            the files when displaced or at a checkpoint (0: every update goes to the files at once).
        background_write_back: disk tier: write displaced rows back (journal first) on a worker thread
            while training goes on, rather than in the optimizer step. The rows are the same either way.
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
    read_ahead: bool = True
    journal: bool = True
    write_buffer_mb: float = 64.0
    background_write_back: bool = True
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

    def disk_options(self) -> dict[str, object]:
        """The ``DiskTable`` keyword arguments this config sets (cache, prefetch, read-ahead, journal, write buffer
        and its write-back, row checks)."""
        return {
            "cache_bytes": self.cache_bytes,
            "prefetch": self.prefetch,
            "read_ahead": self.read_ahead,
            "journal": self.journal,
            "write_buffer_bytes": int(self.write_buffer_mb * 2**20),
            "background_write_back": self.background_write_back,
            "verify_rows": self.verify_rows,
        }

    def layer_directory(self, layer_id: int) -> Path:
        """The disk tier's folder of layer ``layer_id``."""
        if self.directory is None:
            raise ValueError("the disk tier needs storage.directory, the folder that holds the table files")
        return Path(self.directory) / LAYER_FOLDER.format(layer_id)
