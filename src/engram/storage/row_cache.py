"""A frequency-aware, direct-mapped cache of hot table rows, limited in bytes.

Engram tables are huge and their row accesses are Zipfian: a small set of rows (frequent n-grams)
takes most reads. When a table lives on disk, keeping those rows in memory saves most of the reads.
``RowCache`` holds up to ``num_slots`` rows; everything is a tensor operation on a batch of rows,
with no Python loop over rows.

Policy
------
Row ``r`` can only live in slot ``s = r % num_slots`` (direct-mapped). Engram row ids are hash
outputs and so already roughly uniform, which makes the plain modulo a fair slot mapping; a table
whose row ids have structure (strides, blocks) would need a mixing hash first.

Each slot keeps a small frequency counter. A lookup hit increments it (saturating at
``COUNT_CAP``). A newcomer offered after a miss takes an empty slot outright; against a resident
row it only decrements the resident's count, and replaces it when that count reaches 0. A hot row
therefore survives a burst of one-off rows shorter than its count, while a row that is no longer
read is worn down and replaced.

Tie rule: when several newcomers of one ``admit`` call map to the same slot, only the first of
them in ``rows`` order competes (one decrement at most per slot per call); the others are not
admitted. Rows of the call that are already resident are skipped before that rule applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram._checks import as_id_tensor

EMPTY = -1  # tag of a slot that holds no row; row ids are >= 0
_TAG_BYTES = 8  # int64 tag per slot
_COUNT_BYTES = 4  # int32 count per slot


@dataclass(frozen=True)
class RowCacheStats:
    """A snapshot of a cache's counters; ``hits``/``misses`` are cumulative since the last reset."""

    hits: int
    misses: int
    resident_rows: int

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 when nothing has been looked up."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class RowCache:
    """Frequency-aware direct-mapped cache of rows of width ``dim``, within ``capacity_bytes``.

    Storage (all on ``device``): ``tags`` (S,) int64, the row held by each slot or ``EMPTY``;
    ``counts`` (S,) int32, each slot's frequency counter (0 when empty); ``values`` (S, dim) in
    ``dtype``. Each slot costs ``dim * itemsize + 12`` bytes (values, tag, count), so
    ``S = capacity_bytes // slot_bytes``.
    """

    COUNT_CAP = 2**20  # counts saturate here so a very hot row cannot overflow int32

    def __init__(
        self,
        capacity_bytes: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError(f"capacity_bytes must be an integer, got {type(capacity_bytes).__name__}")
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.slot_bytes = dim * dtype.itemsize + _TAG_BYTES + _COUNT_BYTES
        if capacity_bytes < self.slot_bytes:
            raise ValueError(
                f"capacity_bytes={capacity_bytes} holds no row: one slot of dim={dim} in {dtype} needs "
                f"{self.slot_bytes} bytes ({dim}*{dtype.itemsize} for values + {_TAG_BYTES + _COUNT_BYTES} "
                f"for bookkeeping), so give at least {self.slot_bytes}"
            )
        self.num_slots = capacity_bytes // self.slot_bytes
        self.tags = torch.full((self.num_slots,), EMPTY, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(self.num_slots, dtype=torch.int32, device=self.device)
        self.values = torch.zeros(self.num_slots, dim, dtype=dtype, device=self.device)
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------- properties

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the cache storage (at most ``capacity_bytes``)."""
        return self.tags.nbytes + self.counts.nbytes + self.values.nbytes

    @property
    def resident_rows(self) -> int:
        """Number of slots that currently hold a row."""
        return int((self.tags != EMPTY).sum())

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses) since the last ``reset_stats``; 0.0 when nothing was looked up."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def stats(self) -> RowCacheStats:
        """A snapshot of the hit/miss counters and the occupancy."""
        return RowCacheStats(hits=self.hits, misses=self.misses, resident_rows=self.resident_rows)

    def reset_stats(self) -> None:
        """Zero the hit and miss counters; the cached rows stay."""
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Drop every cached row; the hit/miss counters are kept (see ``reset_stats``)."""
        self.tags.fill_(EMPTY)
        self.counts.zero_()
        self.values.zero_()

    # ---------------------------------------------------------------- operations

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Find ``rows`` (U,) distinct ids in the cache.

        Returns ``hit`` (U,) bool on the device of ``rows`` and ``values`` (n_hit, dim) in the
        cache dtype and device: copies of the cached rows ``rows[hit]``, in that order. Counts the
        hits and misses and bumps the counter of every hit slot (saturating at ``COUNT_CAP``).
        """
        rows_in = rows
        rows = self._check_rows(rows)
        slots = rows % self.num_slots
        hit = self.tags[slots] == rows
        hit_slots = slots[hit]
        # Distinct rows hit distinct slots (a slot holds one tag), so the indexed write has no collisions.
        self.counts[hit_slots] = (self.counts[hit_slots] + 1).clamp_(max=self.COUNT_CAP)
        n_hit = hit_slots.numel()
        self.hits += n_hit
        self.misses += rows.numel() - n_hit
        return hit.to(rows_in.device), self.values[hit_slots]  # advanced indexing copies

    def holds(self, rows: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which of ``rows`` (n,) int64, on the cache's device, are cached (no stats are counted)."""
        return self.tags[rows % self.num_slots] == rows

    def admit(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Offer ``rows`` (n,) distinct, just read from the backing store, with ``values`` (n, dim).

        Per slot ``s = row % S``: empty -> the newcomer takes it (count 1); held by another row ->
        the resident's count drops by 1 and the newcomer replaces it (count 1) only if that reaches
        0. Rows already resident are skipped; of several newcomers for one slot only the first in
        ``rows`` order competes. Stats are not touched.
        """
        rows = self._check_rows(rows)
        values = self._check_values(values, rows.numel())
        if rows.numel() == 0:
            return
        slots = rows % self.num_slots
        fresh = self.tags[slots] != rows  # a resident row has nothing to gain from competing
        rows, values, slots = rows[fresh], values[fresh], slots[fresh]
        # First newcomer per slot: a stable sort keeps rows order within each slot's run.
        sorted_slots, order = torch.sort(slots, stable=True)
        first = torch.ones_like(sorted_slots, dtype=torch.bool)
        first[1:] = sorted_slots[1:] != sorted_slots[:-1]
        pick = order[first]
        rows, values, slots = rows[pick], values[pick], slots[pick]

        empty = self.tags[slots] == EMPTY
        # Occupied slots always have count >= 1, so the decremented count stays >= 0.
        worn = torch.where(empty, torch.zeros_like(slots, dtype=torch.int32), self.counts[slots] - 1)
        replace = worn == 0
        self.counts[slots] = torch.where(replace, torch.ones_like(worn), worn)
        self.tags[slots[replace]] = rows[replace]
        self.values[slots[replace]] = values[replace]

    def update(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write-through: ``rows`` (n,) distinct now hold ``values`` (n, dim) in the backing store.

        Cached rows take the new values; the others are ignored (no admission, no stats, no
        count change).
        """
        rows = self._check_rows(rows)
        self.write_through(rows, self._check_values(values, rows.numel()))

    def write_through(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``update`` without its checks, for a table's optimizer writing the rows ``take_row_grad`` gave it:
        ``rows`` (n,) distinct int64 ids and ``values`` (n, dim), both on the cache's device, in its dtype."""
        slots = rows % self.num_slots
        hit = self.tags[slots] == rows
        self.values[slots[hit]] = values[hit]

    # ---------------------------------------------------------------- validation

    def _check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """1-D, integer, non-negative, distinct ids -> int64 on the cache device."""
        rows = as_id_tensor(rows, "rows", ndim=1).to(self.device)
        if rows.numel() == 0:
            return rows
        if int(rows.min()) < 0:
            raise ValueError(f"rows must be non-negative row ids, got {int(rows.min())}")
        # Duplicates would be counted twice as hits and make indexed writes order-dependent.
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("rows must be distinct; deduplicate first, e.g. with torch.unique(rows)")
        return rows

    def _check_values(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """(n, dim) real values -> cache dtype and device."""
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"values must be real numbers convertible to {self.dtype}, got dtype {values.dtype}")
        if tuple(values.shape) != (n, self.dim):
            raise ValueError(f"values must have shape ({n}, {self.dim}) to match rows, got {tuple(values.shape)}")
        return values.detach().to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        return (
            f"RowCache(num_slots={self.num_slots}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes})"
        )
