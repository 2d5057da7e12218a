"""Where Engram tables live: the storage interface and its tiers."""

from engram.storage.base import TableStorage
from engram.storage.device import DeviceTable

__all__ = ["DeviceTable", "TableStorage"]
