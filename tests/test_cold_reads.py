"""Cold reads of disk tables issued together, and prefetches of different tables running at once."""

from __future__ import annotations

import resource
import threading
import time

import numpy as np
import pytest
import torch

from engram.storage import DiskTable, HostTable
from engram.storage import table_file as table_file_module
from engram.storage.prefetch import PendingRows, run_after_fetches, wait_for_background
from engram.storage.table_file import DATA_OFFSET, RowChecksumError, TableFile, page_runs

WAIT_S = 20.0  # generous: a timeout here means a fetch never started, not that the machine was slow


def runs_by_loop(rows: list[int], record_bytes: int, page_bytes: int) -> list[tuple[int, int]]:
    """``page_runs`` written out: every page of every record, then runs of consecutive pages."""
    pages = set()
    for row in rows:
        start = DATA_OFFSET + row * record_bytes
        pages.update(range(start // page_bytes, (start + record_bytes - 1) // page_bytes + 1))
    runs: list[list[int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return [(first, count) for first, count in runs]


@pytest.mark.parametrize("record_bytes", [16, 68, 260, 4096, 5000, 9000])
def test_page_runs_match_a_plain_loop(record_bytes):
    generator = np.random.default_rng(record_bytes)
    for num_rows, count in [(50, 1), (50, 40), (10_000, 300), (1_000_000, 2_000)]:
        rows = generator.integers(0, num_rows, count)  # unsorted, with repeats
        first, pages = page_runs(torch.from_numpy(rows), record_bytes, page_bytes=4096)
        found = list(zip(first.tolist(), pages.tolist(), strict=True))
        assert found == runs_by_loop(rows.tolist(), record_bytes, 4096)
    empty = page_runs(torch.zeros(0, dtype=torch.long), record_bytes)
    assert empty[0].size == 0 and empty[1].size == 0


@pytest.fixture
def table_file(tmp_path):
    with TableFile.create(tmp_path / "weight.table", 200_000, 16, init_std=0.5, seed=3) as table:
        yield table


def test_rows_read_with_and_without_advice_are_identical(table_file, monkeypatch):
    rows = torch.unique(torch.randint(0, table_file.num_rows, (5_000,), generator=torch.Generator().manual_seed(0)))
    advised = []
    will_need = TableFile.will_need

    def recorded(self, r, **kw):
        advised.append(will_need(self, r, **kw))
        return advised[-1]

    monkeypatch.setattr(TableFile, "will_need", recorded)
    monkeypatch.setattr(table_file_module, "ADVISE_MIN_ROWS", 10**9)  # never advised
    table_file.evict_page_cache()
    plain = table_file.read_rows(rows)
    assert advised == []
    monkeypatch.setattr(table_file_module, "ADVISE_MIN_ROWS", 1)
    table_file.evict_page_cache()
    with_advice = table_file.read_rows(rows)
    out = torch.empty_like(plain)
    table_file.read_rows(rows, out=out)  # resident now: the probe finds it so, where it can probe
    assert len(advised) == 2
    if table_file._probe_residency:
        assert advised[1] is False
        table_file.evict_page_cache()
        assert table_file.will_need(rows) is True  # dropped again: the probe finds pages missing
    assert torch.equal(plain.view(torch.int32), with_advice.view(torch.int32))  # bit for bit
    assert torch.equal(out.view(torch.int32), plain.view(torch.int32))
    assert torch.equal(plain, table_file.tensor[rows])
    assert table_file.will_need(rows, check_resident=False) is True  # advice issued regardless


def test_advised_reads_still_check_every_row(table_file, monkeypatch):
    rows = torch.arange(0, 200_000, 997)
    table_file.write_rows(rows[5:6], torch.ones(1, 16))
    table_file.tensor[rows[7]] += 1.0  # changed behind the checksum's back
    table_file.flush()
    table_file.evict_page_cache()
    monkeypatch.setattr(table_file_module, "ADVISE_MIN_ROWS", 1)
    with pytest.raises(RowChecksumError) as error:
        table_file.read_rows(rows)
    assert error.value.rows == [int(rows[7])]


def _major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def test_pages_never_written_count_as_missing_and_advice_fills_them_in(tmp_path):
    """A fresh optimizer-state file is sparse: its pages are holes, zeros that no disk holds. The probe must find
    them missing, so that the advice fills them in ahead; a probe that reads a page to ask (a non-blocking read
    of a hole succeeds) would call them cached and leave every first touch to fault on its own."""
    with TableFile.create(tmp_path / "state.table", 200_000, 16) as state:
        if not state._probe_residency:
            pytest.skip("no residency probe on this platform")
        rows = torch.arange(0, 200_000, 600)  # about one row in every tenth page of the file
        control, advised = rows[0::2], rows[1::2]
        state.evict_page_cache()
        assert not state.looks_cached(control)
        assert not state.looks_cached(advised)
        before = _major_faults()
        assert torch.count_nonzero(state.tensor[control]) == 0  # gathered through the mapping, no advice
        control_faults = _major_faults() - before
        assert state.looks_cached(control)  # read now: pages of zeros in the page cache
        if control_faults < len(control) // 2:
            pytest.skip(f"first touches of holes took {control_faults} major faults here (a RAM filesystem?)")
        assert state.will_need(advised) is True
        deadline = time.monotonic() + WAIT_S
        while not state.looks_cached(advised) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.looks_cached(advised)
        before = _major_faults()
        assert torch.count_nonzero(state.tensor[advised]) == 0
        assert _major_faults() - before < len(advised) // 10  # the advice took the faults ahead


class GatedTable(HostTable):
    """A host table whose fetch first reports that it started, then waits for a gate to open."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.gate = threading.Event()
        self.log: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def fetch(self, indices):
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.log.append(("start", int(indices.reshape(-1)[0])))
        self.started.set()
        try:
            if not self.gate.wait(WAIT_S):
                raise TimeoutError("the gate of this fetch never opened")
            return super().fetch(indices)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.log.append(("end", int(indices.reshape(-1)[0])))


def test_fetches_of_different_tables_are_in_flight_at_once():
    first, second = GatedTable(100, 4, seed=1), GatedTable(100, 4, seed=2)
    first_pending = first.prefetch(torch.tensor([[1, 2]]))
    assert first.started.wait(WAIT_S)
    # the first table's fetch holds its thread until the second table's fetch has started
    second_pending = second.prefetch(torch.tensor([[3, 4]]))
    assert second.started.wait(WAIT_S), "a fetch of another table waited for the first table's fetch"
    first.gate.set()
    second.gate.set()
    assert torch.equal(first_pending.result(torch.tensor([[1, 2]])).values, first.weight[[1, 2]])
    assert torch.equal(second_pending.result(torch.tensor([[3, 4]])).values, second.weight[[3, 4]])


def test_fetches_of_one_table_run_one_at_a_time_in_order():
    table = GatedTable(100, 4, seed=1)
    pending = [table.prefetch(torch.tensor([[k, k + 1]])) for k in range(6)]
    assert table.started.wait(WAIT_S)
    table.gate.set()
    for k, rows in enumerate(pending):
        assert torch.equal(rows.result(torch.tensor([[k, k + 1]])).values, table.weight[[k, k + 1]])
    assert table.most_in_flight == 1
    assert table.log == [(event, k) for k in range(6) for event in ("start", "end")]


def test_queues_given_explicitly_keep_their_order_across_tables():
    """Callers that need one order over several tables (as collectives do) give them one queue."""
    order: list[int] = []
    tables = [HostTable(10, 2, seed=k) for k in range(4)]

    def fetch_of(k: int):
        def fetch(indices):
            order.append(k)
            return tables[k].fetch(indices)

        return fetch

    pending = [PendingRows(torch.tensor([k]), fetch_of(k), queue="shared") for k in range(4)]
    for k, rows in enumerate(pending):
        rows.result(torch.tensor([k]))
    assert order == [0, 1, 2, 3]


def test_waiting_for_a_queue_waits_for_the_tasks_its_tasks_queue_too():
    key, started, gate, done = object(), threading.Event(), threading.Event(), []

    def inner():
        if not gate.wait(WAIT_S):
            raise TimeoutError("the gate of the inner task never opened")
        done.append("inner")

    def outer():
        started.set()
        time.sleep(0.2)  # still running when the wait below begins
        run_after_fetches(key, inner)  # as a disk table's fetch queues its state advice
        done.append("outer")

    run_after_fetches(key, outer)
    assert started.wait(WAIT_S)
    opener = threading.Timer(0.5, gate.set)
    opener.start()
    wait_for_background(key)
    assert done == ["outer", "inner"]
    opener.join()


def test_a_training_table_advises_its_optimizer_state_pages_after_the_fetch(tmp_path, monkeypatch):
    """The state advice is a task behind the fetch: the rows are served while it waits, and closing the
    table waits for it."""
    table = DiskTable(tmp_path / "t", 50_000, 8, init_std=0.1, seed=0, write_buffer_bytes=1 << 20)
    table.row_state("exp_avg", (8,), torch.float32)
    table.row_state("row_step", (), torch.int64)
    rows = torch.arange(0, 50_000, 250)
    table.write_state("exp_avg", rows[:10], torch.ones(10, 8))  # buffered: not read from the files later
    advised: list[tuple[str, list[int]]] = []
    gate = threading.Event()
    will_need = TableFile.will_need

    def recorded(self, r, **kw):
        if self.path.name != "weight.table" and not gate.wait(WAIT_S):
            raise TimeoutError("the gate of the state advice never opened")
        advised.append((self.path.name, r.tolist()))
        return will_need(self, r, **kw)

    monkeypatch.setattr(TableFile, "will_need", recorded)
    table.eval()
    table.fetch(rows)
    wait_for_background(table)
    assert [name for name, _ in advised] == ["weight.table"]  # inference: the optimizer state is not needed
    advised.clear()
    table.train()
    fetched = table.prefetch(rows).result(rows)  # served while the state advice waits behind the fetch
    assert torch.equal(fetched.values, table.read_rows(rows))
    assert all(name == "weight.table" for name, _ in advised)  # no state file yet
    log: list[str] = []
    closing = threading.Thread(target=lambda: (table.close(), log.append("closed")))
    closing.start()
    time.sleep(0.3)
    log.append("gate opened")
    gate.set()
    closing.join(WAIT_S)
    assert log == ["gate opened", "closed"]  # close waited for the advice
    state = {name: r for name, r in advised if name != "weight.table"}
    assert state == {"exp_avg.table": rows[10:].tolist(), "row_step.table": rows[10:].tolist()}
