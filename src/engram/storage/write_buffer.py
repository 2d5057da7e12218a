"""A write-back buffer for the rows a sparse optimizer keeps rewriting in a memory-mapped table.

Every row written to a table file costs a system call (``pwrite``) per array and dirties a 4 KiB
page of each file it lands in; frequent n-grams are rewritten step after step. ``WriteBuffer``
keeps recently written rows in memory and writes them to the files only when their place is needed
for another row, or at ``write_back_all`` (a checkpoint), so that most updates never reach the
files between checkpoints.

It holds whole rows (every array of the table: the weight and each optimizer state array) in a
set-associative buffer: row ``r`` belongs to set ``r % num_sets`` (row ids are hash outputs, so the
modulo spreads them) and may occupy any of that set's ``ways`` slots. A write stamps the slots of
its rows with a clock that advances once per ``write`` call; a row that is not buffered claims the
least recently written slot of its set (empty slots first, ties to the lower way), loading its
other arrays from the file, and displaces the row that held it. Slots stamped by the current call
are never taken from a row of the same call: when a set has fewer free or older slots than the call
brings new rows to it, the rows beyond them (in the call's order) get no slot. Reads never change
the buffer (the prefetch thread reads through it).

Displaced rows, and rows that got no slot, go to an overflow list (a 64th of the buffer's rows,
sorted by row id) rather than to the files; when it is full, all its rows are written back together
(rows that would not fit even in an empty list go straight to the files). Every row written back
since a checkpoint costs a journal record and an fsync first, so writing a few displaced rows per
step would cost an fsync per step; the list turns that into one per few hundred steps when only a
few rows per step do not fit their sets. A row in the list stays there (reads and writes find it)
until the list is written back.

With ``background``, a full list is not written back on the caller's thread (36-54 µs a row, tens of
milliseconds of a training step on a large corpus): it is sealed into the batch in flight, an empty
list takes its place, and the buffer's one worker thread writes the batch back (``before_write_back``,
then ``write_rows`` per array, as the caller's thread would) while the caller computes. At most one
batch is in flight: sealing the next one, writing rows to the files on the caller's thread (rows too
many for an empty list, ``write_back_all``) and ``discard`` wait for it first, as must anything else
that writes the files or the journal (``wait``). So while a batch is in flight the worker is their
only writer (which the journal, reading the rows' old values from the arrays, and ``TableFile``'s
writes, rewriting the bytes between rows as they read them, rely on), and write-backs reach the
files in the order their rows left the buffer, each journaled first, exactly as on one thread.

The worker changes nothing in the buffer. The batch keeps its rows, unchanged, until the caller's
thread drops it, at its first write after the worker is done: a reader finds a row in the batch, or
after that in the files, which hold it by then. Lookups go sets, list, batch in flight, files; a
write to a row that is only in the batch claims it like a row of the files, its other arrays copied
from the batch, and its newer values shadow the batch's. A failed write-back keeps its batch (reads
still find its rows) and its error is raised at the next write, and at every one after it, until
``discard`` (a rollback, which undoes from the journal whatever part of the batch reached the files).

Why set-associative with LRU: a direct-mapped buffer (one slot per row) cannot keep two rows of one
slot, so even when it is twice as large as everything a corpus touches, about a third of those rows
collide and evict each other on every step. With 16 ways, a set overflows only when the rows in use
exceed its 16 slots, which at half load happens to a few sets in a thousand, and then the row
evicted is the one written longest ago rather than whichever happened to share the slot.

Reads consult the buffer first; rows that are not buffered, and the rows a claim loads, come from
the ``read_rows`` callback (a disk table checks them against their checksums there, so a buffered
row was checked once, when it entered). Before any row is written back, ``before_write_back(rows)``
runs: the disk table journals the old values there, so the file only changes in ways the undo
journal can reverse; rows still in the buffer at a crash are simply lost, which is what rolling back
to the last checkpoint wants anyway, and so are the rows of a batch in flight, whose old values
are journaled before the worker writes any of them.

Shapes: R rows of the table; G sets of W ways (S = G * W slots, slot = set * W + way); O rows of
the overflow list (at most ``overflow_capacity``); B rows of the batch in flight; U distinct rows of a call.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import NamedTuple

import torch

EMPTY = -1
WAYS = 16  # slots per set: overflow is rare at half load, and a lookup compares 16 tags per row
OVERFLOW_SHARE = 64  # 1/64 of the buffer's rows is the overflow list
_NEVER = -1  # the stamp of an empty slot: older than any write, so empty slots are claimed first


class _Batch(NamedTuple):
    """A sealed overflow list: rows being written back by the worker, readable until it has written them."""

    rows: torch.Tensor  # (B,) ascending
    values: dict[str, torch.Tensor]  # name -> (B, ...), never changed once sealed
    done: Future  # the worker's write-back; its exception if it failed


class _Found(NamedTuple):
    """Where the rows (U,) of a call are: in a set's slot, in the overflow list, in the batch in flight, or only
    in the files."""

    sets: torch.Tensor  # (U,) the set of each row
    positions: torch.Tensor  # (H,) positions of the rows held in a slot, ascending
    slots: torch.Tensor  # (H,) their slots
    over_positions: torch.Tensor  # (V,) positions of the rows in the overflow list, ascending
    over_index: torch.Tensor  # (V,) their index in the list
    missing: torch.Tensor  # (M,) positions of the rows in neither, ascending
    flight: _Batch | None  # the batch in flight when the rows were looked up
    in_flight: torch.Tensor  # (F,) indices into ``missing`` of the rows in ``flight``, ascending
    flight_index: torch.Tensor  # (F,) their index in the batch
    in_files: torch.Tensor  # (M - F,) indices into ``missing`` of the rows only in the files, ascending
    loaded: dict[str, torch.Tensor]  # name -> (M, ...) the missing rows' values, once read (batch or files)


class _Memo(NamedTuple):
    """The last ``_find``: its answer holds while the placement is the same and the rows are equal."""

    rows: torch.Tensor  # (U,)
    version: int  # rows._version when looked up: an in-place change of the rows makes the memo stale
    placement: int  # WriteBuffer._placement the answer is about
    found: _Found


class WriteBuffer:
    """Set-associative (LRU) write-back buffer over the row arrays of one table, within ``capacity_bytes``.

    Args:
        arrays: name -> backing tensor (R, ...) (memory-mapped); every array has the same R.
        capacity_bytes: memory for the rows (each holds one row of every array plus an int64 tag and an
            int64 stamp), shared by the sets' slots and the overflow list.
        before_write_back: called with the rows (U,) about to be written into the backing arrays.
        write_rows: ``write_rows(name, rows, values)`` writes rows (ascending) into a backing array
            (default: ``index_copy_``; a disk table writes its files with ``pwrite``).
        read_rows: ``read_rows(name, rows)`` reads rows (U,) of a backing array as (U, ...) (default:
            ``index_select``; a disk table checks them against their checksums).
        ways: slots per set (fewer when the buffer holds fewer slots; 1 is a direct-mapped buffer).
        overflow_rows: rows of the overflow list (None: a 64th of the rows the capacity holds; 0: none,
            displaced rows are written back at once).
        background: write a full overflow list back on a worker thread of the buffer's own, while the
            caller goes on (False: on the caller's thread, before the call that filled it returns). The
            batch in flight holds up to one more list's rows beyond ``capacity_bytes``.
    """

    def __init__(
        self,
        arrays: dict[str, torch.Tensor],
        capacity_bytes: int,
        before_write_back: Callable[[torch.Tensor], None] = lambda rows: None,
        write_rows: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
        read_rows: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        ways: int = WAYS,
        overflow_rows: int | None = None,
        background: bool = False,
    ):
        if ways < 1:
            raise ValueError(f"a write buffer needs at least one way per set, got ways={ways}")
        self.arrays = dict(arrays)
        slot_bytes = 16 + sum(array[0].numel() * array.element_size() for array in self.arrays.values())
        rows = int(capacity_bytes) // slot_bytes
        self.overflow_capacity = rows // OVERFLOW_SHARE if overflow_rows is None else int(overflow_rows)
        slots = rows - self.overflow_capacity
        if slots < 1:
            raise ValueError(
                f"a write buffer of {capacity_bytes} bytes holds no row in its sets; give at least "
                f"{slot_bytes * (1 + max(0, self.overflow_capacity))}"
            )
        self.ways = min(int(ways), slots)
        self.num_sets = slots // self.ways
        self.num_slots = self.num_sets * self.ways
        self.before_write_back = before_write_back
        self.write_rows = write_rows or (lambda name, rows, values: self.arrays[name].index_copy_(0, rows, values))
        self.read_rows = read_rows or (lambda name, rows: self.arrays[name].index_select(0, rows))
        self.tags = torch.full((self.num_sets, self.ways), EMPTY, dtype=torch.long)  # (G, W) row in each slot
        self.stamps = torch.full((self.num_sets, self.ways), _NEVER, dtype=torch.long)  # (G, W) clock of its last write
        self.clock = 0
        self.data = {name: array.new_empty(self.num_slots, *array.shape[1:]) for name, array in self.arrays.items()}
        self.overflow_rows = torch.empty(0, dtype=torch.long)  # (O,) ascending
        self.overflow = {name: array.new_empty(0, *array.shape[1:]) for name, array in self.arrays.items()}
        self.background = background
        self._worker: ThreadPoolExecutor | None = None  # created at the first sealed list
        self._writing: _Batch | None = None  # the sealed overflow list the worker is writing back
        self._placement = 0  # changes whenever a row enters or leaves a place: ``_find``'s memo is then stale
        self._memo: _Memo | None = None

    @property
    def buffered_rows(self) -> int:
        """Rows in the sets and the overflow list (not those of a batch in flight)."""
        return int((self.tags != EMPTY).sum()) + self.overflow_rows.numel()

    def set_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The set (U,) each of ``rows`` (U,) belongs to."""
        return rows % self.num_sets

    def buffered(self) -> torch.Tensor:
        """The rows held in the buffer (sets and overflow list), ascending (for tests and reports)."""
        tags = self.tags.reshape(-1)
        return torch.cat([tags[tags != EMPTY], self.overflow_rows]).sort().values

    def _find(self, rows: torch.Tensor) -> _Found:
        """Where ``rows`` (U,) are.

        An optimizer step reads and writes every array of the same rows (eight calls for Adam), and
        they are the rows its fetch looked up on the prefetch thread; so the last answer is kept while
        the buffer's placement does not change and the rows are equal to its rows (the same tensor
        unchanged, or another with the same values), and a claim leaves the answer for its rows. The
        (U, W) tag comparison then runs about once per step, at the fetch; the missing rows' values,
        once read, are kept with it for the claim that brings them in.
        """
        memo, placement = self._memo, self._placement  # the placement this answer is about, read first
        if (
            memo is not None
            and memo.placement == placement
            and memo.rows._version == memo.version
            and (memo.rows is rows or (memo.rows.shape == rows.shape and torch.equal(memo.rows, rows)))
        ):
            return memo.found
        sets = self.set_of(rows)
        # (U, W) tag comparison; a row sits in at most one way of its set, so each position matches once
        positions, ways = torch.nonzero(self.tags.index_select(0, sets) == rows.unsqueeze(1), as_tuple=True)
        found = self._locate(rows, sets, positions, sets.index_select(0, positions) * self.ways + ways)
        self._memo = _Memo(rows, rows._version, placement, found)
        return found

    def _locate(self, rows: torch.Tensor, sets: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> _Found:
        """Where ``rows`` (U,) of sets ``sets`` (U,) are, given those held in a slot (``positions`` (H,) ascending,
        their ``slots`` (H,)): the others are looked up in the overflow list, then in the batch in flight."""
        empty = torch.empty(0, dtype=torch.long)
        rest = empty  # positions of the rows in no slot
        if positions.numel() < rows.numel():
            mask = torch.ones(rows.numel(), dtype=torch.bool)
            mask[positions] = False
            rest = mask.nonzero().squeeze(1)
        missing, over_positions, over_index = rest, empty, empty
        listed = self.overflow_rows
        if listed.numel() and rest.numel():
            wanted = rows.index_select(0, rest)
            index = torch.searchsorted(listed, wanted).clamp_(max=listed.numel() - 1)
            hit = listed.index_select(0, index) == wanted
            over_positions, over_index, missing = rest[hit], index[hit], rest[~hit]
        # read after the list: a sealed list is in flight before the new, empty list replaces it
        flight = self._writing
        in_flight = flight_index = empty
        in_files = torch.arange(missing.numel())
        if flight is not None and missing.numel():
            wanted = rows.index_select(0, missing)
            index = torch.searchsorted(flight.rows, wanted).clamp_(max=flight.rows.numel() - 1)
            hit = flight.rows.index_select(0, index) == wanted
            in_flight, in_files = hit.nonzero().squeeze(1), (~hit).nonzero().squeeze(1)
            flight_index = index[in_flight]
        return _Found(
            sets, positions, slots, over_positions, over_index, missing, flight, in_flight, flight_index, in_files, {}
        )

    def resident(self, rows: torch.Tensor) -> torch.Tensor:
        """(U,) bool: which of ``rows`` (U,) are in the buffer (its sets, its overflow list or the batch in flight)."""
        found = self._find(rows)
        hit = torch.ones(rows.numel(), dtype=torch.bool)
        hit[found.missing[found.in_files]] = False
        return hit

    def read(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows (U,) of array ``name``: (U, ...), the buffered ones from the buffer."""
        found = self._find(rows)
        data = self.data[name]
        if found.positions.numel() == rows.numel():  # all in slots (positions is then 0..U-1)
            return data.index_select(0, found.slots)
        out = data.new_empty(rows.numel(), *data.shape[1:])
        out.index_copy_(0, found.positions, data.index_select(0, found.slots))
        out.index_copy_(0, found.over_positions, self.overflow[name].index_select(0, found.over_index))
        if found.missing.numel():  # only rows not buffered touch the file
            out.index_copy_(0, found.missing, self._missing_values(name, rows, found))
        return out

    def _missing_values(self, name: str, rows: torch.Tensor, found: _Found) -> torch.Tensor:
        """Array ``name``'s values (M, ...) of the rows of ``rows`` (U,) in no slot and not in the list
        (``found.missing``), from the batch in flight, else from the files; read once per ``found``.

        The answer is kept in ``found.loaded`` (and must not be changed): the files do not change while
        ``found`` holds (the worker writes only rows of the batch, which are read from the batch).
        """
        values = found.loaded.get(name)
        if values is not None:
            return values
        rows = rows.index_select(0, found.missing)
        if not found.in_flight.numel():
            values = self.read_rows(name, rows)
        else:
            batch = found.flight.values[name]
            values = batch.new_empty(rows.numel(), *batch.shape[1:])
            values.index_copy_(0, found.in_flight, batch.index_select(0, found.flight_index))
            if found.in_files.numel():
                values.index_copy_(0, found.in_files, self.read_rows(name, rows.index_select(0, found.in_files)))
        found.loaded[name] = values
        return values

    def write(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows (U,) distinct of array ``name`` to ``values`` (U, ...).

        Raises the error of a failed background write-back (see ``wait``) before changing anything.
        """
        if self._writing is not None and self._writing.done.done():
            self.wait()
        self.clock += 1
        found = self._find(rows)
        self.stamps.view(-1).index_fill_(0, found.slots, self.clock)
        data = self.data[name]
        values = values.to(data.dtype)
        if found.positions.numel() == rows.numel():  # all in slots: the usual case once a step's rows are claimed
            data.index_copy_(0, found.slots, values)
            return
        data.index_copy_(0, found.slots, values.index_select(0, found.positions))
        self.overflow[name].index_copy_(0, found.over_index, values.index_select(0, found.over_positions))
        if found.missing.numel():
            self._claim(name, rows, values, found)

    def _claim(self, name: str, rows: torch.Tensor, values: torch.Tensor, found: _Found) -> None:
        """Bring the rows of ``rows`` (U,) that are not buffered (``found.missing``, N of them) into the buffer,
        with their ``values`` of array ``name`` (from ``values`` (U, ...)).

        Their other arrays are read first, from the batch in flight or the files (a failed read changes
        nothing). Rows that get a slot displace its row to the overflow list; rows that get none go to
        the list themselves. Leaves ``_find``'s answer for ``rows``.
        """
        won, won_slots = self._place(found.sets.index_select(0, found.missing))
        loaded = {other: self._missing_values(other, rows, found) for other in self.arrays if other != name}
        loaded[name] = values.index_select(0, found.missing)
        claimed = rows.index_select(0, found.missing)
        winners, losers = won.nonzero().squeeze(1), (~won).nonzero().squeeze(1)
        tags, stamps = self.tags.view(-1), self.stamps.view(-1)
        victims = tags[won_slots]
        occupied = (victims != EMPTY).nonzero().squeeze(1)
        if self._writing is not None and self.overflow_rows.numel() + occupied.numel() + losers.numel() > (
            self.overflow_capacity
        ):  # the list will be written back: after the batch in flight, whose error is raised before any change
            self.wait()
        victim_slots = won_slots[occupied]
        out_rows = torch.cat([victims[occupied], claimed[losers]])
        out_values = {n: torch.cat([self.data[n][victim_slots], loaded[n][losers]]) for n in self.arrays}
        for n, data in self.data.items():
            data[won_slots] = loaded[n][winners].to(data.dtype)
        tags[won_slots] = claimed[winners]
        stamps[won_slots] = self.clock
        self._placement += 1
        if out_rows.numel():
            self._to_overflow(out_rows, out_values)
        # the rows held in a slot now: those that were, and the winners (a claim displaces no row of its call)
        slot_of = torch.full((rows.numel(),), EMPTY, dtype=torch.long)
        slot_of[found.positions] = found.slots
        slot_of[found.missing[winners]] = won_slots
        positions = (slot_of != EMPTY).nonzero().squeeze(1)
        located = self._locate(rows, found.sets, positions, slot_of.index_select(0, positions))
        self._memo = _Memo(rows, rows._version, self._placement, located)

    def _place(self, new_sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for newcomers of sets ``new_sets`` (N,), in the call's order: (won (N,) bool, winners' slots (M,)).

        The k-th newcomer of a set takes the set's k-th slot in (stamp, way) order among those not
        stamped by this call; newcomers beyond them get none.
        """
        groups, group_of = torch.unique(new_sets, return_inverse=True)  # (K,) sets involved, (N,)
        # rank of each newcomer among the newcomers of its set, keeping the call's order (stable sort)
        by_group = torch.sort(group_of, stable=True)
        counts = torch.bincount(group_of, minlength=groups.numel())
        starts = torch.cumsum(counts, 0) - counts  # (K,) first position of each group in by_group
        rank = torch.empty_like(group_of)
        rank[by_group.indices] = torch.arange(group_of.numel()) - starts[by_group.values]
        stamps = self.stamps[groups]  # (K, W)
        free = (stamps < self.clock).sum(1)  # (K,) slots not used by this call
        order = torch.sort(stamps, dim=1, stable=True).indices  # (K, W) ways, least recently written first
        won = rank < free[group_of]
        ways = order[group_of[won], rank[won]]
        return won, groups[group_of[won]] * self.ways + ways

    def _to_overflow(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Put rows (K,), in no slot and not in the list, with ``values`` (name -> (K, ...)) into the overflow list.

        A full list is written back first (sealed, with ``background``); rows that do not fit even in an
        empty one go to the files, with the list, on this thread. Either way, ``_claim`` has waited for the
        batch in flight first.
        """
        if rows.numel() > self.overflow_capacity:
            self._write_back_overflow()
            self._write_back_rows(rows, values)
            return
        if self.overflow_rows.numel() + rows.numel() > self.overflow_capacity:
            if self.background:
                self._seal_overflow()
            else:
                self._write_back_overflow()
        self.overflow_rows, order = torch.cat([self.overflow_rows, rows]).sort()
        for name, value in values.items():
            self.overflow[name] = torch.cat([self.overflow[name], value.to(self.overflow[name].dtype)])[order]
        self._placement += 1

    def _write_back_overflow(self) -> None:
        if self.overflow_rows.numel():
            self._write_back_rows(self.overflow_rows, self.overflow)
        self._clear_overflow()

    def _seal_overflow(self) -> None:
        """Hand the overflow list (nothing in flight) to the worker and start an empty one."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-write-back")
        rows, values = self.overflow_rows, self.overflow
        done = self._worker.submit(self._write_back_rows, rows, values)
        self._writing = _Batch(rows, values, done)  # in flight before the list is emptied, for a concurrent reader
        self._clear_overflow()

    def wait(self) -> None:
        """Wait until the batch in flight (if any) is written back, then drop it.

        Raises:
            Exception: the error of its write-back, which keeps the batch (its rows are still read from
                it) and is raised again at every later change, until ``discard``.
        """
        batch = self._writing
        if batch is None:
            return
        error = batch.done.exception()  # waits for it
        if error is not None:
            raise error
        # No row moves: the files now hold the batch's rows, with the values an answer of ``_find`` that
        # points into the batch still reads there, so the placement stays.
        self._writing = None

    def _clear_overflow(self) -> None:
        self.overflow_rows = self.overflow_rows[:0]
        self.overflow = {name: value[:0] for name, value in self.overflow.items()}
        self._placement += 1

    def _write_back_rows(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write rows (U,) distinct with ``values`` (name -> (U, ...)) to the backing arrays, in ascending row order."""
        rows, order = rows.sort()  # ascending file offsets: consecutive rows merge into one write
        self.before_write_back(rows)
        for name, value in values.items():
            self.write_rows(name, rows, value[order].to(self.arrays[name].dtype))

    def write_back_all(self) -> None:
        """Write every buffered row back and empty the buffer (before a flush of the files).

        The batch in flight is written first (``wait``, whose error this raises); the rest on this thread.
        """
        self.wait()
        tags = self.tags.view(-1)
        slots = (tags != EMPTY).nonzero().squeeze(1)
        if slots.numel() or self.overflow_rows.numel():
            rows = torch.cat([tags[slots], self.overflow_rows])
            values = {name: torch.cat([data[slots], self.overflow[name]]) for name, data in self.data.items()}
            self._write_back_rows(rows, values)  # one journal record for all of them
        self.discard()

    def close(self) -> None:
        """Stop the worker thread, once its batch in flight (if any) is done; the buffer is not used afterwards.

        Writes nothing back (``write_back_all`` first for that) and raises nothing: a failed write-back
        was raised at the change after it, and ``wait`` raises it.
        """
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def discard(self) -> None:
        """Forget every buffered row without writing it (before a rollback).

        A batch in flight is waited for and forgotten, failed or not: the rollback undoes whatever part of
        it reached the files from the journal, which recorded it first.
        """
        if self._writing is not None:
            wait_for([self._writing.done])
            self._writing = None
        self.tags.fill_(EMPTY)
        self.stamps.fill_(_NEVER)
        self._clear_overflow()
