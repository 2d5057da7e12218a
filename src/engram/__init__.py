"""engram: conditional memory for language models (hashed n-gram lookup, gated into the residual stream)."""

from engram._checks import debug_checks, set_debug_checks
from engram.config import EngramConfig
from engram.indexing import CompressedTokenizer, EngramIndexer, NgramHasher, engram_table_sizes
from engram.memory import Engram
from engram.storage import DeviceTable, TableStorage

__version__ = "0.1.0"

__all__ = [
    "CompressedTokenizer",
    "DeviceTable",
    "Engram",
    "EngramConfig",
    "EngramIndexer",
    "NgramHasher",
    "TableStorage",
    "debug_checks",
    "engram_table_sizes",
    "set_debug_checks",
]
