"""RowCache against a plain-Python reference of the same policy (dict slot -> [tag, count, value])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.storage.row_cache import EMPTY, RowCache

NUM_ROWS = 10_000
DIM = 8


class RefCache:
    """The admission policy of ``RowCache`` written out with dicts and loops, one row at a time."""

    def __init__(self, num_slots: int, count_cap: int = RowCache.COUNT_CAP):
        self.num_slots = num_slots
        self.count_cap = count_cap
        self.slots: dict[int, list] = {}  # slot -> [tag, count, value (list of floats)]
        self.hits = 0
        self.misses = 0

    def lookup(self, rows: list[int]) -> tuple[list[bool], list[list[float]]]:
        hit, values = [], []
        for r in rows:
            entry = self.slots.get(r % self.num_slots)
            if entry is not None and entry[0] == r:
                entry[1] = min(entry[1] + 1, self.count_cap)
                hit.append(True)
                values.append(list(entry[2]))
                self.hits += 1
            else:
                hit.append(False)
                self.misses += 1
        return hit, values

    def admit(self, rows: list[int], values: list[list[float]]) -> None:
        competed: set[int] = set()  # slots that already had their one competitor in this call
        for r, v in zip(rows, values, strict=True):
            s = r % self.num_slots
            entry = self.slots.get(s)
            if entry is not None and entry[0] == r:
                continue  # already resident
            if s in competed:
                continue  # only the first newcomer per slot competes
            competed.add(s)
            if entry is None:
                self.slots[s] = [r, 1, list(v)]
            else:
                entry[1] -= 1
                if entry[1] == 0:
                    self.slots[s] = [r, 1, list(v)]

    def update(self, rows: list[int], values: list[list[float]]) -> None:
        for r, v in zip(rows, values, strict=True):
            entry = self.slots.get(r % self.num_slots)
            if entry is not None and entry[0] == r:
                entry[2] = list(v)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def state(self, dim: int) -> tuple[list[int], list[int], list[list[float]]]:
        """(tags, counts, values) laid out like the cache's tensors."""
        tags, counts, values = [EMPTY] * self.num_slots, [0] * self.num_slots, [[0.0] * dim] * self.num_slots
        for s, (tag, count, value) in self.slots.items():
            tags[s], counts[s], values[s] = tag, count, value
        return tags, counts, values


def row_values(rows: torch.Tensor, dim: int = DIM, salt: int = 0) -> torch.Tensor:
    """A deterministic, exactly representable (n, dim) float32 value per row id (and salt)."""
    return ((rows[:, None] * dim + torch.arange(dim) + salt * 7) / 4).float()


def capacity_for(slots: int, dim: int = DIM, dtype: torch.dtype = torch.float32) -> int:
    return slots * (dim * dtype.itemsize + 12)


def zipf_batches(rng: np.random.Generator, n_batches: int, draws: int, a: float = 1.2) -> list[torch.Tensor]:
    """Batches of distinct row ids, Zipf over ``NUM_ROWS`` rows with the hot ranks scattered over ids."""
    perm = rng.permutation(NUM_ROWS)  # row ids are hash outputs: hotness has no relation to id
    batches = []
    for _ in range(n_batches):
        ranks = rng.zipf(a, size=4 * draws)
        ranks = ranks[ranks <= NUM_ROWS][:draws]
        batches.append(distinct_in_order(perm[ranks - 1]))
    return batches


def uniform_batches(rng: np.random.Generator, n_batches: int, draws: int) -> list[torch.Tensor]:
    return [distinct_in_order(rng.integers(0, NUM_ROWS, size=draws)) for _ in range(n_batches)]


def distinct_in_order(ids: np.ndarray) -> torch.Tensor:
    """Distinct ids in order of first appearance (not sorted, so the admission tie rule sees a random order)."""
    _, first = np.unique(ids, return_index=True)
    return torch.from_numpy(ids[np.sort(first)].astype(np.int64))


def assert_same_state(cache: RowCache, ref: RefCache) -> None:
    tags, counts, values = ref.state(cache.dim)
    assert cache.tags.tolist() == tags
    assert cache.counts.tolist() == counts
    torch.testing.assert_close(cache.values, torch.tensor(values, dtype=cache.dtype), rtol=0, atol=0)
    assert (cache.hits, cache.misses) == (ref.hits, ref.misses)
    assert cache.resident_rows == len(ref.slots)


def run_traffic(cache: RowCache, ref: RefCache, batches: list[torch.Tensor], check_every_batch: bool) -> int:
    """Look up each batch, admit its misses from a backing store and (every 5th batch) write part of it through.

    Returns the number of admit calls in which several misses shared a slot (the tie rule was used).
    """
    store = row_values(torch.arange(NUM_ROWS + 3))  # the backing table; 3 extra rows are never looked up
    ties = 0
    for i, rows in enumerate(batches):
        hit, values = cache.lookup(rows)
        ref_hit, ref_values = ref.lookup(rows.tolist())
        assert hit.tolist() == ref_hit
        assert values.tolist() == ref_values
        assert torch.equal(values, store[rows[hit]])  # write-through keeps the cache coherent with the store

        # Now and then offer the whole batch, so already-resident rows are offered too.
        offer = rows if i % 7 == 6 else rows[~hit]
        ties += int(torch.unique(offer % cache.num_slots).numel() < offer.numel())
        cache.admit(offer, store[offer])
        ref.admit(offer.tolist(), store[offer].tolist())

        if i % 5 == 4:
            # Half of the batch (some cached, some not) plus rows never seen get new values.
            upd = torch.cat([rows[::2], torch.arange(NUM_ROWS, NUM_ROWS + 3)])
            new = row_values(upd, salt=i + 1)
            store[upd] = new
            cache.update(upd, new)
            ref.update(upd.tolist(), new.tolist())
        if check_every_batch:
            assert_same_state(cache, ref)
    assert_same_state(cache, ref)
    return ties


def test_matches_reference_on_zipf_traffic():
    rng = np.random.default_rng(0)
    cache = RowCache(capacity_for(512), DIM)
    ref = RefCache(cache.num_slots)
    assert cache.num_slots == 512
    ties = run_traffic(cache, ref, zipf_batches(rng, 50, 400), check_every_batch=True)
    assert ties > 0, "the traffic never exercised the several-newcomers-per-slot rule"
    assert 0 < cache.hit_rate < 1
    assert cache.hit_rate == ref.hit_rate


def test_matches_reference_with_tiny_cache_and_count_cap(monkeypatch):
    # A small cap makes saturation part of the compared behaviour; 7 slots is not a power of two.
    monkeypatch.setattr(RowCache, "COUNT_CAP", 3)
    rng = np.random.default_rng(1)
    cache = RowCache(capacity_for(7) + 5, DIM)
    ref = RefCache(cache.num_slots, count_cap=3)
    assert cache.num_slots == 7
    run_traffic(cache, ref, zipf_batches(rng, 30, 60, a=1.5), check_every_batch=True)
    assert int(cache.counts.max()) == 3


def test_zipf_traffic_hits_far_more_than_uniform():
    rng = np.random.default_rng(2)
    rates = {}
    for name, batches in [("zipf", zipf_batches(rng, 50, 400)), ("uniform", uniform_batches(rng, 50, 400))]:
        cache = RowCache(capacity_for(256), DIM)
        ref = RefCache(cache.num_slots)
        run_traffic(cache, ref, batches, check_every_batch=False)
        assert cache.hit_rate == ref.hit_rate
        rates[name] = ref.hit_rate
    assert rates["zipf"] > 2 * rates["uniform"], rates


def test_hot_row_survives_a_burst_shorter_than_its_count():
    cache = RowCache(capacity_for(16), DIM)
    hot = torch.tensor([3])
    cache.admit(hot, row_values(hot))
    for _ in range(5):
        assert cache.lookup(hot)[0].item()
    assert cache.counts[3].item() == 6

    # Many colliders in one call cost the resident a single count.
    colliders = 3 + 16 * torch.arange(1, 40)
    cache.admit(colliders, row_values(colliders))
    assert cache.tags[3].item() == 3 and cache.counts[3].item() == 5

    # One-off rows, one call each: 4 more leave the hot row resident with count 1.
    for r in colliders[:4]:
        cache.admit(r.view(1), row_values(r.view(1)))
    hit, values = cache.lookup(hot)
    assert hit.item() and torch.equal(values, row_values(hot))
    assert cache.counts[3].item() == 2  # 1 left after the burst, +1 for this lookup

    # Once it stops being read, it is worn down and replaced.
    for r in colliders[4:6]:
        cache.admit(r.view(1), row_values(r.view(1)))
    assert cache.tags[3].item() == colliders[5].item()
    assert not cache.lookup(hot)[0].item()


def test_resident_rows_are_skipped_before_the_tie_rule():
    cache = RowCache(capacity_for(16), DIM)
    cache.admit(torch.tensor([3]), row_values(torch.tensor([3])))
    # 3 is resident (count 1) and skipped, so 19 (same slot) is the competitor and wears it out.
    cache.admit(torch.tensor([3, 19, 35]), row_values(torch.tensor([3, 19, 35])))
    assert cache.tags[3].item() == 19 and cache.counts[3].item() == 1


def test_update_writes_cached_rows_only():
    cache = RowCache(capacity_for(32), DIM)
    cached = torch.tensor([1, 5, 40])
    cache.admit(cached, row_values(cached))
    cache.lookup(cached)
    before_counts, before_stats = cache.counts.clone(), cache.stats

    rows = torch.tensor([5, 2, 40, 37])  # 37 maps to slot 5 but is not cached
    new = row_values(rows, salt=9)
    cache.update(rows, new)

    assert cache.stats == before_stats
    assert torch.equal(cache.counts, before_counts)
    assert sorted(cache.tags[cache.tags != EMPTY].tolist()) == [1, 5, 40]
    hit, values = cache.lookup(torch.tensor([1, 5, 40, 2, 37]))
    assert hit.tolist() == [True, True, True, False, False]
    assert torch.equal(values, torch.cat([row_values(torch.tensor([1])), new[[0, 2]]]))


def test_lookup_returns_copies_and_keeps_rows_order():
    cache = RowCache(capacity_for(64), DIM)
    rows = torch.tensor([10, 3, 50, 7])
    cache.admit(rows, row_values(rows))
    query = torch.tensor([50, 99, 3, 10])
    hit, values = cache.lookup(query)
    assert hit.tolist() == [True, False, True, True]
    assert torch.equal(values, row_values(query[hit]))
    values.fill_(-1)
    assert torch.equal(cache.lookup(query)[1], row_values(query[hit]))


def test_capacity_is_counted_in_bytes():
    for dim, dtype in [(8, torch.float32), (64, torch.bfloat16), (3, torch.float64)]:
        slot = dim * dtype.itemsize + 12
        cache = RowCache(100 * slot + slot - 1, dim, dtype)
        assert cache.num_slots == 100
        assert cache.nbytes == 100 * slot
    RowCache(capacity_for(1), DIM)  # exactly one slot is enough
    with pytest.raises(ValueError, match=f"at least {capacity_for(1)}"):
        RowCache(capacity_for(1) - 1, DIM)


def test_bfloat16_values_round_trip():
    cache = RowCache(capacity_for(64, dim=16, dtype=torch.bfloat16), 16, torch.bfloat16)
    rows = torch.tensor([4, 9, 33])
    values = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    cache.admit(rows, values)  # float32 in, stored as bfloat16
    hit, out = cache.lookup(rows)
    assert hit.all() and out.dtype == torch.bfloat16
    assert torch.equal(out, values.to(torch.bfloat16))
    exact = values.to(torch.bfloat16)
    cache.update(rows, exact)
    assert torch.equal(cache.lookup(rows)[1], exact)


def test_stats_clear_and_reset():
    cache = RowCache(capacity_for(8), DIM)
    assert cache.hit_rate == 0.0 and cache.resident_rows == 0
    rows = torch.tensor([0, 1, 2])
    cache.lookup(rows)
    cache.admit(rows, row_values(rows))
    cache.lookup(torch.tensor([0, 1, 5]))
    assert (cache.hits, cache.misses, cache.resident_rows) == (2, 4, 3)
    assert cache.hit_rate == pytest.approx(2 / 6) and cache.stats.hit_rate == cache.hit_rate
    cache.clear()
    assert cache.resident_rows == 0 and cache.hits == 2  # clear keeps the counters
    assert not cache.lookup(rows)[0].any()
    cache.reset_stats()
    assert (cache.hits, cache.misses, cache.hit_rate) == (0, 0, 0.0)


def test_empty_batches():
    cache = RowCache(capacity_for(8), DIM)
    hit, values = cache.lookup(torch.empty(0, dtype=torch.int64))
    assert hit.shape == (0,) and values.shape == (0, DIM)
    cache.admit(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM))
    cache.update(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM))
    assert cache.resident_rows == 0 and cache.misses == 0


@pytest.mark.parametrize(
    ("rows", "values", "error", "match"),
    [
        (torch.tensor([[1, 2]]), None, ValueError, "1 dimensions"),
        (torch.tensor([1.0, 2.0]), None, TypeError, "integer ids"),
        (torch.tensor([1, -2]), None, ValueError, "non-negative"),
        (torch.tensor([1, 2, 1]), None, ValueError, "distinct"),
        (torch.tensor([1, 2]), torch.zeros(2, DIM + 1), ValueError, r"shape \(2, 8\)"),
        (torch.tensor([1, 2]), torch.zeros(3, DIM), ValueError, r"shape \(2, 8\)"),
        (torch.tensor([1, 2]), torch.zeros(2, DIM, dtype=torch.bool), TypeError, "real numbers"),
        (torch.tensor([1, 2]), [[0.0] * DIM] * 2, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_refused(rows, values, error, match):
    cache = RowCache(capacity_for(8), DIM)
    with pytest.raises(error, match=match):
        if values is None:
            cache.lookup(rows)
        else:
            cache.admit(rows, values)
    assert cache.misses == 0 and cache.resident_rows == 0


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="dim"):
        RowCache(1000, 0)
    with pytest.raises(TypeError, match="floating-point"):
        RowCache(1000, DIM, torch.int32)
    with pytest.raises(TypeError, match="capacity_bytes"):
        RowCache(1000.0, DIM)
