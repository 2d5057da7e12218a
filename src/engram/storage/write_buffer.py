"""A write-back buffer for the rows a sparse optimizer keeps rewriting in a memory-mapped table.

Writing a 64-byte row into a mapped file dirties a whole 4 KiB page. Once the kernel has written
that page back, the next store into it takes a write fault (and the filesystem's page bookkeeping),
so an optimizer step that rewrites ten thousand rows scattered over a large file spends most of its
time in the kernel, in every array it touches (weight, moments, step counts). Frequent n-grams are
rewritten step after step, so keeping recently written rows in memory and writing them back only
when their slot is needed, or at a checkpoint, removes most of that cost.

``WriteBuffer`` holds whole rows (every array of the table: the weight and each optimizer state
array) in a direct-mapped set of slots: row ``r`` lives in slot ``r % num_slots`` (row ids are hash
outputs, so the modulo spreads them). A row enters its slot when first written, loading all its
arrays from the file, and leaves it (written back) when another row claims the slot or at
``write_back_all``. Reads consult the buffer first; rows that are not buffered, and the rows a
claim loads, come from the ``read_rows`` callback (a disk table checks them against their
checksums there, so a buffered row was checked once, when it entered). Before any row is written back,
``before_write_back(rows)`` runs: the disk table journals the old values there, so the file only
changes in ways the undo journal can reverse; rows still in the buffer at a crash are simply lost,
which is what rolling back to the last checkpoint wants anyway.

Shapes: R rows of the table; S slots; U distinct rows of a call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EMPTY = -1


class WriteBuffer:
    """Direct-mapped write-back buffer over the row arrays of one table, within ``capacity_bytes``.

    Args:
        arrays: name -> backing tensor (R, ...) (memory-mapped); every array has the same R.
        capacity_bytes: memory for the slots (each slot holds one row of every array plus an int64 tag).
        before_write_back: called with the rows (U,) about to be written into the backing arrays.
        write_rows: ``write_rows(name, rows, values)`` writes rows into a backing array (default:
            ``index_copy_``; a disk table writes its files with ``pwrite``).
        read_rows: ``read_rows(name, rows)`` reads rows (U,) of a backing array as (U, ...) (default:
            ``index_select``; a disk table checks them against their checksums).
    """

    def __init__(
        self,
        arrays: dict[str, torch.Tensor],
        capacity_bytes: int,
        before_write_back: Callable[[torch.Tensor], None] = lambda rows: None,
        write_rows: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
        read_rows: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.arrays = dict(arrays)
        slot_bytes = 8 + sum(array[0].numel() * array.element_size() for array in self.arrays.values())
        self.num_slots = int(capacity_bytes) // slot_bytes
        if self.num_slots < 1:
            raise ValueError(f"a write buffer of {capacity_bytes} bytes holds no row; give at least {slot_bytes}")
        self.before_write_back = before_write_back
        self.write_rows = write_rows or (lambda name, rows, values: self.arrays[name].index_copy_(0, rows, values))
        self.read_rows = read_rows or (lambda name, rows: self.arrays[name].index_select(0, rows))
        self.tags = torch.full((self.num_slots,), EMPTY, dtype=torch.long)
        self.data = {name: array.new_empty(self.num_slots, *array.shape[1:]) for name, array in self.arrays.items()}

    @property
    def buffered_rows(self) -> int:
        return int((self.tags != EMPTY).sum())

    def resident(self, rows: torch.Tensor) -> torch.Tensor:
        """(U,) bool: which of ``rows`` (U,) are in the buffer."""
        return self.tags[rows % self.num_slots] == rows

    def read(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows (U,) of array ``name``: (U, ...), the buffered ones from the buffer."""
        slots = rows % self.num_slots
        hit = self.resident(rows)
        if not bool(hit.any()):
            return self.read_rows(name, rows)
        out = self.data[name].new_empty(rows.numel(), *self.data[name].shape[1:])
        out[hit] = self.data[name][slots[hit]]
        out[~hit] = self.read_rows(name, rows[~hit])  # only rows not buffered touch the file
        return out

    def write(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows (U,) distinct of array ``name`` to ``values`` (U, ...)."""
        slots = rows % self.num_slots
        resident = self.tags[slots] == rows
        # Rows not in the buffer claim their slot, unless a row of this call holds it; of several
        # claiming one slot, the first wins. The others are written straight to the file.
        newcomers = (~resident).nonzero().squeeze(1)
        winners = newcomers.new_empty(0)
        if newcomers.numel():
            new_slots = slots[newcomers]
            order = torch.arange(newcomers.numel())
            first = torch.full((self.num_slots,), newcomers.numel(), dtype=torch.long)
            first[slots[resident]] = -1  # held by a row of this call: nobody claims it
            first.scatter_reduce_(0, new_slots, order, reduce="amin")
            won = first[new_slots] == order
            winners, losers = newcomers[won], newcomers[~won]
            self._claim(rows[winners], slots[winners])
            if losers.numel():
                self._write_back_rows(rows[losers], {name: values[losers]})
        buffered = resident.clone()
        buffered[winners] = True
        self.data[name][slots[buffered]] = values[buffered].to(self.data[name].dtype)

    def _claim(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Put rows (U,) with distinct slots into the buffer, writing back the rows they displace."""
        loaded = {name: self.read_rows(name, rows) for name in self.arrays}  # first: a failed read changes nothing
        victims = self.tags[slots]
        occupied = victims != EMPTY
        if bool(occupied.any()):
            victim_slots = slots[occupied]
            self._write_back_rows(victims[occupied], {name: data[victim_slots] for name, data in self.data.items()})
        for name, values in loaded.items():
            self.data[name][slots] = values
        self.tags[slots] = rows

    def _write_back_rows(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        self.before_write_back(rows)
        for name, value in values.items():
            self.write_rows(name, rows, value.to(self.arrays[name].dtype))

    def write_back_all(self) -> None:
        """Write every buffered row back and empty the buffer (before a flush of the files)."""
        slots = (self.tags != EMPTY).nonzero().squeeze(1)
        if slots.numel():
            rows, order = self.tags[slots].sort()  # ascending file offsets
            slots = slots[order]
            self._write_back_rows(rows, {name: data[slots] for name, data in self.data.items()})
        self.tags.fill_(EMPTY)

    def discard(self) -> None:
        """Forget every buffered row without writing it (after a rollback)."""
        self.tags.fill_(EMPTY)
