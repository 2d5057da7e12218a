"""The write-back buffer against a plain model of the arrays it stands in front of, and its placement
policy (set-associative, least recently written first) against a straightforward reference model."""

from __future__ import annotations

import pytest
import torch

from engram.storage.write_buffer import WriteBuffer

SLOT_BYTES = 16 + 4 * 4 + 4 * 4 + 8  # tag and stamp, then a row of each array of ``_arrays``


def _arrays(rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(rows, 4, generator=generator),
        "exp_avg": torch.randn(rows, 4, generator=generator),
        "row_step": torch.randint(0, 9, (rows,), generator=generator),
    }


@pytest.mark.parametrize(
    ("slots", "ways", "overflow"), [(1, 16, 0), (7, 1, 0), (7, 16, 0), (64, 4, 0), (64, 16, 0), (7, 1, 3), (64, 4, 5)]
)
def test_reads_see_every_write_and_write_back_leaves_the_arrays_right(slots, ways, overflow):
    backing = _arrays(100)
    logical = {name: array.clone() for name, array in backing.items()}  # what the arrays should read as
    written_back = []

    def before_write_back(rows: torch.Tensor) -> None:
        # The callback runs before the backing rows change: they still hold their old values.
        written_back.append(rows.clone())
        assert len(set(rows.tolist())) == rows.numel()

    buffer = WriteBuffer(backing, (slots + overflow) * SLOT_BYTES, before_write_back, ways=ways, overflow_rows=overflow)
    assert buffer.num_slots == slots // buffer.ways * buffer.ways
    assert buffer.ways == min(ways, slots)
    assert buffer.overflow_capacity == overflow
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        rows = torch.randperm(100, generator=generator)[: int(torch.randint(1, 30, (1,), generator=generator))]
        rows = rows.sort().values
        for name in ("row_step", "exp_avg", "weight"):  # an optimizer's order: every array of the same rows
            if name == "row_step":
                values = logical[name][rows] + 1
            else:
                values = torch.randn(rows.numel(), 4, generator=generator)
            buffer.write(name, rows, values)
            logical[name][rows] = values
        probe = torch.randperm(100, generator=generator)[:40]
        for name in logical:
            assert torch.equal(buffer.read(name, probe), logical[name][probe]), name
        assert buffer.buffered_rows <= slots + overflow
        assert buffer.buffered().numel() == buffer.buffered_rows == len(set(buffer.buffered().tolist()))
    buffer.write_back_all()
    assert buffer.buffered_rows == 0
    for name in logical:
        assert torch.equal(backing[name], logical[name]), name
    assert written_back  # rows really went through the callback


def test_backing_rows_change_only_after_the_callback():
    backing = _arrays(10)
    snapshot = {name: array.clone() for name, array in backing.items()}
    seen = []

    def before_write_back(rows: torch.Tensor) -> None:
        for name in backing:  # nothing of these rows has reached the backing arrays yet
            assert torch.equal(backing[name][rows], snapshot[name][rows])
        seen.extend(rows.tolist())

    buffer = WriteBuffer(backing, 2 * SLOT_BYTES, before_write_back, ways=1, overflow_rows=0)  # 2 sets of 1 slot
    buffer.write("weight", torch.tensor([0, 1, 3]), torch.ones(3, 4))  # slots 0, 1; row 3 collides with 1
    assert torch.equal(backing["weight"][0], snapshot["weight"][0])  # buffered, not written
    assert seen == [3]  # the loser went straight to the array
    assert torch.equal(backing["weight"][3], torch.ones(4))
    buffer.discard()
    assert torch.equal(buffer.read("weight", torch.tensor([0])), snapshot["weight"][[0]])  # forgotten


def test_too_small_a_buffer_is_refused():
    with pytest.raises(ValueError, match="holds no row"):
        WriteBuffer(_arrays(5), 10)


def test_rows_come_from_the_read_callback_and_a_failed_read_changes_nothing():
    backing = _arrays(10)
    snapshot = {name: array.clone() for name, array in backing.items()}
    reads = []

    def read_rows(name: str, rows: torch.Tensor) -> torch.Tensor:
        reads.append((name, rows.tolist()))
        if 5 in rows.tolist():  # a disk table raises here for a row that fails its checksum
            raise ValueError("row 5 is damaged")
        return backing[name].index_select(0, rows)

    buffer = WriteBuffer(backing, 4 * SLOT_BYTES, read_rows=read_rows, ways=1, overflow_rows=0)
    buffer.write("weight", torch.tensor([1, 2]), torch.ones(2, 4))  # a claim loads the other arrays of its rows
    assert sorted(reads) == [("exp_avg", [1, 2]), ("row_step", [1, 2])]
    reads.clear()
    assert torch.equal(buffer.read("exp_avg", torch.tensor([1, 3, 2])), backing["exp_avg"][[1, 3, 2]])
    assert reads == [("exp_avg", [3])]  # only the row that is not buffered

    with pytest.raises(ValueError, match="row 5 is damaged"):
        buffer.write("weight", torch.tensor([5]), torch.zeros(1, 4))  # row 5 would displace row 1 (slot 1)
    assert buffer.buffered_rows == 2
    assert torch.equal(buffer.read("weight", torch.tensor([1, 2])), torch.ones(2, 4))  # still buffered
    for name in backing:
        assert torch.equal(backing[name], snapshot[name]), name  # row 1 was not written back


class ReferenceBuffer:
    """The placement policy of ``WriteBuffer``, written plainly: per set, a list of (row, stamp) per way.

    A write call advances the clock; buffered rows of the call get the new stamp; then, in the call's
    order, each row that is not buffered takes the slot of its set with the lowest (stamp, way) among
    the slots the call has not stamped (empty slots have stamp -1), displacing its row, or goes
    straight to the file when there is none.
    """

    def __init__(self, num_sets: int, ways: int):
        self.num_sets, self.ways = num_sets, ways
        self.rows = [[-1] * ways for _ in range(num_sets)]
        self.stamps = [[-1] * ways for _ in range(num_sets)]
        self.clock = 0

    def write(self, rows: list[int]) -> tuple[list[int], list[int]]:
        """(rows displaced, rows written straight to the file) by one write call."""
        self.clock += 1
        newcomers = []
        for row in rows:
            s = row % self.num_sets
            if row in self.rows[s]:
                self.stamps[s][self.rows[s].index(row)] = self.clock
            else:
                newcomers.append(row)
        displaced, through = [], []
        for row in newcomers:
            s = row % self.num_sets
            candidates = [(self.stamps[s][w], w) for w in range(self.ways) if self.stamps[s][w] < self.clock]
            if not candidates:
                through.append(row)
                continue
            _, way = min(candidates)
            if self.rows[s][way] != -1:
                displaced.append(self.rows[s][way])
            self.rows[s][way], self.stamps[s][way] = row, self.clock
        return displaced, through


@pytest.mark.parametrize(("slots", "ways"), [(12, 4), (16, 16), (15, 1), (40, 8)])
def test_placement_follows_the_reference_model(slots, ways):
    num_rows = 200
    backing = _arrays(num_rows)
    logical = {name: array.clone() for name, array in backing.items()}
    written_back: list[list[int]] = []
    buffer = WriteBuffer(
        backing, slots * SLOT_BYTES, lambda rows: written_back.append(rows.tolist()), ways=ways, overflow_rows=0
    )
    reference = ReferenceBuffer(buffer.num_sets, buffer.ways)
    generator = torch.Generator().manual_seed(2)
    hot = torch.randperm(num_rows, generator=generator)[:30]  # a working set rewritten often, as n-grams are
    for _ in range(150):
        count = int(torch.randint(1, 20, (1,), generator=generator))
        pool = hot if bool(torch.rand(1, generator=generator) < 0.6) else torch.arange(num_rows)
        rows = pool[torch.randperm(pool.numel(), generator=generator)[:count]]  # distinct, in no particular order
        written_back.clear()
        values = torch.randn(rows.numel(), 4, generator=generator)
        buffer.write("exp_avg", rows, values)
        logical["exp_avg"][rows] = values
        displaced, through = reference.write(rows.tolist())
        # one write-back for the displaced rows (all arrays), one for the rows written through
        assert sorted(row for call in written_back for row in call) == sorted(displaced + through)
        assert buffer.tags.tolist() == reference.rows
        assert buffer.stamps.tolist() == reference.stamps
        probe = torch.randperm(num_rows, generator=generator)[:50]
        for name in logical:
            assert torch.equal(buffer.read(name, probe), logical[name][probe]), name
    buffer.write_back_all()
    for name in logical:
        assert torch.equal(backing[name], logical[name]), name


def test_a_working_set_that_fits_its_sets_is_never_written_back():
    """At half load a 16-way buffer keeps every row of a working set that a direct-mapped one of the
    same size keeps only in part: the point of the set-associative buffer."""
    num_rows, slots = 100_000, 1024
    generator = torch.Generator().manual_seed(3)
    working = torch.randperm(num_rows, generator=generator)[:512].sort().values
    backing = {"weight": torch.zeros(num_rows, 4)}
    slot_bytes = 16 + 16
    counts = {}
    for ways in (1, 16):
        rows_written: list[int] = []
        buffer = WriteBuffer(
            backing,
            slots * slot_bytes,
            lambda rows, out=rows_written: out.append(rows.numel()),
            ways=ways,
            overflow_rows=0,
        )
        per_set = torch.bincount(buffer.set_of(working), minlength=buffer.num_sets)
        fits = bool((per_set <= buffer.ways).all())
        for step in range(5):
            batch = working[torch.randperm(working.numel(), generator=generator)[:300]].sort().values
            buffer.write("weight", batch, torch.full((batch.numel(), 4), float(step)))
        counts[ways] = (sum(rows_written), fits)
    assert counts[16] == (0, True)
    assert counts[1][0] > 50 and not counts[1][1]  # 512 rows in 1024 direct-mapped slots collide


def test_displaced_rows_wait_in_the_overflow_list_and_reach_the_files_together():
    backing = _arrays(20)
    snapshot = {name: array.clone() for name, array in backing.items()}
    written_back: list[list[int]] = []
    # direct-mapped, 2 sets of 1 slot, and an overflow list of 3 rows
    buffer = WriteBuffer(
        backing, 5 * SLOT_BYTES, lambda rows: written_back.append(rows.tolist()), ways=1, overflow_rows=3
    )
    assert (buffer.num_slots, buffer.overflow_capacity) == (2, 3)
    for step, rows in enumerate([[0, 1], [2], [4], [6]]):  # 2, 4, 6 each displace the row of set 0
        buffer.write("weight", torch.tensor(rows), torch.full((len(rows), 4), float(step)))
    assert written_back == []  # rows 0, 2 and 4 wait in the list
    assert buffer.overflow_rows.tolist() == [0, 2, 4]
    assert torch.equal(backing["weight"], snapshot["weight"])  # nothing reached the files
    expected = torch.tensor([[0.0] * 4, [1.0] * 4, [2.0] * 4, [3.0] * 4])
    assert torch.equal(buffer.read("weight", torch.tensor([0, 2, 4, 6])), expected)
    buffer.write("exp_avg", torch.tensor([2]), torch.full((1, 4), 9.0))  # a row in the list is written there
    assert buffer.overflow_rows.tolist() == [0, 2, 4]
    assert written_back == []
    buffer.write("weight", torch.tensor([8]), torch.full((1, 4), 5.0))  # displaces 6: the list is full
    assert written_back == [[0, 2, 4]]  # written back together, then 6 enters the emptied list
    assert buffer.overflow_rows.tolist() == [6]
    assert torch.equal(backing["weight"][[0, 2, 4]], expected[:3])
    assert torch.equal(backing["exp_avg"][2], torch.full((4,), 9.0))
    assert torch.equal(backing["row_step"][[0, 2, 4]], snapshot["row_step"][[0, 2, 4]])  # loaded, unchanged
    buffer.write_back_all()
    assert written_back[-1] == [1, 6, 8]  # slots and list in one write-back, ascending
    assert torch.equal(backing["weight"][[1, 6, 8]], torch.tensor([[0.0] * 4, [3.0] * 4, [5.0] * 4]))
    assert buffer.buffered_rows == 0
