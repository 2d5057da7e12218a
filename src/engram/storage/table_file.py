"""A table of rows stored in one file and memory-mapped: the on-disk form of an Engram table.

Layout (little-endian)::

    [0, 4096)      header slot 0
    [4096, 8192)   header slot 1
    [8192, end)    num_rows * dim elements, row-major, dtype float32, float16, bfloat16 or int64

Each header slot holds the magic ``b"ENGRAMTB"``, uint32 format version, uint32 JSON length,
uint64 sequence number, the JSON ``{"num_rows", "dim", "dtype", "metadata"}``, zero padding, and
in its last 32 bytes the SHA-256 of the slot's first 4064 bytes. A header update writes the slot
that does not hold the newest valid header, with the next sequence number; a write torn by a crash
therefore damages only that slot, and opening falls back to the other one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import secrets
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram._files import fsync_dir
from engram.storage.init import NormalStream

MAGIC = b"ENGRAMTB"
VERSION = 1
SLOT_BYTES = 4096
DATA_OFFSET = 2 * SLOT_BYTES
_PREFIX = struct.Struct("<8sIIQ")  # magic, version, JSON length, sequence number
_DIGEST_BYTES = 32
_CHECKED_BYTES = SLOT_BYTES - _DIGEST_BYTES  # the slot bytes the SHA-256 covers
MAX_JSON_BYTES = _CHECKED_BYTES - _PREFIX.size
_HEADER_KEYS = {"num_rows", "dim", "dtype", "metadata"}

# torch dtype -> numpy dtype of the same width used for the mapping; numpy has no bfloat16, so
# those rows are mapped as int16 and reinterpreted by torch.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),
    "int64": (torch.int64, "<i8"),  # optimizer state such as per-row step counts
}
_CHUNK_BYTES = 64 << 20  # bound on the float32 buffer of one chunk of random rows


class TableFileError(ValueError):
    """A table file or an argument was refused; the message names the file and what to do."""


def _dtype_name(dtype: torch.dtype) -> str:
    for name, (tdtype, _) in _DTYPES.items():
        if tdtype == dtype:
            return name
    raise TableFileError(f"dtype {dtype} is not supported for table files; use one of {', '.join(_DTYPES)}")


def _metadata_json(path: Path, num_rows: int, dim: int, dtype: str, metadata: Any) -> bytes:
    """The header JSON, refusing metadata that is not a JSON object or does not fit in a slot."""
    if not isinstance(metadata, dict):
        raise TableFileError(f"{path}: metadata must be a dict, got {type(metadata).__name__}")
    header = {"num_rows": num_rows, "dim": dim, "dtype": dtype, "metadata": metadata}
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


def _slot_bytes(json_bytes: bytes, seq: int) -> bytes:
    """One 4096-byte header slot."""
    body = _PREFIX.pack(MAGIC, VERSION, len(json_bytes), seq) + json_bytes
    body += bytes(_CHECKED_BYTES - len(body))
    return body + hashlib.sha256(body).digest()


def _tensor_bytes(values: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU tensor of any dtype (bfloat16 included)."""
    return values.contiguous().view(torch.uint8).numpy().tobytes()


class TableFile:
    """A (num_rows, dim) table in one memory-mapped file; see the module docstring for the layout.

    ``tensor`` is a (num_rows, dim) view of the file: when opened writable, writes to it reach the
    file (durably after ``flush``). A read-only file is mapped read-only: writing to its tensor is
    a memory-protection fault that stops the process, so the file can never change by accident.
    """

    def __init__(self, path: Path, file, writable: bool, header: dict, slot: int, seq: int):
        # use TableFile.open / TableFile.create
        self.path = path
        self.writable = writable
        self.num_rows: int = header["num_rows"]
        self.dim: int = header["dim"]
        self._dtype_name: str = header["dtype"]
        self._metadata: dict = header["metadata"]
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
        tdtype, npdtype = _DTYPES[self._dtype_name]
        array = np.frombuffer(self._mmap, dtype=npdtype, count=self.num_rows * self.dim, offset=DATA_OFFSET)
        with warnings.catch_warnings():
            # torch warns that a read-only array gives a tensor it cannot protect; the mapping itself does
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            tensor = torch.from_numpy(array.reshape(self.num_rows, self.dim))
        self._tensor: torch.Tensor | None = tensor.view(tdtype)

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
        """Write a new table file at ``path`` and return it opened writable.

        ``init_std == 0`` gives zeros (a sparse file: instant at any size); ``init_std > 0`` gives
        rows ~ N(0, init_std^2), written ``chunk_rows`` rows at a time (default: ~64 MiB of float32),
        the same bytes for the same (seed, shape, dtype) whatever ``chunk_rows``; with ``first_row`` the
        rows are rows ``[first_row, first_row + num_rows)`` of that table (a shard of it). The file is built
        under a temporary name and renamed into place, so ``path`` never holds a half-written table.
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
        header = _metadata_json(path, num_rows, dim, dtype_name, {} if metadata is None else metadata)
        if path.exists() and not overwrite:
            raise TableFileError(f"{path} already exists; pass overwrite=True to replace it, or open it")

        itemsize = torch.empty(0, dtype=dtype).element_size()
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                # both slots hold the same header; slot 0 has the higher sequence number, so it is current
                f.write(_slot_bytes(header, 1) + _slot_bytes(header, 0))
                f.truncate(DATA_OFFSET + num_rows * dim * itemsize)  # sparse zeros
                if init_std > 0:
                    stream = NormalStream(seed)
                    for start in range(0, num_rows, chunk_rows):
                        stop = min(num_rows, start + chunk_rows)
                        values = stream.take((first_row + start) * dim, (first_row + stop) * dim) * init_std
                        f.seek(DATA_OFFSET + start * dim * itemsize)
                        f.write(_tensor_bytes(values.to(dtype)))
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
            header, slot, seq = cls._read_header(path, file)
            return cls(path, file, writable, header, slot, seq)
        except BaseException:
            file.close()
            raise

    @staticmethod
    def _read_header(path: Path, file) -> tuple[dict, int, int]:
        """(header dict, slot index, sequence number) of the newest valid slot; checks the file size."""
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
            if version != VERSION:
                raise TableFileError(
                    f"{path}: header format version {version}, written by a newer version of engram "
                    f"(this one reads version {VERSION}); upgrade engram"
                )
            headers.append((TableFile._parse_header(path, raw_json), slot, seq))
        header, slot, seq = headers[0]
        for other, _, _ in headers[1:]:
            if (other["num_rows"], other["dim"], other["dtype"]) != (
                header["num_rows"],
                header["dim"],
                header["dtype"],
            ):
                raise TableFileError(
                    f"{path}: the two header slots disagree on the table shape or dtype "
                    f"({other['num_rows']}x{other['dim']} {other['dtype']} vs "
                    f"{header['num_rows']}x{header['dim']} {header['dtype']}); the file cannot be trusted"
                )
        itemsize = torch.empty(0, dtype=_DTYPES[header["dtype"]][0]).element_size()
        expected = DATA_OFFSET + header["num_rows"] * header["dim"] * itemsize
        if size != expected:
            what = "truncated" if size < expected else "too long"
            raise TableFileError(
                f"{path}: {what}: expected {expected} bytes from the header "
                f"({header['num_rows']} rows x {header['dim']} x {itemsize} + {DATA_OFFSET}), found {size}; "
                "the file is incomplete or damaged, recreate it"
            )
        return header, slot, seq

    @staticmethod
    def _parse_header(path: Path, raw_json: bytes) -> dict:
        try:
            header = json.loads(raw_json.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise TableFileError(f"{path}: header JSON cannot be read ({e}); the file is damaged") from e
        if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
            keys = sorted(header) if isinstance(header, dict) else type(header).__name__
            raise TableFileError(
                f"{path}: header must be a JSON object with keys {sorted(_HEADER_KEYS)}, got {keys}; "
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

    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows (U,) (distinct; sorted rows merge into fewer writes) with values (U, dim) by ``pwrite``.

        The mapping sees the new values at once (one page cache). Storing into the mapping instead
        would mark whole cached chunks of the file dirty (the kernel may cache a file in blocks much
        larger than a page), so that writing back a few scattered rows rewrites megabytes.
        """
        if not self.writable:
            raise TableFileError(f"{self.path} is open read-only; open it with writable=True to write rows")
        data = values.to(self.dtype).contiguous().view(-1, self.dim)
        raw = data.view(torch.uint8).numpy()  # (U, dim * itemsize) bytes; works for bfloat16 too
        row_bytes = raw.shape[1]
        ids = rows.tolist()
        fd = self._file.fileno()
        start = 0
        for end in range(1, len(ids) + 1):
            if end == len(ids) or ids[end] != ids[end - 1] + 1:  # a run of consecutive rows ends here
                view = memoryview(raw[start:end]).cast("B")
                offset = DATA_OFFSET + ids[start] * row_bytes
                while view:  # pwrite may write less than asked
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                start = end

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
        header = _metadata_json(self.path, self.num_rows, self.dim, self._dtype_name, metadata)
        self.flush()  # the new header may describe this data (e.g. a step count), so the data goes first
        slot = 1 - self._slot
        os.pwrite(self._file.fileno(), _slot_bytes(header, self._seq + 1), slot * SLOT_BYTES)
        os.fsync(self._file.fileno())
        self._slot, self._seq = slot, self._seq + 1
        self._metadata = json.loads(header)["metadata"]

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
        self._tensor = None
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
        return f"TableFile({str(self.path)!r}, {self.num_rows}x{self.dim} {self._dtype_name}, {mode})"
