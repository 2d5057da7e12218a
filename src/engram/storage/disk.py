"""A table in a memory-mapped file, trained in place, checkpointed without a copy.

A ``DiskTable`` is a folder:

    weight.table      the rows (engram table file: self-describing, checked header, then the rows)
    <state>.table     one file per optimizer state array (``exp_avg``, ``row_step``, ``sum_sq``, ...)
    journal.undo      undo journal: old values of the rows changed since the last checkpoint

Reads go through the operating system's page cache and an optional hot-row cache; writes go to
the files (``pwrite``, through a write-back buffer, which writes the rows it displaces back on a
worker thread) and reach the disk when the kernel writes the pages back or at a flush. Every row
carries a checksum in its file (``TableFile``): rows are written with their checksums, and every
row read from a file is checked against its checksum (``verify_rows``), so a row changed behind
engram's back (a disk error, another program) stops the run with ``RowChecksumError`` instead of
being trained on. ``verify_tables`` checks whole folders (``engram tables verify``).

Checkpointing is two-phase and copies nothing. ``prepare_checkpoint(step)`` flushes every array and
records ``prepared_step`` in the header; the caller then writes its checkpoint folder; then
``commit_checkpoint(step)`` empties the journal and records ``committed_step``. Before the first
change after a commit, each changed row's old values go to the journal (fsynced first), so
``restore_checkpoint(step)`` can always bring the folder back to the last committed step, whatever
moment a crash struck. The journal saves each file's row checksums with its rows, so a rollback
restores both together, bit for bit. Headers are double-buffered, so a crash never leaves a
half-written one.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from engram.storage.base import Durable
from engram.storage.init import draw_seed
from engram.storage.journal import UndoJournal
from engram.storage.offload import OffloadedTable
from engram.storage.prefetch import FetchedRows, run_after_fetches, wait_for_background
from engram.storage.table_file import ADVISE_MIN_ROWS, RowCheck, TableFile, TableFileError
from engram.storage.write_buffer import WriteBuffer

WEIGHT_FILE = "weight.table"
JOURNAL_FILE = "journal.undo"
STATE_SUFFIX = ".table"
CHECKSUMS = "{}.checksums"  # the undo journal's name for the row checksums of array {}


class TableStateError(ValueError):
    """A disk table cannot be brought back to the state a checkpoint needs."""


class DiskTable(OffloadedTable, Durable):
    """Table rows (and optimizer state) in memory-mapped files under ``directory``.

    Opens the table in ``directory`` if there is one (checking its shape and dtype), else creates
    it with rows ~ N(0, init_std^2) of ``seed`` (``engram.storage.init``: the same rows as a device
    or host table of that seed).

    It is the one ``Durable`` tier: checkpoints do not copy its rows, they bracket their folder with
    ``prepare_checkpoint`` and ``commit_checkpoint``, and resuming calls ``restore_checkpoint``.

    Args:
        directory: the table's folder.
        num_rows, dim, dtype: expected shape and dtype (None: whatever the existing file holds).
        init_std, seed, first_row: initial rows of a new table, as in ``DeviceTable`` (seed None:
            drawn from torch's global generator).
        cache_bytes: hot-row cache size in bytes (0: none).
        prefetch: fetch rows in a background thread when the model announces a batch.
        read_ahead: ``read_ahead`` (a later batch's rows) asks the kernel for their file pages in the
            background; False: it does nothing.
        journal: keep an undo journal so that a crash between checkpoints can be rolled back;
            without it a table changed after its last checkpoint cannot be restored.
        write_buffer_bytes: memory for the write-back buffer of rows the optimizer rewrites
            (``WriteBuffer``; 0: every update goes straight to the files).
        background_write_back: the write buffer writes its displaced rows back to the files (and
            journals them) on a worker thread while training goes on (False: in the optimizer step).
        writable: open for training (False: inference only, the files are mapped read-only).
        verify_rows: check every row read from a file (weight and optimizer state) against its stored
            checksum, raising ``RowChecksumError`` on a mismatch. Rows served from the write buffer or
            the hot-row cache were checked when they were read from the file. Checksums are written
            either way. Files of format 1 (written before row checksums) are read unchecked.
    """

    def __init__(
        self,
        directory: str | Path,
        num_rows: int | None = None,
        dim: int | None = None,
        init_std: float = 1.0,
        seed: int | None = None,
        first_row: int = 0,
        dtype: torch.dtype | None = None,
        cache_bytes: int = 0,
        prefetch: bool = True,
        read_ahead: bool = True,
        journal: bool = True,
        writable: bool = True,
        write_buffer_bytes: int = 0,
        background_write_back: bool = True,
        verify_rows: bool = True,
    ):
        self.directory = Path(directory)
        weight_path = self.directory / WEIGHT_FILE
        if weight_path.exists():
            weight_file = TableFile.open(weight_path, writable=writable)
            expected = (num_rows or weight_file.num_rows, dim or weight_file.dim, dtype or weight_file.dtype)
            found = (weight_file.num_rows, weight_file.dim, weight_file.dtype)
            if found != expected:
                weight_file.close()
                raise ValueError(
                    f"{weight_path} holds a ({found[0]}, {found[1]}) {found[2]} table, but ({expected[0]}, "
                    f"{expected[1]}) {expected[2]} was asked for; use another folder or convert the table"
                )
        else:
            if num_rows is None or dim is None:
                raise FileNotFoundError(f"no table at {weight_path}; give num_rows and dim to create one")
            if not writable:
                raise FileNotFoundError(f"no table at {weight_path} to open read-only")
            self.directory.mkdir(parents=True, exist_ok=True)
            weight_file = TableFile.create(
                weight_path,
                num_rows,
                dim,
                dtype or torch.float32,
                init_std=init_std,
                seed=draw_seed() if seed is None else seed,
                first_row=first_row,
                metadata={"committed_step": None, "prepared_step": None, "dirty": False},
            )
        self.weight_file = weight_file
        self.writable = writable
        self.verify_rows = verify_rows
        self.read_ahead_enabled = read_ahead
        super().__init__(weight_file.tensor, cache_bytes=cache_bytes, prefetch=prefetch)
        self._state_files: dict[str, TableFile] = {}
        for path in sorted(self.directory.glob(f"*{STATE_SUFFIX}")):
            if path.name != WEIGHT_FILE:
                self._open_state(path.name.removesuffix(STATE_SUFFIX))
        self.use_journal = journal
        self._journal: UndoJournal | None = None
        self.write_buffer_bytes = int(write_buffer_bytes) if writable else 0
        self.background_write_back = background_write_back
        self._buffer: WriteBuffer | None = None
        # Held while the buffer changes, and by a read-ahead looking into it from the background. (Fetches
        # read it without: they run while the model computes, never during the optimizer's writes.)
        self._buffer_lock = threading.Lock()

    # -- files ----------------------------------------------------------------------------------------
    def _open_state(self, name: str) -> torch.Tensor:
        state_file = TableFile.open(self.directory / f"{name}{STATE_SUFFIX}", writable=self.writable)
        if state_file.num_rows != self.num_rows:
            raise ValueError(f"{state_file.path} has {state_file.num_rows} rows, the table {self.num_rows}")
        self._state_files[name] = state_file
        shape = state_file.metadata.get("row_shape", [state_file.dim])
        tensor = state_file.tensor.view(self.num_rows, *shape)
        self._row_states[name] = tensor
        return tensor

    def _new_row_state(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.writable:  # a state file would be written into a folder opened for reading only
            raise RuntimeError(
                f"the table at {self.directory} was opened read-only (writable=False) and takes no optimizer state; "
                "train a writable copy"
            )
        self._wait_for_write_back()  # it may journal rows
        if self._journal is not None and self._journal.pending_rows:
            raise RuntimeError(f"cannot add row state {name!r} to {self.directory} between checkpoints")
        if self._buffer is not None:  # rebuilt over the new set of arrays
            with self._buffer_lock:
                self._buffer.write_back_all()
                self._buffer = None
        width = 1
        for size in row_shape:
            width *= size
        TableFile.create(
            self.directory / f"{name}{STATE_SUFFIX}",
            self.num_rows,
            width,
            dtype,
            metadata={"row_shape": list(row_shape)},
        ).close()
        self._journal = None  # rebuilt over the new set of arrays
        return self._open_state(name)

    def _arrays(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, **self._row_states}

    def _files(self) -> dict[str, TableFile]:
        return {"weight": self.weight_file, **self._state_files}

    def buffer(self) -> WriteBuffer | None:
        """The write-back buffer (None when ``write_buffer_bytes`` is 0)."""
        if self._buffer is None and self.write_buffer_bytes > 0:
            self._buffer = WriteBuffer(
                self._arrays(),
                self.write_buffer_bytes,
                self._before_file_write,
                write_rows=self._file_write,
                read_rows=self._file_read,
                background=self.background_write_back,
            )
        return self._buffer

    def _wait_for_write_back(self) -> None:
        """Wait for the write buffer's background write-back, before the files or the journal are touched here."""
        if self._buffer is not None:
            self._buffer.wait()

    def journal(self) -> UndoJournal:
        """The undo journal over every array and each file's row checksums.

        Journaling the checksums (4 bytes per row and file) rather than recomputing them after a
        rollback restores exactly what the files held at the commit: a row damaged before it was
        journaled comes back with its old checksum, still detectable, instead of with a fresh checksum
        that would make the damage look valid.
        """
        if self._journal is None:
            files = self._files().items()
            checksums = {CHECKSUMS.format(name): f.checksums for name, f in files if f.checksums is not None}
            self._journal = UndoJournal(self.directory / JOURNAL_FILE, {**self._arrays(), **checksums})
        return self._journal

    @property
    def metadata(self) -> dict:
        """The checkpoint bookkeeping in the weight file's header."""
        return self.weight_file.metadata

    def _set_metadata(self, **changes) -> None:
        self.weight_file.set_metadata({**self.weight_file.metadata, **changes})

    # -- reads and writes, through the write-back buffer ----------------------------------------------
    def _read_weight(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        buffer = self.buffer()
        if buffer is None:
            return self._file_read("weight", rows, out)
        values = buffer.read("weight", rows)
        return values if out is None else out.copy_(values)

    def fetch(self, indices: torch.Tensor) -> FetchedRows:
        """``OffloadedTable.fetch``; in training mode it also queues the reading of the rows' optimizer-state pages.

        A table in training mode fetches the rows its optimizer will update: their state rows will be
        read from the files at the optimizer step (those not in the write-back buffer). Advising their
        pages (``TableFile.will_need``) lets the disk read them while the model computes, instead of
        one page fault after another in the optimizer step. The advice is a task of its own, run in the
        background right after this fetch (``run_after_fetches``), so that whoever waits for the rows
        does not wait for it too: advising pages that no disk holds (the holes of a fresh state file)
        fills them in with zeros there and then.
        """
        fetched = super().fetch(indices)
        if self.training and self._state_files:
            rows = fetched.rows if self._buffer is None else fetched.rows[~self._buffer.resident(fetched.rows)]
            if rows.numel() >= ADVISE_MIN_ROWS:
                state_files = list(self._state_files.values())

                def advise_state() -> None:
                    for state_file in state_files:
                        state_file.will_need(rows)

                run_after_fetches(self, advise_state)
        return fetched

    @property
    def reads_ahead(self) -> bool:
        return self.read_ahead_enabled

    def read_ahead(self, indices: torch.Tensor) -> Future | None:
        """Ask the kernel for the file pages of the rows of ``indices`` (any shape), in the background.

        For the batch after the current one: its pages are read while this batch computes, so that
        its fetch finds them in the page cache (``TableFile.will_need``). Rows in the write-back
        buffer or the hot-row cache need no pages and are left out; a table in training mode also
        asks for the rows' optimizer-state pages. The task runs after the fetches already queued for
        this table (the current batch's rows first) and reads nothing into engram's memory, so the
        later lookup returns the same values with or without it. Returns the task, whose result
        says whether any pages were asked for (not for fewer than ``ADVISE_MIN_ROWS`` rows: a few
        page faults cost less), or None when read-ahead is off.
        """
        if not self.read_ahead_enabled:
            return None
        rows = self.check_rows(indices.detach().reshape(-1).cpu())
        return run_after_fetches(self, functools.partial(self._will_need, rows, self.training))

    def _will_need(self, rows: torch.Tensor, training: bool) -> bool:
        """Advise the pages of ``rows`` (any order, repeats allowed) that neither the write-back buffer nor the
        hot-row cache holds: weight, and optimizer state if ``training``. True if it asked for any."""
        files = [self.weight_file, *(self._state_files.values() if training else ())]
        uncached = [table_file for table_file in files if not table_file.looks_cached(rows)]
        if not uncached:  # warm: a few system calls, nothing else
            return False
        rows = torch.unique(rows)
        if self._buffer is not None:
            with self._buffer_lock:  # the optimizer's step may be writing rows into it now
                if self._buffer is not None:
                    rows = rows[~self._buffer.resident(rows)]
        if self.cache is not None:  # the cache changes only in this table's fetches, which this runs between
            rows = rows[~self.cache.holds(rows)]
        if rows.numel() < ADVISE_MIN_ROWS:
            return False
        for table_file in uncached:  # probed above
            table_file.will_need(rows, check_resident=False)
        return True

    def _file_read(self, name: str, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (U,) of array ``name`` from its file: (U, *row_shape), checked unless ``verify_rows`` is off."""
        values = self._files()[name].read_rows(rows, out=out, verify=self.verify_rows)
        return values.view(rows.numel(), *self._arrays()[name].shape[1:])

    def _file_write(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows (U,) of array ``name`` and their checksums into its file (``TableFile.write_rows``)."""
        self._files()[name].write_rows(rows, values)

    def _write_weight(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self._write_array("weight", rows, values)

    def _write_array(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        buffer = self.buffer()
        if buffer is None:
            self._file_write(name, rows, values)
        else:
            with self._buffer_lock:
                buffer.write(name, rows, values)

    def read_state(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        buffer = self.buffer()
        return self._file_read(name, rows) if buffer is None else buffer.read(name, rows)

    def write_state(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        self._write_array(name, rows, values)

    def row_states(self) -> dict[str, torch.Tensor]:
        """The state arrays as mapped from their files (buffered rows are written back first)."""
        self._write_back_buffer()
        return super().row_states()

    def begin_update(self, rows: torch.Tensor) -> None:
        if not self.writable:
            raise RuntimeError(f"the table at {self.directory} was opened read-only (writable=False)")
        if not self.metadata.get("trained"):  # so that a run restarted from scratch can tell
            self._wait_for_write_back()  # the header has one writer at a time
            self._set_metadata(trained=True)
        if self.buffer() is None:  # with a buffer, the files change only when rows are written back
            self._before_file_write(rows)

    def _before_file_write(self, rows: torch.Tensor) -> None:
        """Before ``rows`` (U,) of the files change: mark the table dirty (once), journal their old values.

        Runs on the write buffer's worker thread for a background write-back; nothing else writes the
        header or the journal meanwhile (``_wait_for_write_back``).
        """
        if not self.metadata.get("dirty"):  # first change since the last commit: say so, durably
            self._set_metadata(dirty=True)
        if self.use_journal and self.metadata.get("committed_step") is not None:  # else nothing to return to
            self.journal().protect(rows)

    def _write_back_buffer(self) -> None:
        if self._buffer is not None:
            with self._buffer_lock:
                self._buffer.write_back_all()

    def flush(self) -> None:
        self._write_back_buffer()
        for table_file in self._files().values():
            table_file.flush()

    def prepare_checkpoint(self, step: int) -> None:
        self.flush()
        self._set_metadata(prepared_step=step)

    def commit_checkpoint(self, step: int) -> None:
        self._wait_for_write_back()
        if self.use_journal:
            self.journal().commit()
        self._set_metadata(committed_step=step, prepared_step=None, dirty=False)

    def restore_checkpoint(self, step: int) -> None:
        meta = self.metadata
        if meta.get("prepared_step") == step:  # the crash came after the checkpoint folder, before the commit
            self.commit_checkpoint(step)
            return
        if meta.get("committed_step") != step:
            raise TableStateError(
                f"the disk table at {self.directory} holds the state of step {meta.get('committed_step')}, not of "
                f"checkpoint step {step}; a disk table can only return to its latest checkpoint"
            )
        if self._buffer is not None:  # rows written after the checkpoint, never written back
            with self._buffer_lock:
                self._buffer.discard()
        if self.cache is not None:  # it may hold rows written after the checkpoint
            self.cache.clear()
        if not meta.get("dirty"):
            return
        if not self.use_journal and not (self.directory / JOURNAL_FILE).exists():
            raise TableStateError(
                f"the disk table at {self.directory} changed after checkpoint step {step} and keeps no undo journal, "
                "so it cannot be restored; train with the journal on, or start from the table as it is"
            )
        self.journal().rollback()
        self.flush()
        self.commit_checkpoint(step)

    @classmethod
    def from_tensors(
        cls,
        directory: str | Path,
        weight: torch.Tensor,
        row_states: dict[str, torch.Tensor] | None = None,
        committed_step: int | None = None,
        **options,
    ) -> DiskTable:
        """Write a new disk table folder holding ``weight`` (R, D) and optimizer ``row_states``.

        The folder is committed at ``committed_step`` (the checkpoint step the tensors belong to).
        ``options`` are the constructor's (``cache_bytes``, ``prefetch``, ``journal``).

        Raises:
            FileExistsError: ``directory`` already holds a table.
        """
        directory = Path(directory)
        if (directory / WEIGHT_FILE).exists():
            raise FileExistsError(f"{directory} already holds a table; choose an empty folder")
        table = cls(directory, weight.shape[0], weight.shape[1], init_std=0.0, dtype=weight.dtype, **options)
        rows_per_chunk = max(1, (64 << 20) // max(1, weight[:1].nbytes))  # copy ~64 MiB at a time
        for name, source in {"weight": weight, **(row_states or {})}.items():
            if name != "weight":
                table.row_state(name, tuple(source.shape[1:]), source.dtype)  # creates its file
            for start in range(0, source.shape[0], rows_per_chunk):
                chunk = source[start : start + rows_per_chunk]
                # consecutive rows: one pwrite, and their checksums in one store
                table._file_write(name, torch.arange(start, start + chunk.shape[0]), chunk)
        table.flush()
        table._set_metadata(committed_step=committed_step, prepared_step=None, dirty=False)
        return table

    def check_untrained(self) -> None:
        """Raise unless no optimizer has updated this table yet (a run that starts at step 0 needs that)."""
        meta = self.metadata
        if meta.get("trained") or meta.get("committed_step") is not None:
            raise TableStateError(
                f"the disk table at {self.directory} has already been trained (last checkpoint step "
                f"{meta.get('committed_step')}), but this run starts at step 0: resume the run it belongs to, "
                "or give this run another storage.directory (or delete the folder)"
            )

    def close(self) -> None:
        """Flush and unmap the files, and stop the write buffer's worker; the table cannot be used afterwards.

        Raises:
            Exception: the error of a failed write-back of the write buffer (``WriteBuffer.wait``). The files
                are closed all the same, holding what a crash would leave: the last checkpoint's rows and,
                undone by the journal when that checkpoint is restored, the rows written back since.
        """
        wait_for_background(self)  # its fetches and read-aheads use the files
        try:
            self.flush()
        finally:
            if self._buffer is not None:
                self._buffer.close()
            for table_file in self._files().values():
                table_file.close()

    def extra_repr(self) -> str:
        return f"directory={str(self.directory)!r}, {super().extra_repr()}"


def table_folders(path: str | Path) -> list[Path]:
    """The table folders at ``path``: a table file (itself), a table folder, or a folder of them at any depth
    (layer folders, and the shard folders inside them of a table sharded over several processes).

    Raises:
        FileNotFoundError: there is no table at ``path``.
    """
    path = Path(path)
    if path.is_file() or (path / WEIGHT_FILE).is_file():
        return [path]
    folders = sorted(p.parent for p in path.rglob(WEIGHT_FILE)) if path.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{path} holds no engram table ({WEIGHT_FILE} or layer folders with one)")
    return folders


def table_files(folder: Path) -> list[Path]:
    """The files of one entry of ``table_folders``: the weight file, then the optimizer state files by name."""
    if folder.is_file():
        return [folder]
    return list(dict.fromkeys([folder / WEIGHT_FILE, *sorted(folder.glob(f"*{STATE_SUFFIX}"))]))


def verify_tables(path: str | Path) -> list[RowCheck]:
    """Check every row of every table and optimizer-state file at ``path`` against its checksum.

    ``path`` is as for ``table_folders``. Files are read in chunks of about 64 MiB, so a table larger
    than RAM is checked in bounded memory. A file that cannot be opened (a damaged header, a cut-off
    file) is reported with its ``error``; a format-1 file (no checksums) with ``rows_checked == 0``.

    Raises:
        FileNotFoundError: there is no table at ``path``.
    """
    checks = []
    for folder in table_folders(path):
        for file in table_files(folder):
            try:
                with TableFile.open(file) as table_file:
                    checks.append(table_file.verify())
            except TableFileError as error:
                checks.append(RowCheck(file, 0, 0, error=str(error)))
    return checks
