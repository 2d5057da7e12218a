"""Token data: corpora, their preparation into memory-mapped token shards, and training/evaluation windows.

- ``open_source`` / ``engram.data.sources``: documents from ``"shakespeare"`` (bundled), ``"wikipedia"``
  (fetched once), a text or JSON-lines file (gzip or not) or a folder of them, streamed as ``(doc_id, text)``.
- ``prepare_dataset``: documents -> per-split uint32 token files with document offsets, a document-level
  train/val/test split by hash, a trimmed output vocabulary and a manifest (``engram.data.dataset``).
- ``TokenDataset``: opens a prepared folder, checked, with memory-mapped tokens.
- ``RandomWindows``, ``sequential_windows``: training and evaluation batches from a flat token array.
"""

from engram.data.batches import RandomWindows, sequential_windows
from engram.data.dataset import SPLITS, TokenDataset
from engram.data.fetch import FetchError
from engram.data.prepare import default_separator_id, prepare_dataset, split_of
from engram.data.sources import DocumentSource, as_source, open_source
from engram.data.text import clean_text

__all__ = [
    "SPLITS",
    "DocumentSource",
    "FetchError",
    "RandomWindows",
    "TokenDataset",
    "as_source",
    "clean_text",
    "default_separator_id",
    "open_source",
    "prepare_dataset",
    "sequential_windows",
    "split_of",
]
