"""A table of rows stored in one file and memory-mapped: the on-disk form of an Engram table.

Layout (little-endian), format version 2::

    [0, 4096)            header slot 0
    [4096, 8192)         header slot 1
    [8192, 8192 + R*S)   R row records of S bytes: record r is row r (dim elements of dtype float32,
                         float16, bfloat16 or int64), its 32-bit checksum (``row_checksums``) at the
                         row's length rounded up to 4 bytes, zero padding to S (a multiple of 4 and
                         of the element size): rows of 64 float32 take 260 bytes, int64 rows 16

Each header slot holds the magic ``b"ENGRAMTB"``, uint32 format version, uint32 JSON length,
uint64 sequence number, the JSON ``{"num_rows", "dim", "dtype", "metadata", "row_checksum"}``
(``row_checksum`` names the checksum function, ``"wsum32"``), zero padding, and in its last 32
bytes the SHA-256 of the slot's first 4064 bytes. A header update writes the slot that does not
hold the newest valid header, with the next sequence number; a write torn by a crash therefore
damages only that slot, and opening falls back to the other one.

A row and its checksum share a record, so reading or writing a row touches one page of the file
(two when the record straddles a page boundary), as it would without checksums: a separate region
of checksums would add a page fault to every cold read and a page to every scattered write.

Format version 1 has records of the row alone (S = row bytes) and no ``row_checksum``: such files
still open, read and train, but their rows cannot be checked.

Rows and their checksums are always written together (``write_rows``, ``create``); reads that go
through ``read_rows`` recompute the checksums and raise ``RowChecksumError`` on a mismatch, and
``verify`` checks a whole file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import mmap
import os
import secrets
import struct
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram._files import fsync_dir
from engram.storage.init import NormalStream

MAGIC = b"ENGRAMTB"
VERSION = 2  # what new files are written as; version 1 (no row checksums) is still read
SLOT_BYTES = 4096
DATA_OFFSET = 2 * SLOT_BYTES
_PREFIX = struct.Struct("<8sIIQ")  # magic, version, JSON length, sequence number
_DIGEST_BYTES = 32
_CHECKED_BYTES = SLOT_BYTES - _DIGEST_BYTES  # the slot bytes the SHA-256 covers
MAX_JSON_BYTES = _CHECKED_BYTES - _PREFIX.size
_HEADER_KEYS = {  # by format version
    1: {"num_rows", "dim", "dtype", "metadata"},
    2: {"num_rows", "dim", "dtype", "metadata", "row_checksum"},
}
CHECKSUM_KIND = "wsum32"  # the header's name for ``row_checksums``; a new function would get a new name
CHECKSUM_BYTES = 4

# torch dtype -> numpy dtype of the same width used for the mapping; numpy has no bfloat16, so
# those rows are mapped as int16 and reinterpreted by torch.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),
    "int64": (torch.int64, "<i8"),  # optimizer state such as per-row step counts
}
_CHUNK_BYTES = 64 << 20  # bound on the float32 buffer of one chunk of random rows, and on a verify read
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: its multiples spread the checksum coefficients
_SUM_WORDS = 256  # words per float64 product: |word| <= 2^31 and c < 2^14 keep 256 terms below 2^53, exact
_BLOCK_WORDS = 1 << 18  # words per block of rows: the float64 copy of a block stays in the CPU caches
_SHOWN_ROWS = 10  # damaged rows an error message lists
PAGE_BYTES = mmap.PAGESIZE
# Cold reads. A read of at least ADVISE_MIN_ROWS rows first probes RESIDENCY_SAMPLES of its pages
# (mincore on the mapping, one page each); if any is missing from the page cache, all of its pages are
# advised WILLNEED before the gather.
ADVISE_MIN_ROWS = 64
RESIDENCY_SAMPLES = 32
_GAP_BYTES = PAGE_BYTES  # rows written closer than a page apart share one pwrite (TableFile._write_spans)
_WRITE_CHUNK_ROWS = 8192  # rows per batch of spans: bounds the copy of the gaps (8192 pages at most)


def _libc_mincore() -> Callable[..., int] | None:
    """libc's ``mincore(addr, length, vec)``: which pages of a mapping are in the page cache (bit 0 of each
    byte of ``vec``); None where it cannot be called."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError, TypeError):  # no C library to load symbols from (Windows), no mincore
        return None
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    mincore.restype = ctypes.c_int
    return mincore


_MINCORE = _libc_mincore()


class TableFileError(ValueError):
    """A table file or an argument was refused; the message names the file and what to do."""


class RowChecksumError(TableFileError):
    """Rows read from a table file do not match their stored checksums.

    Attributes:
        path: the file.
        rows: the rows of the read that failed (row numbers of the file), ascending.
    """

    def __init__(self, path: Path, rows: list[int], rows_read: int):
        self.path = path
        self.rows = rows
        shown = ", ".join(str(row) for row in rows[:_SHOWN_ROWS]) + (", ..." if len(rows) > _SHOWN_ROWS else "")
        super().__init__(
            f"{path}: {len(rows)} of the {rows_read} rows read do not match their checksums (rows {shown}). "
            "The file was changed after engram wrote it (disk error or another program): restore the run's tables "
            f"from a copy, or start the run over in a new folder; `engram tables verify {path}` lists every damaged row"
        )


@dataclass
class RowCheck:
    """What checking every row of one table file found (``TableFile.verify``, ``engram tables verify``).

    Attributes:
        path: the file.
        version: its format version (1: no row checksums, so no row was checked; 0: not readable).
        rows_checked: rows compared with their checksums.
        damaged: ``[start, stop)`` ranges of the rows that fail their checksum, ascending.
        error: why the file could not be checked at all (a damaged header, a cut-off file), or None.
    """

    path: Path
    version: int
    rows_checked: int
    damaged: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None

    @property
    def damaged_rows(self) -> int:
        return sum(stop - start for start, stop in self.damaged)

    @property
    def intact(self) -> bool:
        """Readable, and no row fails its checksum (true for a format-1 file, whose rows cannot be checked)."""
        return self.error is None and not self.damaged


@functools.lru_cache(maxsize=32)
def _coefficients(num_words: int) -> torch.Tensor:
    """(num_words,) float64: c_k = (((k + 1) * 0x9E3779B97F4A7C15) mod 2^64) >> 50 | 1, odd and below 2^14."""
    return torch.tensor([((k + 1) * _GOLDEN % 2**64) >> 50 | 1 for k in range(num_words)], dtype=torch.float64)


def row_checksums(values: torch.Tensor) -> torch.Tensor:
    """The checksum of each row of ``values`` (U, ...), any dtype: (U,) int32, as table files store them.

    A row's bytes (little-endian) are read as signed 32-bit words, or signed 16-bit words when the
    row's byte width is not a multiple of 4; its checksum is sum_k c_k * word_k mod 2^32 (stored as
    int32), with the fixed odd coefficients c_k of ``_coefficients``. Any single-bit flip changes it
    (a flip changes a word by +-2^b, the sum by +-2^b * c_k, never 0 mod 2^32 since c_k is odd), and a
    row of zeros has checksum 0, so a new file of zeros needs no checksums written. The sums are
    float64 matrix-vector products of at most 256 words, exact integers below 2^53, combined in
    int64 (measured faster than int64 products on one core).
    """
    count = values.shape[0]
    row_bytes = math.prod(values.shape[1:]) * values.element_size()
    if count == 0 or row_bytes == 0:
        return torch.zeros(count, dtype=torch.int32)
    word = torch.int32 if row_bytes % 4 == 0 else torch.int16
    raw = values.detach().cpu().reshape(count, -1)
    try:  # rows inside wider records (a verify read) are read in place, without a copy
        words = raw.view(torch.uint8).view(word)  # (U, W)
    except RuntimeError:  # strides that a reinterpretation cannot keep
        words = raw.contiguous().view(torch.uint8).view(word)
    num_words = words.shape[1]
    coefficients = _coefficients(num_words)
    sums = torch.zeros(count, dtype=torch.int64)
    block = max(1, _BLOCK_WORDS // num_words)
    for start in range(0, count, block):
        rows = words[start : start + block]
        for first in range(0, num_words, _SUM_WORDS):
            part = rows[:, first : first + _SUM_WORDS].to(torch.float64)
            sums[start : start + block] += torch.mv(part, coefficients[first : first + _SUM_WORDS]).to(torch.int64)
    return (((sums + 2**31) & 0xFFFFFFFF) - 2**31).to(torch.int32)  # the low 32 bits, as a signed int32


def _records(rows: torch.Tensor, checksum_at: int, record_bytes: int) -> torch.Tensor:
    """(U, record_bytes) uint8: the format-2 records of the contiguous rows (U, dim), checksums included."""
    count, row_bytes = rows.shape[0], math.prod(rows.shape[1:]) * rows.element_size()
    records = torch.zeros(count, record_bytes, dtype=torch.uint8)
    records[:, :row_bytes] = rows.contiguous().view(torch.uint8).view(count, row_bytes)
    records[:, checksum_at : checksum_at + CHECKSUM_BYTES] = row_checksums(rows).view(torch.uint8).view(count, -1)
    return records


def _runs(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive ids in ``rows`` (n,): ``(start, end, first id)`` each, positions [start, end) in ``rows``."""
    if rows.numel() == 0:
        return []
    ends = [*((rows[1:] != rows[:-1] + 1).nonzero().squeeze(1) + 1).tolist(), rows.numel()]
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, rows[starts].tolist(), strict=True))


def page_runs(rows: torch.Tensor, record_bytes: int, page_bytes: int = PAGE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The file pages holding the records of ``rows`` (any order, repeats allowed), as runs of consecutive pages.

    A record spans bytes ``[DATA_OFFSET + r * record_bytes, DATA_OFFSET + (r + 1) * record_bytes)``,
    so it touches one page or, straddling a boundary, several. Returns ``(first_page, num_pages)``:
    int64 arrays of the runs, ascending, disjoint and not adjacent (adjacent runs are merged, so
    that one ``posix_fadvise`` covers each).
    """
    ids = rows.reshape(-1).cpu().numpy().astype(np.int64, copy=False)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if ids.size > 1 and (ids[1:] < ids[:-1]).any():  # lookups pass sorted rows: no sort then
        ids = np.sort(ids)
    start = DATA_OFFSET + ids * record_bytes
    first, last = start // page_bytes, (start + record_bytes - 1) // page_bytes  # both ascending
    # A new run starts where a record's first page lies beyond the page after the previous record's last.
    begins = np.flatnonzero(first[1:] > last[:-1] + 1) + 1
    starts = np.concatenate(([0], begins))
    ends = np.concatenate((begins - 1, [ids.size - 1]))  # the last record of each run
    return first[starts], last[ends] - first[starts] + 1


def record_layout(row_bytes: int, itemsize: int, checksummed: bool = True) -> tuple[int, int]:
    """(byte offset of the checksum in a row record, bytes of a record) for rows of ``row_bytes``.

    Without checksums (format 1) a record is the row: ``(row_bytes, row_bytes)``.
    """
    if not checksummed:
        return row_bytes, row_bytes
    checksum_at = -(-row_bytes // CHECKSUM_BYTES) * CHECKSUM_BYTES
    align = max(CHECKSUM_BYTES, itemsize)  # every record starts aligned for its elements and its checksum
    return checksum_at, -(-(checksum_at + CHECKSUM_BYTES) // align) * align


def _dtype_name(dtype: torch.dtype) -> str:
    for name, (tdtype, _) in _DTYPES.items():
        if tdtype == dtype:
            return name
    raise TableFileError(f"dtype {dtype} is not supported for table files; use one of {', '.join(_DTYPES)}")


def _metadata_json(path: Path, num_rows: int, dim: int, dtype: str, metadata: Any, row_checksum: str | None) -> bytes:
    """The header JSON, refusing metadata that is not a JSON object or does not fit in a slot.

    ``row_checksum`` is None for a format-1 file (no checksums, no such key).
    """
    if not isinstance(metadata, dict):
        raise TableFileError(f"{path}: metadata must be a dict, got {type(metadata).__name__}")
    header = {"num_rows": num_rows, "dim": dim, "dtype": dtype, "metadata": metadata}
    if row_checksum is not None:
        header["row_checksum"] = row_checksum
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TableFileError(f"{path}: metadata must be JSON-serialisable (str keys, finite numbers): {e}") from e
    data = text.encode("utf-8")
    if len(data) > MAX_JSON_BYTES:
        raise TableFileError(
            f"{path}: header JSON is {len(data)} bytes, more than the {MAX_JSON_BYTES} a header slot holds; "
            "store less metadata"
        )
    return data


def _slot_bytes(json_bytes: bytes, seq: int, version: int) -> bytes:
    """One 4096-byte header slot."""
    body = _PREFIX.pack(MAGIC, version, len(json_bytes), seq) + json_bytes
    body += bytes(_CHECKED_BYTES - len(body))
    return body + hashlib.sha256(body).digest()


class TableFile:
    """A (num_rows, dim) table in one memory-mapped file; see the module docstring for the layout.

    ``tensor`` is a (num_rows, dim) view of the file (strided: a row is followed by its checksum):
    when opened writable, writes to it reach the file (durably after ``flush``), but not its row
    checksums: write rows with ``write_rows``. A read-only file is mapped read-only: writing to its
    tensor is a memory-protection fault that stops the process, so the file can never change by
    accident.
    """

    def __init__(self, path: Path, file, writable: bool, header: dict, slot: int, seq: int, version: int):
        # use TableFile.open / TableFile.create
        self.path = path
        self.writable = writable
        self.version = version
        self.num_rows: int = header["num_rows"]
        self.dim: int = header["dim"]
        self._dtype_name: str = header["dtype"]
        self._metadata: dict = header["metadata"]
        self.row_checksum: str | None = header.get("row_checksum")  # None: format 1, rows not checksummed
        self._slot = slot  # the slot holding the newest header; the next update writes the other one
        self._seq = seq
        self._file = file
        self._mmap: mmap.mmap | None = mmap.mmap(
            file.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        )
        if hasattr(mmap, "MADV_RANDOM"):
            # Rows are read at hashed, i.e. random, positions: the kernel's read-ahead around each faulted
            # page would read megabytes per row once the file no longer fits in the page cache.
            self._mmap.madvise(mmap.MADV_RANDOM)
        self.row_bytes = self.dim * torch.empty(0, dtype=self.dtype).element_size()
        self._checksum_at, self.record_bytes = record_layout(
            self.row_bytes, self.row_bytes // self.dim, checksummed=self.row_checksum is not None
        )
        array = np.frombuffer(self._mmap, dtype=np.uint8, count=self.num_rows * self.record_bytes, offset=DATA_OFFSET)
        with warnings.catch_warnings():
            # torch warns that a read-only array gives a tensor it cannot protect; the mapping itself does
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            records = torch.from_numpy(array.reshape(self.num_rows, self.record_bytes))  # (R, S) bytes
        self._records: torch.Tensor | None = records  # the file's row records, as mapped
        self._tensor: torch.Tensor | None = records[:, : self.row_bytes].view(self.dtype)  # (R, dim)
        self._checksums: torch.Tensor | None = None
        self._address = array.ctypes.data - DATA_OFFSET  # of the mapping's first byte, for the residency probe
        self._probe_residency = _MINCORE is not None  # cleared if mincore refuses the mapping
        if self.row_checksum is not None:
            self._checksums = records[:, self._checksum_at : self._checksum_at + CHECKSUM_BYTES].view(torch.int32)[:, 0]

    # ---- creation and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        num_rows: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        *,
        init_std: float = 0.0,
        seed: int = 0,
        first_row: int = 0,
        metadata: dict | None = None,
        chunk_rows: int | None = None,
        overwrite: bool = False,
    ) -> TableFile:
        """Write a new table file (format ``VERSION``, rows checksummed) at ``path`` and return it opened writable.

        ``init_std == 0`` gives zeros (a sparse file: instant at any size; zero rows have checksum 0);
        ``init_std > 0`` gives rows ~ N(0, init_std^2), written with their checksums ``chunk_rows`` rows at a
        time (default: ~64 MiB of float32), the same bytes for the same (seed, shape, dtype) whatever
        ``chunk_rows``; with ``first_row`` the rows are rows ``[first_row, first_row + num_rows)`` of that table
        (a shard of it). The file is built under a temporary name and renamed into place, so ``path`` never
        holds a half-written table.
        """
        path = Path(path)
        for name, value in (("num_rows", num_rows), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TableFileError(f"{path}: {name} must be an integer >= 1, got {value!r}")
        dtype_name = _dtype_name(dtype)
        if not isinstance(init_std, (int, float)) or not math.isfinite(init_std) or init_std < 0:
            raise TableFileError(f"{path}: init_std must be a finite number >= 0, got {init_std!r}")
        if init_std > 0 and not dtype.is_floating_point:
            raise TableFileError(f"{path}: random rows need a floating-point dtype, got {dtype}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TableFileError(f"{path}: seed must be an integer, got {seed!r}")
        if chunk_rows is None:
            chunk_rows = max(1, _CHUNK_BYTES // (dim * 4))
        elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise TableFileError(f"{path}: chunk_rows must be an integer >= 1, got {chunk_rows!r}")
        header = _metadata_json(path, num_rows, dim, dtype_name, {} if metadata is None else metadata, CHECKSUM_KIND)
        if path.exists() and not overwrite:
            raise TableFileError(f"{path} already exists; pass overwrite=True to replace it, or open it")

        itemsize = torch.empty(0, dtype=dtype).element_size()
        checksum_at, record_bytes = record_layout(dim * itemsize, itemsize)
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                # both slots hold the same header; slot 0 has the higher sequence number, so it is current
                f.write(_slot_bytes(header, 1, VERSION) + _slot_bytes(header, 0, VERSION))
                f.truncate(DATA_OFFSET + num_rows * record_bytes)  # sparse zeros: zero rows, checksums 0
                if init_std > 0:
                    stream = NormalStream(seed)
                    for start in range(0, num_rows, chunk_rows):
                        stop = min(num_rows, start + chunk_rows)
                        values = stream.take((first_row + start) * dim, (first_row + stop) * dim) * init_std
                        records = _records(values.to(dtype).view(stop - start, dim), checksum_at, record_bytes)
                        f.seek(DATA_OFFSET + start * record_bytes)
                        f.write(records.numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        return cls.open(path, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> TableFile:
        """Open an existing table file, checking its headers and size; raises TableFileError if refused."""
        path = Path(path)
        if sys.byteorder != "little":
            raise TableFileError(f"{path}: table files are little-endian and this machine is not")
        # kept open for the table's lifetime (header updates, fadvise): not a with block
        file = open(path, "r+b" if writable else "rb")  # noqa: SIM115  (FileNotFoundError for a missing file)
        try:
            header, slot, seq, version = cls._read_header(path, file)
            return cls(path, file, writable, header, slot, seq, version)
        except BaseException:
            file.close()
            raise

    @staticmethod
    def _read_header(path: Path, file) -> tuple[dict, int, int, int]:
        """(header dict, slot index, sequence number, version) of the newest valid slot; checks the file size."""
        size = os.fstat(file.fileno()).st_size
        head = file.read(DATA_OFFSET)
        if not head.startswith(MAGIC):
            raise TableFileError(f"{path} is not an engram table file (it does not start with {MAGIC!r})")
        if size < DATA_OFFSET:
            raise TableFileError(
                f"{path} is not an engram table file: {size} bytes, shorter than the {DATA_OFFSET}-byte header; "
                "the file was cut short, recreate it"
            )
        valid = []  # (seq, slot, version, json bytes)
        for slot in (0, 1):
            raw = head[slot * SLOT_BYTES : (slot + 1) * SLOT_BYTES]
            if hashlib.sha256(raw[:_CHECKED_BYTES]).digest() != raw[_CHECKED_BYTES:]:
                continue
            magic, version, length, seq = _PREFIX.unpack_from(raw)
            if magic == MAGIC and length <= MAX_JSON_BYTES:
                valid.append((seq, slot, version, raw[_PREFIX.size : _PREFIX.size + length]))
        if not valid:
            raise TableFileError(
                f"{path}: header damaged (neither header slot passes its checksum); the file cannot be trusted, "
                "recreate it or restore it from a copy"
            )
        valid.sort(key=lambda v: (-v[0], v[1]))  # newest first; slot 0 wins a tie
        headers = []
        for seq, slot, version, raw_json in valid:
            if version not in _HEADER_KEYS:
                raise TableFileError(
                    f"{path}: header format version {version}, written by a newer version of engram "
                    f"(this one reads versions {', '.join(map(str, _HEADER_KEYS))}); upgrade engram"
                )
            headers.append((TableFile._parse_header(path, raw_json, version), slot, seq, version))
        header, slot, seq, version = headers[0]
        layout = ("num_rows", "dim", "dtype", "row_checksum")
        for other, _, _, other_version in headers[1:]:
            if (other_version, *(other.get(key) for key in layout)) != (version, *(header.get(key) for key in layout)):
                raise TableFileError(
                    f"{path}: the two header slots disagree on the table's format, shape or dtype "
                    f"(version {other_version}, {other['num_rows']}x{other['dim']} {other['dtype']} vs version "
                    f"{version}, {header['num_rows']}x{header['dim']} {header['dtype']}); the file cannot be trusted"
                )
        itemsize = torch.empty(0, dtype=_DTYPES[header["dtype"]][0]).element_size()
        _, record_bytes = record_layout(header["dim"] * itemsize, itemsize, checksummed=version >= 2)
        expected = DATA_OFFSET + header["num_rows"] * record_bytes
        if size != expected:
            what = "truncated" if size < expected else "too long"
            parts = f"{DATA_OFFSET} + {header['num_rows']} rows x {record_bytes} bytes"
            if version >= 2:
                parts += f" ({header['dim']} x {itemsize} and a checksum)"
            raise TableFileError(
                f"{path}: {what}: expected {expected} bytes from the header ({parts}), found {size}; "
                "the file is incomplete or damaged, recreate it"
            )
        return header, slot, seq, version

    @staticmethod
    def _parse_header(path: Path, raw_json: bytes, version: int) -> dict:
        try:
            header = json.loads(raw_json.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise TableFileError(f"{path}: header JSON cannot be read ({e}); the file is damaged") from e
        keys = _HEADER_KEYS[version]
        if not isinstance(header, dict) or set(header) != keys:
            found = sorted(header) if isinstance(header, dict) else type(header).__name__
            raise TableFileError(
                f"{path}: a version {version} header must be a JSON object with keys {sorted(keys)}, got {found}; "
                "the file is damaged"
            )
        for key in ("num_rows", "dim"):
            value = header[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TableFileError(f"{path}: header {key} must be an integer >= 1, got {value!r}")
        if header["dtype"] not in _DTYPES:
            raise TableFileError(
                f"{path}: unknown dtype {header['dtype']!r} in the header (this version reads {', '.join(_DTYPES)})"
            )
        if not isinstance(header["metadata"], dict):
            raise TableFileError(f"{path}: header metadata must be a JSON object, got {header['metadata']!r}")
        if version >= 2 and header["row_checksum"] != CHECKSUM_KIND:
            raise TableFileError(
                f"{path}: rows checksummed with {header['row_checksum']!r}, which this version of engram does not "
                f"know (it computes {CHECKSUM_KIND!r}); upgrade engram"
            )
        return header

    # ---- the open table -------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self._dtype_name][0]

    @property
    def metadata(self) -> dict:
        """A copy of the user metadata stored in the header."""
        return json.loads(json.dumps(self._metadata))

    @property
    def nbytes(self) -> int:
        """Bytes of row data: num_rows * dim * itemsize."""
        return self.num_rows * self.dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def tensor(self) -> torch.Tensor:
        """The (num_rows, dim) table, a view of the file mapping."""
        if self._tensor is None:
            raise TableFileError(f"{self.path} is closed")
        return self._tensor

    @property
    def checksums(self) -> torch.Tensor | None:
        """The (num_rows,) int32 row checksums, a view of the file mapping; None for a format-1 file."""
        if self._tensor is None:
            raise TableFileError(f"{self.path} is closed")
        return self._checksums

    def read_rows(self, rows: torch.Tensor, out: torch.Tensor | None = None, verify: bool = True) -> torch.Tensor:
        """Rows (U,) int64 of the table: (U, dim), gathered into ``out`` if given.

        With ``verify`` (and a format-2 file) each row's checksum is recomputed and compared with the
        stored one (about a quarter of the gather's cost); the two sit in one record, so the check reads
        no other page of the file. A read of ``ADVISE_MIN_ROWS`` rows or more first asks the kernel for
        all of its pages that are not cached (``will_need``), so that a cold read waits for the disk
        once, not once per page.

        Raises:
            RowChecksumError: a row does not match its checksum (the message names the file and rows).
        """
        if rows.numel() >= ADVISE_MIN_ROWS:
            self.will_need(rows)
        values = self.tensor.index_select(0, rows) if out is None else torch.index_select(self.tensor, 0, rows, out=out)
        if verify and self._checksums is not None:
            bad = (row_checksums(values) != self._checksums.index_select(0, rows)).nonzero().squeeze(1)
            if bad.numel():
                raise RowChecksumError(self.path, rows[bad].sort().values.tolist(), rows.numel())
        return values

    def will_need(self, rows: torch.Tensor, check_resident: bool = True) -> bool:
        """Start reading the pages of ``rows`` that are not in the page cache, all at once; True if it did.

        Gathering rows from a mapping whose pages are on disk takes one page fault per page, each a
        disk read waited for before the next is asked (queue depth 1). ``posix_fadvise(WILLNEED)``
        per run of the rows' pages (``page_runs``: sorted, deduplicated, adjacent pages merged)
        queues them in the kernel instead, as deep as the disk takes them; the gather then finds
        them in the page cache, or waits for a page already on its way.

        Each call costs a system call per run even when the pages are cached, so with
        ``check_resident`` it first asks whether the first pages of ``RESIDENCY_SAMPLES`` of the rows,
        spread evenly over them, are in the page cache (``looks_cached``) and skips the advice if every
        sampled page is: a read with a few pages missing then takes a few faults, one that misses a
        sizeable share of them is advised. Where the probe is not supported every call advises.
        """
        if self._tensor is None:
            raise TableFileError(f"{self.path} is closed")
        if not hasattr(os, "posix_fadvise"):
            return False
        if check_resident and self.looks_cached(rows):
            return False
        first, count = page_runs(rows, self.record_bytes)
        fd = self._file.fileno()
        for page, pages in zip((first * PAGE_BYTES).tolist(), (count * PAGE_BYTES).tolist(), strict=True):
            os.posix_fadvise(fd, page, pages, os.POSIX_FADV_WILLNEED)
        return True

    def looks_cached(self, rows: torch.Tensor) -> bool:
        """Whether the pages of ``RESIDENCY_SAMPLES`` of ``rows`` (any shape), spread evenly over them, are all in
        the page cache (``pages_cached``; False where that probe is not supported)."""
        flat = rows.reshape(-1)
        picks = flat[torch.linspace(0, flat.numel() - 1, min(RESIDENCY_SAMPLES, flat.numel())).long()]
        return all(self.pages_cached(picks))

    def pages_cached(self, rows: torch.Tensor) -> list[bool]:
        """For each of ``rows`` (any shape, flattened), whether the page holding the start of its record is in the
        page cache: one ``mincore`` call each (all False where that probe is not supported).

        ``mincore`` reads nothing. A page of a sparse file that was never written (a hole: a fresh
        optimizer-state file is all holes) is not in the page cache until something reads it; it is
        then a page of zeros that the first touch through the mapping faults in without the disk, one
        fault at a time, so it counts as missing, and advising it fills it in ahead. (A non-blocking
        read, the other way to ask, reads a hole as if cached.) On Linux, ``mincore`` reports the
        page cache for files the process owns or may write; for others it sees only the pages this
        process has touched, so such a table is advised more often than it needs.
        """
        if self._tensor is None:
            raise TableFileError(f"{self.path} is closed")
        ids = rows.reshape(-1).tolist()
        if not self._probe_residency:
            return [False] * len(ids)
        status, found = ctypes.c_ubyte(), []
        for row in ids:
            page = (DATA_OFFSET + row * self.record_bytes) // PAGE_BYTES * PAGE_BYTES
            if _MINCORE(self._address + page, 1, ctypes.byref(status)) != 0:  # ENOMEM, EINVAL: no probe here
                self._probe_residency = False
                return [False] * len(ids)
            found.append(bool(status.value & 1))
        return found

    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows (U,) (distinct, any order) with values (U, dim), and their checksums.

        The rows are written in ascending order, one ``pwrite`` per span of rows whose gaps are
        shorter than a page (``_write_spans``); the mapping sees the new values at once (one page
        cache). Storing rows into the mapping instead would mark whole cached chunks of the file dirty
        (the kernel may cache a file in blocks much larger than a page), so that writing back a few
        scattered rows rewrites megabytes.
        """
        if not self.writable:
            raise TableFileError(f"{self.path} is open read-only; open it with writable=True to write rows")
        data = values.to(device="cpu", dtype=self.dtype).contiguous().view(-1, self.dim)
        rows = rows.reshape(-1).cpu()
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            rows, order = rows.sort()
            data = data[order]
        if self._checksums is None:  # format 1: a record is the row
            records = data.view(torch.uint8).view(-1, self.record_bytes)
        else:
            records = _records(data, self._checksum_at, self.record_bytes)
        for start in range(0, rows.numel(), _WRITE_CHUNK_ROWS):  # bounds the copy of the gaps' bytes
            self._write_spans(rows[start : start + _WRITE_CHUNK_ROWS], records[start : start + _WRITE_CHUNK_ROWS])

    def _write_spans(self, rows: torch.Tensor, records: torch.Tensor) -> None:
        """Write ``records`` (U, S) uint8 of ascending distinct ``rows`` (U,), one ``pwrite`` per span.

        A span is a run of rows in which each gap (rows not written) is shorter than ``_GAP_BYTES``, a
        page: its bytes are copied from the mapping and written back unchanged around the new records.
        A gap shorter than a page contains no whole page, so its bytes lie in the pages of the records
        on either side, which the write dirties anyway: the span dirties the same pages as one write
        per row, with fewer system calls (rows a few records apart, as a checkpoint's write-back of
        many rows has them, share one). Rewriting bytes with the values they hold changes nothing a
        crash could tear; only this process writes the file, so they cannot change in between.
        """
        size = self.record_bytes
        count = rows.numel()
        breaks = ((rows[1:] - rows[:-1] - 1) * size >= _GAP_BYTES).nonzero().squeeze(1) + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])  # (P,) first position of each span
        members = torch.diff(torch.cat([starts, torch.tensor([count])]))  # (P,) new records per span
        firsts = rows[starts]
        lengths = rows[starts + members - 1] - firsts + 1  # (P,) records spanned, gaps included
        offsets = torch.cumsum(lengths, 0) - lengths  # (P,) each span's first record in the buffer
        if int(lengths.sum()) == count:  # no gaps: the spans are runs of consecutive rows
            buffer = records
        else:
            shift = torch.repeat_interleave(firsts - offsets, lengths)  # (T,) row id - buffer position, per span
            buffer = self._records.index_select(0, torch.arange(shift.numel()) + shift)  # (T, S) what the file holds
            buffer[rows - torch.repeat_interleave(firsts - offsets, members)] = records
        raw = memoryview(buffer.contiguous().numpy()).cast("B")
        file_at = (DATA_OFFSET + firsts * size).tolist()  # per span: where it goes, where it is in raw, bytes
        for at, begin, length in zip(file_at, (offsets * size).tolist(), (lengths * size).tolist(), strict=True):
            self._pwrite(raw[begin : begin + length], at)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        """Write all of the bytes ``view`` at byte ``offset`` of the file."""
        while view:  # pwrite may write less than asked
            written = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def verify(self, chunk_bytes: int = _CHUNK_BYTES) -> RowCheck:
        """Check every row against its stored checksum, reading the file about ``chunk_bytes`` at a time.

        The file is read with ``pread`` (sequential, with the kernel's read-ahead) rather than through
        the mapping (advised random: a fault per 4 KiB), so a table larger than RAM is scanned at the
        disk's speed in bounded memory. A format-1 file has no checksums: nothing is checked.
        """
        if self.checksums is None:
            return RowCheck(self.path, self.version, 0)
        chunk_rows = min(self.num_rows, max(1, chunk_bytes // self.record_bytes))
        buffer = bytearray(chunk_rows * self.record_bytes)
        at = self._checksum_at
        damaged: list[tuple[int, int]] = []
        for start in range(0, self.num_rows, chunk_rows):
            n = min(self.num_rows - start, chunk_rows)
            records = self._pread(buffer, n * self.record_bytes, DATA_OFFSET + start * self.record_bytes)
            records = records.view(n, self.record_bytes)
            stored = records[:, at : at + CHECKSUM_BYTES].view(torch.int32)[:, 0]
            bad = (row_checksums(records[:, : self.row_bytes]) != stored).nonzero().squeeze(1) + start
            for run_start, run_end, first in _runs(bad):
                if damaged and damaged[-1][1] == first:  # a run that goes on from the previous chunk
                    damaged[-1] = (damaged[-1][0], first + run_end - run_start)
                else:
                    damaged.append((first, first + run_end - run_start))
        return RowCheck(self.path, self.version, self.num_rows, damaged)

    def _pread(self, buffer: bytearray, size: int, offset: int) -> torch.Tensor:
        """``size`` bytes of the file from ``offset``, read into ``buffer``: a (size,) uint8 view of it."""
        view = memoryview(buffer)[:size]
        done = 0
        while done < size:
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise TableFileError(f"{self.path} ended at byte {offset + done} while being read; it was cut short")
            done += n
        return torch.frombuffer(buffer, dtype=torch.uint8, count=size)

    def flush(self) -> None:
        """Write changed rows to the file and wait for the disk (msync)."""
        if self._mmap is None:
            raise TableFileError(f"{self.path} is closed")
        if self.writable:
            self._mmap.flush()

    def set_metadata(self, metadata: dict) -> None:
        """Replace the header metadata, crash-safely: data is flushed first, then the other header slot is written."""
        if not self.writable:
            raise TableFileError(f"{self.path} is open read-only; open it with writable=True to change the metadata")
        header = _metadata_json(self.path, self.num_rows, self.dim, self._dtype_name, metadata, self.row_checksum)
        self.flush()  # the new header may describe this data (e.g. a step count), so the data goes first
        slot = 1 - self._slot
        os.pwrite(self._file.fileno(), _slot_bytes(header, self._seq + 1, self.version), slot * SLOT_BYTES)
        os.fsync(self._file.fileno())
        self._slot, self._seq = slot, self._seq + 1
        self._metadata = json.loads(header)["metadata"]

    def warm_page_cache(self, chunk_bytes: int = _CHUNK_BYTES) -> None:
        """Read the whole file once, sequentially (``pread``), so that its pages are in the page cache
        (for warm-cache benchmarks).

        A new optimizer-state file is sparse: until then its pages enter the cache one fault at a
        time, when the optimizer first reads a row there (a major fault, though nothing is read from
        the disk), which a warm table's rows do not pay. Memory is bounded by ``chunk_bytes``.
        """
        size = os.fstat(self._file.fileno()).st_size
        buffer = bytearray(max(1, min(chunk_bytes, size)))
        for offset in range(0, size, len(buffer)):
            self._pread(buffer, min(len(buffer), size - offset), offset)

    def evict_page_cache(self) -> None:
        """Flush, then ask the OS to drop this file's cached pages (for cold-cache benchmarks).

        Linux only (madvise + posix_fadvise); elsewhere this only flushes. Pages still in use
        elsewhere may stay cached: it is advice, not a guarantee.
        """
        self.flush()
        # pages mapped into this process are not dropped by fadvise; unmapping them from the page
        # tables first (contents stay in the file, the next access faults them back in) lets it drop them
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Flush and release the file. Tensors still referencing the mapping keep it alive until they are freed."""
        if self._mmap is None:
            return
        self.flush()
        self._tensor = self._checksums = self._records = None
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes away with it
            self._mmap.close()
        self._mmap = None
        self._file.close()

    def __enter__(self) -> TableFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        shape = f"{self.num_rows}x{self.dim} {self._dtype_name}"
        return f"TableFile({str(self.path)!r}, {shape}, format {self.version}, {mode})"
