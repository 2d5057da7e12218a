"""Where Engram tables live: the storage interface, its tiers (device, host memory, disk) and row sharding."""

from engram.storage.base import TableStorage
from engram.storage.config import StorageConfig, build_table
from engram.storage.device import DeviceTable
from engram.storage.disk import DiskTable, TableStateError
from engram.storage.offload import HostTable, OffloadedTable
from engram.storage.prefetch import FetchedRows, PendingRows
from engram.storage.sharded import ShardedTable, shard_ranges

__all__ = [
    "DeviceTable",
    "DiskTable",
    "FetchedRows",
    "HostTable",
    "OffloadedTable",
    "PendingRows",
    "ShardedTable",
    "StorageConfig",
    "TableStateError",
    "TableStorage",
    "build_table",
    "shard_ranges",
]
