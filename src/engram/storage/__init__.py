"""Where Engram tables live: the storage interfaces (``TableStorage``, ``LocalTable``, ``Durable``), the tiers
(device, host memory, disk), row sharding and ``place_tables``, which puts a plainly built model's tables in a tier."""

from engram.storage.base import Durable, LocalTable, TableStorage, durable
from engram.storage.config import StorageConfig
from engram.storage.device import DeviceTable
from engram.storage.disk import DiskTable, TableStateError
from engram.storage.offload import HostTable, OffloadedTable
from engram.storage.placement import place_tables
from engram.storage.prefetch import FetchedRows, PendingRows
from engram.storage.sharded import ShardedTable, shard_ranges

__all__ = [
    "DeviceTable",
    "DiskTable",
    "Durable",
    "FetchedRows",
    "HostTable",
    "LocalTable",
    "OffloadedTable",
    "PendingRows",
    "ShardedTable",
    "StorageConfig",
    "TableStateError",
    "TableStorage",
    "durable",
    "place_tables",
    "shard_ranges",
]
