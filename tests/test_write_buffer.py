"""The write-back buffer against a plain model of the arrays it stands in front of, and its placement
policy (set-associative, least recently written first) against a straightforward reference model."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from engram.storage import DiskTable, write_buffer
from engram.storage.journal import UndoJournal
from engram.storage.table_file import TableFile, TableFileError
from engram.storage.write_buffer import WriteBuffer
from engram.training import Trainer, seed_everything
from tests.corpus import sonnets_tokens
from tests.test_tiers import _model, _same_weights
from tests.test_training import TRAIN

SLOT_BYTES = 16 + 4 * 4 + 4 * 4 + 8  # tag and stamp, then a row of each array of ``_arrays``


def _arrays(rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(rows, 4, generator=generator),
        "exp_avg": torch.randn(rows, 4, generator=generator),
        "row_step": torch.randint(0, 9, (rows,), generator=generator),
    }


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize(
    ("slots", "ways", "overflow"), [(1, 16, 0), (7, 1, 0), (7, 16, 0), (64, 4, 0), (64, 16, 0), (7, 1, 3), (64, 4, 5)]
)
def test_reads_see_every_write_and_write_back_leaves_the_arrays_right(slots, ways, overflow, background):
    backing = _arrays(100)
    logical = {name: array.clone() for name, array in backing.items()}  # what the arrays should read as
    written_back = []

    def before_write_back(rows: torch.Tensor) -> None:
        # The callback runs before the backing rows change: they still hold their old values.
        written_back.append(rows.clone())
        assert len(set(rows.tolist())) == rows.numel()

    buffer = WriteBuffer(
        backing,
        (slots + overflow) * SLOT_BYTES,
        before_write_back,
        ways=ways,
        overflow_rows=overflow,
        background=background,
    )
    assert buffer.num_slots == slots // buffer.ways * buffer.ways
    assert buffer.ways == min(ways, slots)
    assert buffer.overflow_capacity == overflow
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        rows = torch.randperm(100, generator=generator)[: int(torch.randint(1, 30, (1,), generator=generator))]
        rows = rows.sort().values
        for name in logical:  # an optimizer reads every array of rows equal to those its fetch looked up
            assert torch.equal(buffer.read(name, rows.clone()), logical[name][rows]), name
        for name in ("row_step", "exp_avg", "weight"):  # an optimizer's order: every array of the same rows
            if name == "row_step":
                values = logical[name][rows] + 1
            else:
                values = torch.randn(rows.numel(), 4, generator=generator)
            buffer.write(name, rows, values)
            logical[name][rows] = values
        for probe in torch.randperm(100, generator=generator).view(2, 50):  # two probes of one shape
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


@pytest.mark.parametrize("background", [False, True])
def test_a_step_reads_each_array_of_a_row_from_the_files_once(background):
    """An optimizer step reads every array of its rows, then writes them: the rows that were not buffered
    are read from the files by the reads, and the claims of the writes bring them in without reading again."""
    backing = _arrays(100)
    logical = {name: array.clone() for name, array in backing.items()}
    reads: list[tuple[str, int]] = []

    def read_rows(name: str, rows: torch.Tensor) -> torch.Tensor:
        reads.append((name, rows.numel()))
        return backing[name].index_select(0, rows)

    buffer = WriteBuffer(
        backing, (32 + 4) * SLOT_BYTES, read_rows=read_rows, ways=4, overflow_rows=4, background=background
    )
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        rows = torch.randperm(100, generator=generator)[:12].sort().values
        new = int((~buffer.resident(rows)).sum())
        reads.clear()
        for name in logical:
            assert torch.equal(buffer.read(name, rows.clone()), logical[name][rows]), name
        assert sorted(reads) == (sorted((name, new) for name in logical) if new else [])
        _step(buffer, logical, rows, generator)
        assert len(reads) == (len(logical) if new else 0)  # nothing more was read
        assert _same(buffer, logical, torch.arange(100))
    buffer.write_back_all()
    for name in logical:
        assert torch.equal(backing[name], logical[name]), name


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


@pytest.mark.parametrize("background", [False, True])
def test_displaced_rows_wait_in_the_overflow_list_and_reach_the_files_together(background):
    backing = _arrays(20)
    snapshot = {name: array.clone() for name, array in backing.items()}
    written_back: list[list[int]] = []
    # direct-mapped, 2 sets of 1 slot, and an overflow list of 3 rows
    buffer = WriteBuffer(
        backing,
        5 * SLOT_BYTES,
        lambda rows: written_back.append(rows.tolist()),
        ways=1,
        overflow_rows=3,
        background=background,
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
    buffer.wait()  # background: the list was sealed, and is written back on the worker
    assert written_back == [[0, 2, 4]]  # written back together, then 6 enters the emptied list
    assert buffer.overflow_rows.tolist() == [6]
    assert torch.equal(backing["weight"][[0, 2, 4]], expected[:3])
    assert torch.equal(backing["exp_avg"][2], torch.full((4,), 9.0))
    assert torch.equal(backing["row_step"][[0, 2, 4]], snapshot["row_step"][[0, 2, 4]])  # loaded, unchanged
    buffer.write_back_all()
    assert written_back[-1] == [1, 6, 8]  # slots and list in one write-back, ascending
    assert torch.equal(backing["weight"][[1, 6, 8]], torch.tensor([[0.0] * 4, [3.0] * 4, [5.0] * 4]))
    assert buffer.buffered_rows == 0


def _step(
    buffer: WriteBuffer,
    logical: dict[str, torch.Tensor],
    rows: torch.Tensor,
    generator: torch.Generator,
    names: tuple[str, ...] = ("row_step", "exp_avg", "weight"),
) -> None:
    """What an optimizer step does to ``rows``: a write of every array (of ``names``), ``logical`` following."""
    for name in names:
        values = logical[name][rows] + 1 if name == "row_step" else torch.randn(rows.numel(), 4, generator=generator)
        buffer.write(name, rows, values)
        logical[name][rows] = values


def _same(buffer: WriteBuffer, logical: dict[str, torch.Tensor], rows: torch.Tensor) -> bool:
    return all(torch.equal(buffer.read(name, rows), logical[name][rows]) for name in logical)


def test_rows_of_a_batch_in_flight_are_read_and_rewritten_while_it_is_written_back():
    """A write-back held up on the worker: meanwhile the caller reads and rewrites the rows of its batch,
    every read sees the latest write, and in the end the arrays hold exactly what was written."""
    backing = _arrays(100)
    snapshot = {name: array.clone() for name, array in backing.items()}
    logical = {name: array.clone() for name, array in backing.items()}
    gate = threading.Event()

    def write_rows(name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        assert gate.wait(timeout=30)
        backing[name].index_copy_(0, rows, values)

    buffer = WriteBuffer(
        backing, (8 + 10) * SLOT_BYTES, write_rows=write_rows, ways=2, overflow_rows=10, background=True
    )
    generator = torch.Generator().manual_seed(4)
    while True:  # a row or two a step, until the list is full and sealed
        before = buffer.overflow_rows.clone()
        _step(buffer, logical, torch.randperm(100, generator=generator)[: int(torch.randint(1, 3, (1,)))], generator)
        if buffer.overflow_rows.numel() < before.numel():
            break
    in_flight = before  # the sealed list
    assert in_flight.numel() >= buffer.overflow_capacity - 1
    rewritten = 0
    for _ in range(40):
        pool = in_flight if bool(torch.rand(1, generator=generator) < 0.7) else torch.arange(100)
        rows = pool[torch.randperm(pool.numel(), generator=generator)[: int(torch.randint(1, 3, (1,)))]]
        if buffer.overflow_rows.numel() + rows.numel() > buffer.overflow_capacity:
            break  # the next seal would wait for the held-up batch
        # one array alone, at times: the claim must take the row's other arrays from the batch, not the files
        one = bool(torch.rand(1, generator=generator) < 0.5)
        _step(buffer, logical, rows, generator, ("exp_avg",) if one else ("row_step", "exp_avg", "weight"))
        rewritten += int(torch.isin(rows, in_flight).sum())
        assert bool(buffer.resident(in_flight).all())
        assert _same(buffer, logical, torch.arange(100))
        assert _same(buffer, logical, in_flight)
        for name in backing:  # the worker has written nothing yet: every read came from the buffer
            assert torch.equal(backing[name], snapshot[name]), name
    assert rewritten > 0
    gate.set()
    buffer.write_back_all()
    for name in logical:
        assert torch.equal(backing[name], logical[name]), name


def test_background_write_backs_are_journaled_first_and_reach_the_files_in_order():
    backing = _arrays(200)
    logical = {name: array.clone() for name, array in backing.items()}
    calls: list[tuple[str, str, tuple[int, ...], str]] = []  # (kind, array, rows, thread), list.append is atomic
    files = {name: array.clone() for name, array in backing.items()}  # what the arrays held before each write-back

    def before_write_back(rows: torch.Tensor) -> None:
        for name in backing:  # no array of these rows has changed since the last write-back
            assert torch.equal(backing[name][rows], files[name][rows]), name
        calls.append(("journal", "", tuple(rows.tolist()), threading.current_thread().name))

    def write_rows(name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        calls.append(("write", name, tuple(rows.tolist()), threading.current_thread().name))
        backing[name].index_copy_(0, rows, values)
        files[name].index_copy_(0, rows, values)

    buffer = WriteBuffer(
        backing,
        (16 + 8) * SLOT_BYTES,
        before_write_back,
        write_rows=write_rows,
        ways=4,
        overflow_rows=8,
        background=True,
    )
    generator = torch.Generator().manual_seed(5)
    hot = torch.randperm(200, generator=generator)[:40]  # rewritten often: rows come back in later batches
    for _ in range(150):
        _step(buffer, logical, hot[torch.randperm(40, generator=generator)[:3]], generator)
        assert _same(buffer, logical, hot)
    buffer.write_back_all()
    for name in logical:
        assert torch.equal(backing[name], logical[name]), name
    # one write-back after another: a journal record, then one write per array of the same rows
    batches = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert len(calls) == 4 * len(batches)
    for batch in batches:
        assert batch[0][0] == "journal"
        assert sorted((kind, name) for kind, name, _, _ in batch[1:]) == [("write", n) for n in sorted(backing)]
        assert {rows for _, _, rows, _ in batch} == {batch[0][2]}
        assert len({thread for _, _, _, thread in batch}) == 1
    threads = [batch[0][3] for batch in batches]
    assert threads[-1] == threading.current_thread().name  # write_back_all, on the caller's thread
    assert len(threads) > 5 and all(thread.startswith("engram-write-back") for thread in threads[:-1])
    seen = [set(batch[0][2]) for batch in batches[:-1]]
    assert any(seen[k] & seen[k + 1] for k in range(len(seen) - 1))  # a row written back twice, in order


def test_a_failed_background_write_back_is_raised_and_loses_no_row():
    backing = _arrays(100)
    snapshot = {name: array.clone() for name, array in backing.items()}
    logical = {name: array.clone() for name, array in backing.items()}
    failing = True

    def write_rows(name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        if failing:
            raise OSError("no space left on device")
        backing[name].index_copy_(0, rows, values)

    buffer = WriteBuffer(backing, (8 + 6) * SLOT_BYTES, write_rows=write_rows, ways=2, overflow_rows=6, background=True)
    generator = torch.Generator().manual_seed(6)
    with pytest.raises(OSError, match="no space left"):  # at a later write, before it changes anything
        for _ in range(100):
            _step(buffer, logical, torch.randperm(100, generator=generator)[:2], generator)
    everything = torch.arange(100)
    assert _same(buffer, logical, everything)  # the failed batch's rows are still read from it
    with pytest.raises(OSError, match="no space left"):  # and at every change after it
        buffer.write("weight", torch.tensor([0]), torch.zeros(1, 4))
    with pytest.raises(OSError, match="no space left"):
        buffer.write_back_all()
    assert _same(buffer, logical, everything)
    for name in backing:
        assert torch.equal(backing[name], snapshot[name]), name
    buffer.discard()  # a rollback forgets the rows, the failed batch too
    failing = False
    assert _same(buffer, snapshot, everything)
    logical = {name: array.clone() for name, array in snapshot.items()}
    for _ in range(30):
        _step(buffer, logical, torch.randperm(100, generator=generator)[:2], generator)
    buffer.write_back_all()
    for name in logical:
        assert torch.equal(backing[name], logical[name]), name


@pytest.mark.parametrize("background", [False, True])
def test_disk_tables_write_back_in_the_background_and_train_as_device_tables(
    tmp_path, compressor, monkeypatch, background
):
    """Device and disk tables stay bit-identical over training steps whose displaced rows are written back on
    the write buffer's worker (and journaled there, after the checkpoint at step 4)."""
    monkeypatch.setattr(write_buffer, "OVERFLOW_SHARE", 2)  # an overflow list that a step's displaced rows fit
    threads: dict[str, list[str]] = {"write back": [], "journal": []}
    for owner, name, kind in ((WriteBuffer, "_write_back_rows", "write back"), (UndoJournal, "protect", "journal")):

        def recorded(*args, original=owner.__dict__[name], kind=kind) -> None:
            threads[kind].append(threading.current_thread().name)
            original(*args)

        monkeypatch.setattr(owner, name, recorded)
    device = _model(compressor, "device")
    options = dict(write_buffer_mb=0.2, background_write_back=background)  # 480 slots, a list of 485 rows
    disk = _same_weights(_model(compressor, "disk", tmp_path / "disk", **options), device)
    threads["write back"].clear()
    train, val = sonnets_tokens()
    config = dataclasses.replace(TRAIN, steps=10, eval_every=0, checkpoint_every=4)
    losses = {}
    for tier, model in {"device": device, "disk": disk}.items():
        seed_everything(1)
        losses[tier] = Trainer(model, config, train, val, out_dir=tmp_path / tier, progress=False).train()
    assert losses["disk"] == losses["device"]
    for kind, called in threads.items():
        in_background = [thread for thread in called if thread.startswith("engram-write-back")]
        assert in_background if background else called and not in_background, kind
    assert len(threads["write back"]) >= 2
    disk_table = disk.engram_tables()[0]
    device_table = device.engram_tables()[0]
    rows = torch.arange(device_table.num_rows)
    assert torch.equal(disk_table.read_rows(rows), device_table.read_rows(rows))
    for name in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(disk_table.row_states()[name], device_table.row_states()[name]), name
    disk_table.close()


def _small_buffered_table(directory) -> DiskTable:
    """A disk table of 2,000 rows of 4 floats with ``exp_avg`` and ``row_step`` state, a buffer of 160 rows."""
    slot_bytes = 16 + 4 * 4 + 4 * 4 + 8  # tag and stamp, weight, exp_avg, row_step
    table = DiskTable(directory, 2000, 4, init_std=1.0, seed=0, write_buffer_bytes=160 * slot_bytes)
    table.row_state("exp_avg", (4,))
    table.row_state("row_step", (), torch.int64)
    return table


def _update_rows(table: DiskTable, count: int, generator: torch.Generator) -> None:
    """``count`` optimizer-like updates of 10 random rows of a ``_small_buffered_table``."""
    for _ in range(count):
        rows = torch.randperm(2000, generator=generator)[:10]
        table.begin_update(rows)
        table.write_state("row_step", rows, table.read_state("row_step", rows) + 1)
        table.write_state("exp_avg", rows, torch.randn(10, 4, generator=generator))
        table.write_rows(rows, torch.randn(10, 4, generator=generator))


def _checkpointed_table(directory, seed: int) -> tuple[DiskTable, torch.Generator, dict[str, torch.Tensor]]:
    """A ``_small_buffered_table`` after 30 updates and checkpoint 1: the table, the generator of its updates,
    and its rows and state arrays at the checkpoint."""
    table = _small_buffered_table(directory)
    generator = torch.Generator().manual_seed(seed)
    _update_rows(table, 30, generator)
    table.prepare_checkpoint(1)
    table.commit_checkpoint(1)
    everything = torch.arange(table.num_rows)
    saved = {"weight": table.read_rows(everything), **{n: a.clone() for n, a in table.row_states().items()}}
    return table, generator, saved


def _assert_restores_the_checkpoint(directory, saved: dict[str, torch.Tensor]) -> None:
    """The table at ``directory``, changed in its files since checkpoint 1, returns to ``saved`` bit for bit."""
    reopened = DiskTable(directory)
    assert reopened.metadata["dirty"]
    reopened.restore_checkpoint(1)
    assert torch.equal(reopened.read_rows(torch.arange(reopened.num_rows)), saved["weight"])
    for name in ("exp_avg", "row_step"):
        assert torch.equal(reopened.row_states()[name], saved[name]), name
    reopened.close()


def test_a_failed_background_write_back_is_raised_at_close_which_still_closes_the_table(tmp_path, monkeypatch):
    """A write-back that fails on the worker (a full disk): ``close`` raises its error, and closes the files and
    stops the worker all the same; the table reopens, and restoring its checkpoint undoes what was written back."""
    monkeypatch.setattr(write_buffer, "OVERFLOW_SHARE", 2)  # 80 slots and an 80-row list
    table, generator, saved = _checkpointed_table(tmp_path / "t", seed=8)
    workers: list[threading.Thread] = []
    write_rows = TableFile.write_rows

    def failing(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        if threading.current_thread().name.startswith("engram-write-back"):
            workers.append(threading.current_thread())
            write_rows(self, rows[: rows.numel() // 2], values[: rows.numel() // 2])  # part of it reaches the file
            raise OSError("no space left on device")
        write_rows(self, rows, values)

    monkeypatch.setattr(TableFile, "write_rows", failing)
    with pytest.raises(OSError, match="no space left"):  # at the first change after the failed write-back
        for _ in range(200):
            _update_rows(table, 1, generator)
    assert workers
    with pytest.raises(OSError, match="no space left"):
        table.close()
    assert not workers[0].is_alive()
    with pytest.raises(TableFileError, match="is closed"):
        table.weight_file.read_rows(torch.arange(1))
    monkeypatch.undo()
    _assert_restores_the_checkpoint(tmp_path / "t", saved)  # the failed batch reached the files in part


def test_a_crash_after_background_write_backs_rolls_back_to_the_checkpoint(tmp_path, monkeypatch):
    """Rows written back on the worker after a checkpoint were journaled there first: after a crash (the
    table dropped unflushed, its buffered rows lost) the files roll back to the checkpoint, bit for bit."""
    monkeypatch.setattr(write_buffer, "OVERFLOW_SHARE", 2)  # 80 slots and an 80-row list
    threads: list[str] = []
    protect = UndoJournal.protect

    def recorded(self, rows: torch.Tensor) -> None:
        threads.append(threading.current_thread().name)
        protect(self, rows)

    monkeypatch.setattr(UndoJournal, "protect", recorded)
    table, generator, saved = _checkpointed_table(tmp_path / "t", seed=7)
    _update_rows(table, 60, generator)
    assert table.buffer().buffered_rows > 0  # rows the crash loses
    assert sum(thread.startswith("engram-write-back") for thread in threads) >= 3  # journaled on the worker
    table.buffer().wait()  # a crash after the write-back in flight (a test's crash does not stop the worker)
    del table
    _assert_restores_the_checkpoint(tmp_path / "t", saved)
