"""A table in a memory-mapped file, trained in place, checkpointed without a copy.

A ``DiskTable`` is a folder:

    weight.table      the rows (engram table file: self-describing, checked header, then the rows)
    <state>.table     one file per optimizer state array (``exp_avg``, ``row_step``, ``sum_sq``, ...)
    journal.undo      undo journal: old values of the rows changed since the last checkpoint

Reads go through the operating system's page cache and an optional hot-row cache; writes go to
the mapping (write-through) and reach the file when the kernel writes the pages back or at a flush.

Checkpointing is two-phase and copies nothing. ``prepare_checkpoint(step)`` flushes every array and
records ``prepared_step`` in the header; the caller then writes its checkpoint folder; then
``commit_checkpoint(step)`` empties the journal and records ``committed_step``. Before the first
change after a commit, each changed row's old values go to the journal (fsynced first), so
``restore_checkpoint(step)`` can always bring the folder back to the last committed step, whatever
moment a crash struck. Headers are double-buffered, so a crash never leaves a half-written one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engram.storage.init import draw_seed
from engram.storage.journal import UndoJournal
from engram.storage.offload import OffloadedTable
from engram.storage.table_file import TableFile
from engram.storage.write_buffer import WriteBuffer

WEIGHT_FILE = "weight.table"
JOURNAL_FILE = "journal.undo"
STATE_SUFFIX = ".table"


class TableStateError(ValueError):
    """A disk table cannot be brought back to the state a checkpoint needs."""


class DiskTable(OffloadedTable):
    """Table rows (and optimizer state) in memory-mapped files under ``directory``.

    Opens the table in ``directory`` if there is one (checking its shape and dtype), else creates
    it with rows ~ N(0, init_std^2) of ``seed`` (``engram.storage.init``: the same rows as a device
    or host table of that seed).

    Args:
        directory: the table's folder.
        num_rows, dim, dtype: expected shape and dtype (None: whatever the existing file holds).
        init_std, seed, first_row: initial rows of a new table, as in ``DeviceTable`` (seed None:
            drawn from torch's global generator).
        cache_bytes: hot-row cache size in bytes (0: none).
        prefetch: fetch rows in a background thread when the model announces a batch.
        journal: keep an undo journal so that a crash between checkpoints can be rolled back;
            without it a table changed after its last checkpoint cannot be restored.
        write_buffer_bytes: memory for the write-back buffer of rows the optimizer rewrites
            (``WriteBuffer``; 0: every update goes straight to the mapping).
        writable: open for training (False: inference only, the files are mapped read-only).
    """

    persists_itself = True

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
        journal: bool = True,
        writable: bool = True,
        write_buffer_bytes: int = 0,
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
        super().__init__(weight_file.tensor, cache_bytes=cache_bytes, prefetch=prefetch)
        self._state_files: dict[str, TableFile] = {}
        for path in sorted(self.directory.glob(f"*{STATE_SUFFIX}")):
            if path.name != WEIGHT_FILE:
                self._open_state(path.name.removesuffix(STATE_SUFFIX))
        self.use_journal = journal
        self._journal: UndoJournal | None = None
        self.write_buffer_bytes = int(write_buffer_bytes) if writable else 0
        self._buffer: WriteBuffer | None = None

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
        if self._journal is not None and self._journal.pending_rows:
            raise RuntimeError(f"cannot add row state {name!r} to {self.directory} between checkpoints")
        if self._buffer is not None:  # rebuilt over the new set of arrays
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

    def buffer(self) -> WriteBuffer | None:
        """The write-back buffer (None when ``write_buffer_bytes`` is 0)."""
        if self._buffer is None and self.write_buffer_bytes > 0:
            self._buffer = WriteBuffer(
                self._arrays(), self.write_buffer_bytes, self._before_file_write, write_rows=self._file_write
            )
        return self._buffer

    def journal(self) -> UndoJournal:
        if self._journal is None:
            self._journal = UndoJournal(self.directory / JOURNAL_FILE, self._arrays())
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
            return super()._read_weight(rows, out)
        values = buffer.read("weight", rows)
        return values if out is None else out.copy_(values)

    def _file_write(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows (U,) of array ``name`` into its file with ``pwrite`` (``TableFile.write_rows``)."""
        table_file = self.weight_file if name == "weight" else self._state_files[name]
        table_file.write_rows(rows, values)

    def _write_weight(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        buffer = self.buffer()
        if buffer is None:
            self._file_write("weight", rows, values)
        else:
            buffer.write("weight", rows, values)

    def read_state(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        buffer = self.buffer()
        return super().read_state(name, rows) if buffer is None else buffer.read(name, rows)

    def write_state(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        buffer = self.buffer()
        if buffer is None:
            self._file_write(name, rows, values)
        else:
            buffer.write(name, rows, values)

    def row_states(self) -> dict[str, torch.Tensor]:
        """The state arrays as mapped from their files (buffered rows are written back first)."""
        if self._buffer is not None:
            self._buffer.write_back_all()
        return super().row_states()

    def begin_update(self, rows: torch.Tensor) -> None:
        if not self.writable:
            raise RuntimeError(f"the table at {self.directory} was opened read-only (writable=False)")
        if not self.metadata.get("trained"):  # so that a run restarted from scratch can tell
            self._set_metadata(trained=True)
        if self.buffer() is None:  # with a buffer, the files change only when rows are written back
            self._before_file_write(rows)

    def _before_file_write(self, rows: torch.Tensor) -> None:
        """Before ``rows`` (U,) of the files change: mark the table dirty (once), journal their old values."""
        if not self.metadata.get("dirty"):  # first change since the last commit: say so, durably
            self._set_metadata(dirty=True)
        if self.use_journal and self.metadata.get("committed_step") is not None:  # else nothing to return to
            self.journal().protect(rows)

    def flush(self) -> None:
        if self._buffer is not None:
            self._buffer.write_back_all()
        for table_file in (self.weight_file, *self._state_files.values()):
            table_file.flush()

    def prepare_checkpoint(self, step: int) -> None:
        self.flush()
        self._set_metadata(prepared_step=step)

    def commit_checkpoint(self, step: int) -> None:
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
            target = table.weight if name == "weight" else table.row_state(name, tuple(source.shape[1:]), source.dtype)
            for start in range(0, source.shape[0], rows_per_chunk):
                target[start : start + rows_per_chunk].copy_(source[start : start + rows_per_chunk])
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
        """Flush and unmap the files; the table cannot be used afterwards."""
        self.flush()
        for table_file in (self.weight_file, *self._state_files.values()):
            table_file.close()

    def extra_repr(self) -> str:
        return f"directory={str(self.directory)!r}, {super().extra_repr()}"
