"""Reading a later batch's rows ahead: disk tables bring its file pages into the page cache, nothing else changes."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time

import pytest
import torch

from engram.eval import evaluate
from engram.model import EngramLM
from engram.storage import DiskTable
from engram.storage import table_file as table_file_module
from engram.storage.prefetch import run_after_fetches, wait_for_background
from engram.storage.table_file import TableFile
from engram.training import Trainer, seed_everything
from tests.corpus import sonnets_tokens
from tests.test_tiers import _model, _same_weights
from tests.test_training import TRAIN

WAIT_S = 20.0  # generous: the kernel reads a few hundred pages in milliseconds


def resident(table_file: TableFile, rows: list[int]) -> list[bool]:
    """Whether the page holding the start of each row's record is in the page cache (``mincore``, which reads
    nothing: a probe by reading, even non-blocking, may start reading the page it asks about)."""
    return table_file.pages_cached(torch.tensor(rows, dtype=torch.long))


def evicted_table(tmp_path, **options) -> DiskTable:
    """A 400,000-row disk table whose files are out of the page cache (skips where that cannot be arranged)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux (mincore on a file mapping, posix_fadvise) to see the page cache")
    table = DiskTable(tmp_path / "table", 400_000, 16, init_std=0.5, seed=1, **options)
    table.weight_file.evict_page_cache()
    sample = list(range(0, 400_000, 4_001))
    if sum(resident(table.weight_file, sample)) > len(sample) // 10:
        pytest.skip(f"{tmp_path} keeps its pages cached (a RAM filesystem?): set TMPDIR to a folder on a disk")
    return table


def test_read_ahead_brings_exactly_the_rows_pages_into_the_page_cache(tmp_path):
    table = evicted_table(tmp_path)
    generator = torch.Generator().manual_seed(0)
    wanted = torch.randint(0, 200_000, (600,), generator=generator)  # first half of the file, with repeats
    others = torch.randint(200_000, 400_000, (300,), generator=generator).tolist()  # pages far from them
    distinct = torch.unique(wanted).tolist()
    assert sum(resident(table.weight_file, distinct)) < len(distinct) // 10
    assert table.read_ahead(wanted.view(20, 30)).result(timeout=WAIT_S) is True
    deadline = time.monotonic() + WAIT_S
    while not all(resident(table.weight_file, distinct)) and time.monotonic() < deadline:
        time.sleep(0.01)  # the advice only queues the reads
    assert all(resident(table.weight_file, distinct))
    assert sum(resident(table.weight_file, others)) < len(others) // 10  # only the rows asked for
    assert torch.equal(table.read_rows(wanted), table.weight_file.tensor[wanted])
    table.close()


def test_read_ahead_leaves_out_rows_in_the_write_buffer_and_the_row_cache(tmp_path, monkeypatch):
    table = DiskTable(tmp_path / "table", 50_000, 16, seed=2, cache_bytes=200 * 64, write_buffer_bytes=1 << 20)
    advised: list[torch.Tensor] = []
    will_need = TableFile.will_need

    def recorded(self, rows, **options):
        if self.path.name == "weight.table":
            advised.append(rows.clone())
        return will_need(self, rows, **options)

    monkeypatch.setattr(TableFile, "will_need", recorded)
    buffered, cached, plain = torch.arange(0, 300), torch.arange(10_000, 10_100), torch.arange(20_000, 20_500)
    table.eval()
    table.scatter(buffered, torch.ones(300, 16))  # the optimizer's write: into the write-back buffer
    table.fetch(cached)  # admitted to the hot-row cache
    table.weight_file.evict_page_cache()  # else the probe finds the pages cached and nothing is advised
    advised.clear()
    assert table.cache.holds(cached).all() and table.buffer().resident(buffered).all()
    assert table.read_ahead(torch.cat([plain, cached, buffered]).flip(0)).result(timeout=WAIT_S) is True
    assert len(advised) == 1 and torch.equal(advised[0], plain)  # sorted, distinct, neither buffered nor cached
    assert table.read_ahead(buffered).result(timeout=WAIT_S) is False  # nothing left to read
    few = torch.arange(30_000, 30_000 + table_file_module.ADVISE_MIN_ROWS - 1)
    assert table.read_ahead(few).result(timeout=WAIT_S) is False  # a few page faults cost less
    assert len(advised) == 1
    table.read_ahead_enabled = False
    assert table.read_ahead(plain) is None
    table.close()


def test_a_training_table_also_reads_its_optimizer_state_ahead(tmp_path, monkeypatch):
    table = DiskTable(tmp_path / "table", 50_000, 16, seed=2)
    table.row_state("exp_avg", (16,))
    # written, so that its pages are data: a fresh state file is holes, which probe as cached
    table.write_state("exp_avg", torch.arange(50_000), torch.ones(50_000, 16))
    advised: dict[str, int] = {}
    will_need = TableFile.will_need

    def recorded(self, rows, **options):
        advised[self.path.name] = advised.get(self.path.name, 0) + 1
        return will_need(self, rows, **options)

    monkeypatch.setattr(TableFile, "will_need", recorded)
    rows = torch.arange(0, 50_000, 50)
    for table_file in (table.weight_file, *table._state_files.values()):
        table_file.evict_page_cache()
    table.eval()
    table.read_ahead(rows).result(timeout=WAIT_S)
    assert advised == {"weight.table": 1}
    table.train()
    table.weight_file.evict_page_cache()
    table.read_ahead(rows).result(timeout=WAIT_S)
    assert advised == {"weight.table": 2, "exp_avg.table": 1}
    if table.weight_file._probe_residency:  # everything cached now: a probe, no advice
        files = (table.weight_file, *table._state_files.values())
        deadline = time.monotonic() + WAIT_S
        while not all(f.looks_cached(rows) for f in files) and time.monotonic() < deadline:
            time.sleep(0.01)  # the advised reads are still on their way
        assert table.read_ahead(rows).result(timeout=WAIT_S) is False and len(advised) == 2
    table.close()


def test_training_and_evaluation_read_the_next_batch_ahead_and_change_nothing(compressor, tmp_path, monkeypatch):
    """Three steps and an evaluation with read-ahead on and off: the same losses, rows, state and weights."""
    announced: list[torch.Tensor] = []
    read_ahead = EngramLM.read_ahead

    def recorded(self, input_ids, check_ids=True):
        tasks = read_ahead(self, input_ids, check_ids)
        if self.reads_ahead():
            announced.append(input_ids.clone())
            assert tasks  # a sonnet batch needs pages of hundreds of rows
        return tasks

    monkeypatch.setattr(EngramLM, "read_ahead", recorded)
    train, val = sonnets_tokens()
    config = dataclasses.replace(TRAIN, steps=3, eval_every=0, checkpoint_every=0)
    reference = _model(compressor, "device")
    results = {}
    for on in (True, False):
        model = _same_weights(_model(compressor, "disk", tmp_path / f"ahead-{on}", read_ahead=on), reference)
        seed_everything(1)
        trainer = Trainer(model, config, train, val, progress=False)
        losses = trainer.train()
        if on:  # step i announced batch i + 1
            assert len(announced) == 3
            for step, ids in enumerate(announced):
                assert torch.equal(ids, trainer.batches.batch(step + 1)[0])
            announced.clear()
        result = evaluate(model, val, batch_size=2, seq_len=32, max_batches=4)
        if on:  # each batch announced the next, the last none
            assert [ids.shape for ids in announced] == [(2, 32)] * 3
            assert torch.equal(announced[0].flatten(), torch.from_numpy(val[64:128]).long())
            announced.clear()
        else:
            assert announced == []
        table = model.engram_tables()[0]
        rows = torch.arange(table.num_rows)
        results[on] = (losses, result, table.read_rows(rows), table.row_states(), model.state_dict())
        wait_for_background()
    (losses_on, eval_on, rows_on, state_on, dense_on), (losses_off, eval_off, rows_off, state_off, dense_off) = (
        results[True],
        results[False],
    )
    assert losses_on == losses_off and eval_on == eval_off
    assert torch.equal(rows_on, rows_off)
    assert all(torch.equal(state_on[name], state_off[name]) for name in state_off)
    assert all(torch.equal(dense_on[key], dense_off[key]) for key in dense_off)


def test_read_ahead_refusals_and_tiers_without_it(compressor, tmp_path):
    disk = _model(compressor, "disk", tmp_path / "disk")
    ids = torch.randint(0, 1000, (2, 16))
    with pytest.raises(ValueError, match="read_ahead"):
        disk(ids, read_ahead=torch.full((2, 16), 5000))  # out of the vocabulary: refused before any compute
    with pytest.raises(ValueError, match="read_ahead"):
        disk(ids, read_ahead=torch.zeros(16, dtype=torch.long))  # not (B, T)
    with torch.no_grad(), pytest.raises(ValueError, match="decoding"):
        disk(ids[:, :1], state=disk.new_state(2, 8), read_ahead=ids)
    assert disk.reads_ahead() and disk.read_ahead(ids)
    for tier in ("device", "host"):
        model = _model(compressor, tier)
        model.indexer = None  # nothing to read ahead: the batch is not even hashed
        assert not model.reads_ahead() and model.read_ahead(ids) == []


def test_wait_for_background_waits_for_every_queue_and_close_for_its_own(tmp_path):
    finished: list[str] = []
    gate = threading.Event()

    def task(name: str) -> None:
        gate.wait(WAIT_S)
        finished.append(name)

    first, second = run_after_fetches("a", lambda: task("a1")), run_after_fetches("b", lambda: task("b"))
    third = run_after_fetches("a", lambda: task("a2"))  # after a1
    threading.Timer(0.2, gate.set).start()
    wait_for_background()
    assert first.done() and second.done() and third.done()
    assert finished.index("a1") < finished.index("a2")

    table = DiskTable(tmp_path / "table", 50_000, 16, seed=0)
    started = threading.Event()
    release = threading.Event()
    run_after_fetches(table, lambda: (started.set(), release.wait(WAIT_S)))  # the table's queue is busy
    pending = table.read_ahead(torch.arange(0, 50_000, 100))
    assert started.wait(WAIT_S) and not pending.done()
    threading.Timer(0.2, release.set).start()
    table.close()  # waits for the read-ahead before closing the files it advises
    assert pending.done() and pending.exception() is None
