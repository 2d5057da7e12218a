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
least recently written slot of its set (empty slots first, ties to the lower way), loading all its
arrays from the file, and the row it displaces is written back. Slots stamped by the current call
are never taken from a row of the same call: when a set has fewer free or older slots than the call
brings new rows to it, the rows beyond them (in the call's order) are written straight to the file.
Reads never change the buffer (the prefetch thread reads through it).

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
to the last checkpoint wants anyway.

Shapes: R rows of the table; G sets of W ways (S = G * W slots, slot = set * W + way); U distinct
rows of a call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EMPTY = -1
WAYS = 16  # slots per set: overflow is rare at half load, and a lookup compares 16 tags per row
_NEVER = -1  # the stamp of an empty slot: older than any write, so empty slots are claimed first


class WriteBuffer:
    """Set-associative (LRU) write-back buffer over the row arrays of one table, within ``capacity_bytes``.

    Args:
        arrays: name -> backing tensor (R, ...) (memory-mapped); every array has the same R.
        capacity_bytes: memory for the slots (each slot holds one row of every array plus an int64 tag
            and an int64 stamp).
        before_write_back: called with the rows (U,) about to be written into the backing arrays.
        write_rows: ``write_rows(name, rows, values)`` writes rows (ascending) into a backing array
            (default: ``index_copy_``; a disk table writes its files with ``pwrite``).
        read_rows: ``read_rows(name, rows)`` reads rows (U,) of a backing array as (U, ...) (default:
            ``index_select``; a disk table checks them against their checksums).
        ways: slots per set (fewer when the buffer holds fewer slots; 1 is a direct-mapped buffer).
    """

    def __init__(
        self,
        arrays: dict[str, torch.Tensor],
        capacity_bytes: int,
        before_write_back: Callable[[torch.Tensor], None] = lambda rows: None,
        write_rows: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
        read_rows: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        ways: int = WAYS,
    ):
        if ways < 1:
            raise ValueError(f"a write buffer needs at least one way per set, got ways={ways}")
        self.arrays = dict(arrays)
        slot_bytes = 16 + sum(array[0].numel() * array.element_size() for array in self.arrays.values())
        slots = int(capacity_bytes) // slot_bytes
        if slots < 1:
            raise ValueError(f"a write buffer of {capacity_bytes} bytes holds no row; give at least {slot_bytes}")
        self.ways = min(int(ways), slots)
        self.num_sets = slots // self.ways
        self.num_slots = self.num_sets * self.ways
        self.before_write_back = before_write_back
        self.write_rows = write_rows or (lambda name, rows, values: self.arrays[name].index_copy_(0, rows, values))
        self.read_rows = read_rows or (lambda name, rows: self.arrays[name].index_select(0, rows))
        self.tags = torch.full((self.num_sets, self.ways), EMPTY, dtype=torch.long)  # (G, W) row in each slot
        self.stamps = torch.full((self.num_sets, self.ways), _NEVER, dtype=torch.long)  # (G, W) clock of its last write
        self.clock = 0
        self._placement = 0  # changes whenever a row enters or leaves: ``_find``'s memo is then stale
        self._memo: tuple | None = None  # (rows, rows._version, _placement, sets, positions, slots) of the last find
        self.data = {name: array.new_empty(self.num_slots, *array.shape[1:]) for name, array in self.arrays.items()}

    @property
    def buffered_rows(self) -> int:
        return int((self.tags != EMPTY).sum())

    def set_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The set (U,) each of ``rows`` (U,) belongs to."""
        return rows % self.num_sets

    def buffered(self) -> torch.Tensor:
        """The rows held in the buffer, ascending (for tests and reports)."""
        tags = self.tags.reshape(-1)
        return tags[tags != EMPTY].sort().values

    def _find(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where ``rows`` (U,) are buffered: (sets (U,), positions (H,) of the buffered ones, ascending, slots (H,)).

        An optimizer step reads and writes every array of the same rows tensor (eight calls for
        Adam), so the answer for the last rows tensor is kept while neither it (``_version``) nor the
        buffer's placement changes: the (U, W) tag comparison then runs once per step, not per call.
        """
        memo = self._memo
        if memo is not None and memo[0] is rows and memo[1] == rows._version and memo[2] == self._placement:
            return memo[3], memo[4], memo[5]
        sets = self.set_of(rows)
        # (U, W) tag comparison; a row sits in at most one way of its set, so each position matches once
        positions, ways = torch.nonzero(self.tags[sets] == rows.unsqueeze(1), as_tuple=True)
        slots = sets[positions] * self.ways + ways
        self._memo = (rows, rows._version, self._placement, sets, positions, slots)
        return sets, positions, slots

    def read(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows (U,) of array ``name``: (U, ...), the buffered ones from the buffer."""
        _, positions, slots = self._find(rows)
        if positions.numel() == rows.numel():  # all buffered (positions is then 0..U-1)
            return self.data[name].index_select(0, slots)
        if positions.numel() == 0:
            return self.read_rows(name, rows)
        missing = self._missing(rows, positions)
        out = self.data[name].new_empty(rows.numel(), *self.data[name].shape[1:])
        out.index_copy_(0, positions, self.data[name].index_select(0, slots))
        # only rows not buffered touch the file
        out.index_copy_(0, missing, self.read_rows(name, rows.index_select(0, missing)))
        return out

    def _missing(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The positions (U - H,) of ``rows`` (U,) not among ``positions`` (H,) (not buffered), ascending; kept
        with ``_find``'s memo, since a step reads every array of the same rows before it writes them."""
        memo = self._memo
        if memo is not None and memo[0] is rows and memo[4] is positions and len(memo) > 6:
            return memo[6]
        mask = torch.ones(rows.numel(), dtype=torch.bool)
        mask[positions] = False
        missing = mask.nonzero().squeeze(1)
        if memo is not None and memo[0] is rows and memo[4] is positions:
            self._memo = (*memo, missing)
        return missing

    def write(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows (U,) distinct of array ``name`` to ``values`` (U, ...)."""
        self.clock += 1
        sets, positions, slots = self._find(rows)
        self.stamps.view(-1)[slots] = self.clock
        data = self.data[name]
        if positions.numel() == rows.numel():  # all buffered: the usual case once a step's rows are claimed
            data.index_copy_(0, slots, values.to(data.dtype))
            return
        into = torch.full((rows.numel(),), -1, dtype=torch.long)  # the slot each row's value goes to, -1: the file
        into[positions] = slots
        newcomers = (into < 0).nonzero().squeeze(1)  # (N,) in the call's order
        won, won_slots = self._place(sets[newcomers])
        winners = newcomers[won]
        self._claim(rows[winners], won_slots)
        into[winners] = won_slots
        losers = newcomers[~won]
        if losers.numel():
            self._write_back_rows(rows[losers], {name: values[losers]})
        kept = (into >= 0).nonzero().squeeze(1)
        data.index_copy_(0, into[kept], values[kept].to(data.dtype))
        # the rows' places after the claim, for the calls of the same step that follow
        self._memo = (rows, rows._version, self._placement, sets, kept, into[kept])

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

    def _claim(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Put rows (U,) into distinct free or displaceable ``slots`` (U,), writing back the rows they displace."""
        loaded = {name: self.read_rows(name, rows) for name in self.arrays}  # first: a failed read changes nothing
        tags, stamps = self.tags.view(-1), self.stamps.view(-1)
        victims = tags[slots]
        occupied = victims != EMPTY
        if bool(occupied.any()):
            victim_slots = slots[occupied]
            self._write_back_rows(victims[occupied], {name: data[victim_slots] for name, data in self.data.items()})
        for name, values in loaded.items():
            self.data[name][slots] = values
        tags[slots] = rows
        stamps[slots] = self.clock
        self._placement += 1

    def _write_back_rows(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write rows (U,) distinct with ``values`` (name -> (U, ...)) to the backing arrays, in ascending row order."""
        rows, order = rows.sort()  # ascending file offsets: consecutive rows merge into one write
        self.before_write_back(rows)
        for name, value in values.items():
            self.write_rows(name, rows, value[order].to(self.arrays[name].dtype))

    def write_back_all(self) -> None:
        """Write every buffered row back and empty the buffer (before a flush of the files)."""
        tags = self.tags.view(-1)
        slots = (tags != EMPTY).nonzero().squeeze(1)
        if slots.numel():
            self._write_back_rows(tags[slots], {name: data[slots] for name, data in self.data.items()})
        self.discard()

    def discard(self) -> None:
        """Forget every buffered row without writing it (after a rollback)."""
        self.tags.fill_(EMPTY)
        self.stamps.fill_(_NEVER)
        self._placement += 1
