"""An undo journal: makes arrays that are changed in place restorable to their last commit.

Disk tables are trained in place, so a checkpoint cannot afford to copy them; a checkpoint is
"flush the arrays, then ``commit()``". Between commits, ``protect(rows)`` is called before rows
are written: it appends the rows' current values (their values at the last commit, since each
row is saved only the first time) to the journal and fsyncs it. After a crash, ``rollback()``
writes the saved values back, which returns every array to the last commit.

File layout (little-endian)::

    header:  b"ENGRAMJL", uint32 version, uint32 JSON length, JSON, SHA-256 of the preceding bytes
             JSON: {"num_rows": R, "arrays": {name: {"dtype": "float32", "row_shape": [D]}, ...}}
    records: b"ENGRAMUJ", uint32 version, uint64 n, int64 row ids[n],
             then for each array in sorted name order its n rows (raw bytes of its dtype),
             then SHA-256 of the record's preceding bytes

Which rows the journal holds is kept in memory as a bitmap, one bit per row (``SavedRows``):
it is not part of the file, and ``rollback()`` rebuilds it from the records.

Only the last record can be torn by a crash (records are appended one at a time, each fsynced
before any row it protects is written), so a damaged record with nothing valid after it is
ignored, and a damaged record followed by valid ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import struct
import sys
import warnings
from pathlib import Path

import torch

from engram._checks import as_id_tensor, check_id_range
from engram._files import fsync_dir

FILE_MAGIC = b"ENGRAMJL"
RECORD_MAGIC = b"ENGRAMUJ"
VERSION = 1
_FILE_PREFIX = struct.Struct("<8sII")  # magic, version, JSON length
_RECORD_PREFIX = struct.Struct("<8sIQ")  # magic, version, number of rows
_DIGEST_BYTES = 32


class JournalError(ValueError):
    """The journal cannot be used as asked; the message names the file and what to do."""


def _raw_bytes(values: torch.Tensor) -> bytes:
    """The little-endian bytes of a CPU tensor of any dtype."""
    return values.contiguous().view(torch.uint8).numpy().tobytes()


class SavedRows:
    """A set of row ids in [0, num_rows) as a bitmap: bit ``r % 8`` of byte ``r // 8`` is row ``r``.

    One bit per row, so the journal's record of what it holds costs R / 8 bytes of memory (14 MiB
    for 113 M rows) instead of a byte per row.
    """

    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.bits = torch.zeros((num_rows + 7) // 8, dtype=torch.uint8)  # (ceil(R / 8),)

    @staticmethod
    def _bit(rows: torch.Tensor) -> torch.Tensor:
        """Each row's bit within its byte, (U,) uint8."""
        return torch.bitwise_left_shift(torch.ones(rows.numel(), dtype=torch.uint8), (rows & 7).to(torch.uint8))

    def contains(self, rows: torch.Tensor) -> torch.Tensor:
        """(U,) bool: which of ``rows`` (U,) int64 are in the set."""
        return (self.bits[rows >> 3] & self._bit(rows)) != 0

    def add(self, rows: torch.Tensor) -> None:
        """Add ``rows`` (U,) int64, distinct and none of them in the set yet.

        Rows sharing a byte have distinct bits none of which is set, so adding their bits into the
        byte (``index_add_``, which sums repeated indices) is the bitwise or of them.
        """
        self.bits.index_add_(0, rows >> 3, self._bit(rows))

    def clear(self) -> None:
        self.bits.zero_()


class UndoJournal:
    """Undo log for ``arrays`` (name -> CPU tensor, all with the same first dimension R).

    Usage: ``protect(rows)`` before writing ``rows`` of any array; after flushing the arrays,
    ``commit()``. On start-up after a crash, ``rollback()`` and then flush the arrays and ``commit()``.
    """

    def __init__(self, path: str | os.PathLike, arrays: dict[str, torch.Tensor]):
        self.path = Path(path)
        if sys.byteorder != "little":
            raise JournalError(f"{self.path}: undo journals are little-endian and this machine is not")
        if not isinstance(arrays, dict) or not arrays:
            raise JournalError(f"{self.path}: arrays must be a non-empty dict of name -> tensor")
        for name, tensor in arrays.items():
            if not isinstance(name, str) or not name:
                raise JournalError(f"{self.path}: array names must be non-empty strings, got {name!r}")
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.dim() < 1:
                raise JournalError(f"{self.path}: array {name!r} must be a CPU tensor with at least one dimension")
        self._names = sorted(arrays)
        self._arrays = {name: arrays[name] for name in self._names}
        sizes = {name: t.shape[0] for name, t in self._arrays.items()}
        if len(set(sizes.values())) != 1:
            raise JournalError(f"{self.path}: all arrays need the same number of rows (first dimension), got {sizes}")
        self.num_rows = next(iter(sizes.values()))
        if self.num_rows < 1:
            raise JournalError(f"{self.path}: the arrays have no rows")
        self._row_bytes = [t[0].numel() * t.element_size() for t in self._arrays.values()]
        self._header = {
            "num_rows": self.num_rows,
            "arrays": {
                name: {"dtype": str(t.dtype).removeprefix("torch."), "row_shape": list(t.shape[1:])}
                for name, t in self._arrays.items()
            },
        }
        self._saved = SavedRows(self.num_rows)  # rows whose commit values are in the journal
        self._pending = 0

        self._fd = -1
        self._needs_rollback = False  # set when the file holds records of a run that did not commit
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == 0:
            self._write_header()
        else:
            file_header, self._header_len = self._read_header()
            self._matches = file_header == self._header
            self._needs_rollback = size > self._header_len
            if not self._needs_rollback and not self._matches:
                self._write_header()  # an empty journal of other arrays protects nothing: reuse the file
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR)
        self._end = os.fstat(self._fd).st_size  # where the next record goes
        self._broken = ""  # set when a failed append could not be cut off

    # ---- header -------------------------------------------------------------------------

    def _write_header(self) -> None:
        """(Re)create the journal with only its header, atomically (temporary file + rename), and open it."""
        data = json.dumps(self._header, sort_keys=True, separators=(",", ":")).encode()
        blob = _FILE_PREFIX.pack(FILE_MAGIC, VERSION, len(data)) + data
        blob += hashlib.sha256(blob).digest()
        tmp = self.path.parent / f".{self.path.name}.tmp-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self._header_len = self._end = len(blob)
        self._matches = True

    def _read_header(self) -> tuple[dict, int]:
        """(header JSON, header length in bytes) of the existing journal file."""
        with open(self.path, "rb") as f:
            prefix = f.read(_FILE_PREFIX.size)
            if len(prefix) < _FILE_PREFIX.size or not prefix.startswith(FILE_MAGIC):
                raise JournalError(
                    f"{self.path} is not an engram undo journal; move it away or choose another journal path"
                )
            _, version, length = _FILE_PREFIX.unpack(prefix)
            if version != VERSION:
                raise JournalError(
                    f"{self.path}: journal format version {version}, written by a newer version of engram "
                    f"(this one reads version {VERSION}); upgrade engram to roll it back"
                )
            data = f.read(length)
            digest = f.read(_DIGEST_BYTES)
        if len(data) < length or hashlib.sha256(prefix + data).digest() != digest:
            raise JournalError(
                f"{self.path}: journal header damaged; the arrays cannot be restored from it. "
                "Restore the arrays from a copy, then delete the journal"
            )
        return json.loads(data), _FILE_PREFIX.size + length + _DIGEST_BYTES

    # ---- protecting and committing ------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        """Rows whose commit-time values the journal holds (rows protected since the last commit)."""
        return self._pending

    def protect(self, rows: torch.Tensor) -> None:
        """Save the current values of ``rows`` (1-D integer ids, repeats allowed) not saved since the last commit.

        Appends one record and fsyncs the journal; call it before writing those rows.
        """
        if self._needs_rollback:
            raise JournalError(
                f"{self.path} holds records of a run that did not commit; call rollback() before changing the arrays"
            )
        if self._broken:
            raise JournalError(f"{self.path}: an earlier append failed and could not be undone; {self._broken}")
        rows = as_id_tensor(rows, "rows", ndim=1).cpu()
        check_id_range(rows, 0, self.num_rows, "rows", f" of the {self.num_rows}-row arrays")
        new = torch.unique(rows[~self._saved.contains(rows)])
        if new.numel() == 0:
            return
        record = bytearray(_RECORD_PREFIX.pack(RECORD_MAGIC, VERSION, new.numel()))
        record += _raw_bytes(new)
        for array in self._arrays.values():
            record += _raw_bytes(array[new])
        record += hashlib.sha256(record).digest()
        try:
            view = memoryview(record)
            while view:  # os.pwrite may write less than asked
                view = view[os.pwrite(self._fd, view, self._end + len(record) - len(view)) :]
            os.fsync(self._fd)
        except BaseException as e:
            # a partial record followed by later ones would make the journal unreadable: cut it off
            try:
                self._truncate(self._end)
            except OSError:
                self._broken = f"the journal ends in a partial record ({e}); restart and call rollback()"
            raise
        self._end += len(record)
        self._saved.add(new)
        self._pending += new.numel()

    def commit(self) -> None:
        """Empty the journal: the arrays as they are now become the restore point.

        Call it only after the arrays have been flushed to disk. Records of an earlier run are
        discarded too (e.g. when that run had flushed the arrays for a checkpoint and stopped
        before committing), so do not commit arrays that an earlier run left half-updated: roll back.
        """
        if self._matches:
            self._truncate(self._header_len)
        else:  # records of other arrays: start over with this journal's header
            self._write_header()
        self._needs_rollback = False
        self._saved.clear()
        self._pending = 0
        self._broken = ""  # a partial record left by a failed append is gone with the rest

    def _truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self._end = size

    # ---- rollback -----------------------------------------------------------------------

    def rollback(self) -> int:
        """Write the journaled values back into the arrays; returns the number of rows restored.

        The journal keeps its records, so a crash before the next commit still restores the same
        state: flush the arrays, then ``commit()``. A torn last record (a crash while appending)
        is ignored: the rows it protected had not been written yet.
        """
        if self._end > self._header_len and not self._matches:
            raise JournalError(
                f"{self.path} was written for other arrays than those given ({self._describe_file()}); "
                "give the same arrays (names, dtypes, shapes) to roll it back"
            )
        records, valid_end = self._scan()
        if valid_end < self._end:
            self._truncate(valid_end)  # drop the torn tail, so that new records follow valid ones
        restored: list[torch.Tensor] = []  # the row ids of each record
        with open(self.path, "rb") as f:
            for offset, n in reversed(records):  # oldest last: its values are the commit-time ones
                f.seek(offset + _RECORD_PREFIX.size)
                body = f.read(self._record_len(n) - _RECORD_PREFIX.size - _DIGEST_BYTES)
                with warnings.catch_warnings():
                    # the tensors are read once and copied into the arrays, never written
                    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
                    ids = torch.frombuffer(body, dtype=torch.int64, count=n)
                    pos = 8 * n
                    for array, row_bytes in zip(self._arrays.values(), self._row_bytes, strict=True):
                        values = torch.frombuffer(body, dtype=array.dtype, count=n * array[0].numel(), offset=pos)
                        array[ids] = values.view(n, *array.shape[1:])
                        pos += n * row_bytes
                restored.append(ids.clone())
        self._saved.clear()
        if restored:
            rows = torch.unique(torch.cat(restored))  # distinct: each row is saved once, but be sure
            self._saved.add(rows)
            self._pending = rows.numel()
        else:
            self._pending = 0
        self._needs_rollback = False
        return self._pending

    def _describe_file(self) -> str:
        header, _ = self._read_header()
        return f"journal: {header}, given: {self._header}"

    def _record_len(self, n: int) -> int:
        return _RECORD_PREFIX.size + 8 * n + n * sum(self._row_bytes) + _DIGEST_BYTES

    def _record_at(self, mm: mmap.mmap, offset: int, end: int) -> int | None:
        """Row count of the valid record at ``offset``, or None if there is none (torn or damaged)."""
        if end - offset < _RECORD_PREFIX.size:
            return None
        magic, version, n = _RECORD_PREFIX.unpack_from(mm, offset)
        if magic != RECORD_MAGIC or version != VERSION or not 1 <= n <= self.num_rows:
            return None
        length = self._record_len(n)
        if offset + length > end:
            return None
        digest = hashlib.sha256(mm[offset : offset + length - _DIGEST_BYTES]).digest()
        return n if digest == mm[offset + length - _DIGEST_BYTES : offset + length] else None

    def _scan(self) -> tuple[list[tuple[int, int]], int]:
        """Check every record before anything is restored: ([(offset, n) of valid records], end of the last one)."""
        records: list[tuple[int, int]] = []
        offset, end = self._header_len, self._end
        if end == offset:
            return records, offset
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            while offset < end:
                n = self._record_at(mm, offset, end)
                if n is None:
                    break
                records.append((offset, n))
                offset += self._record_len(n)
            # a bad record is a torn tail only if no valid record follows it; otherwise restoring the
            # records before it would give a state that never existed
            later = mm.find(RECORD_MAGIC, offset + 1, end)
            while later != -1:
                if self._record_at(mm, later, end) is not None:
                    raise JournalError(
                        f"{self.path}: record at byte {offset} is damaged but later records are intact; the journal "
                        "cannot restore a consistent state. Restore the arrays from a copy, then delete the journal"
                    )
                later = mm.find(RECORD_MAGIC, later + 1, end)
        return records, offset

    # ---- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the journal file (records stay on disk)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> UndoJournal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
