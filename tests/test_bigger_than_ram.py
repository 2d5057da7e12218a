"""A disk table larger than this machine's RAM, trained and read back with bounded resident memory (slow).

Run on demand, ``-s`` shows the report of each phase::

    pytest -m slow -s tests/test_bigger_than_ram.py

An Engram model's table in the disk tier (``StorageConfig(tier="disk")``), sized to 1.1 x MemTotal
+ 1 GiB and randomly initialised (every page is real data on the disk), is trained with row-wise
Adagrad with the undo journal on, checkpointed twice, closed, reopened and read back whole (each
lookup also checks every row against its stored checksum). A background thread samples the
process's resident memory throughout. What the table returns is
checked against sources outside the engram package: row bytes read with ``os.pread`` at the
documented file offsets, CRC-32s of the whole file taken before training, and a float64 replay of
the Adagrad rule from each row's value before its first update. docs/bigger-than-ram.md explains
the numbers and records a run.

``ENGRAM_BIG_TABLE_DIR`` chooses the folder the table goes in (default: pytest's tmp_path); it must
be on a disk, not a RAM file system, with room for the table. Everything written is deleted at the end.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.eval import token_byte_lengths
from engram.memory.layer import Engram
from engram.model import EngramLM
from engram.storage import DiskTable, StorageConfig, place_tables
from engram.training import RowAdagrad, TrainConfig, Trainer, seed_everything
from tests.corpus import sonnets_tokenizer, sonnets_tokens
from tests.test_training import MODEL

pytestmark = pytest.mark.slow

GiB = 1 << 30
DATA_OFFSET = 8192  # a table file: two 4 KiB header slots, then one record per row: the row (little-endian)
CHECKSUM_BYTES = 4  # followed by its 4-byte checksum (float32 rows: no padding)
LAYER = 1
STEPS = 60  # a checkpoint after STEPS // 2 and after STEPS
BATCH, SEQ = 8, 64
CHUNK_BYTES = 64 << 20  # whole-table reads go this many bytes at a time
SAMPLE_ROWS = 4096  # rows drawn over the whole table before training, checked after it
CHECK_ROWS = 1 << 16  # touched rows are checked this many at a time
RSS_ANON_LIMIT = 2 * GiB
RAM_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


def engram_config(table_bytes: int) -> EngramConfig:
    """DeepSeek's demo layout (2..3-grams, 8 heads per order, 64 floats per head), per-order base
    sizes raised so that the table of layer ``LAYER`` holds at least ``table_bytes`` of float32."""
    base = EngramConfig(layer_ids=[LAYER], max_ngram_size=3, n_head_per_ngram=8, n_embed_per_ngram=512, pad_id=0)
    row_bytes = base.head_dim * 4
    per_head = math.ceil(table_bytes / row_bytes / base.n_heads)
    return dataclasses.replace(base, engram_vocab_size=[per_head] * (base.max_ngram_size - 1), table_init_std=0.02)


# -- what the kernel says about this process -----------------------------------------------------------------
def _proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields ``key: <n> kB`` of a /proc file, in bytes."""
    found = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0]) * 1024
    return found


def _status() -> dict[str, int]:
    return _proc_kib("/proc/self/status", ("RssAnon", "RssFile", "RssShmem", "VmHWM"))


def _meminfo(key: str) -> int:
    return _proc_kib("/proc/meminfo", (key,))[key]


def _io() -> dict[str, int]:
    """Bytes this process made the storage read and write (/proc/self/io; page-cache hits do not count)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {"read": int(fields["read_bytes"]), "write": int(fields["write_bytes"])}


def _major_faults() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[9])  # field 12, majflt


def _oom_kills() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def _mount(path: Path) -> tuple[str, str]:
    """(source, file system type) of the mount that holds ``path``."""
    path = os.path.realpath(path)
    best, found = "", ("?", "?")
    with open("/proc/self/mounts") as f:
        for line in f:
            source, mount, kind = line.split()[:3]
            mount = mount.replace("\\040", " ")
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, found = mount, (source, kind)
    return found


def _device_written(path: Path) -> int | None:
    """Bytes written so far to the block device that holds ``path`` (all processes), if it can be found."""
    stat = Path("/sys/class/block") / Path(os.path.realpath(_mount(path)[0])).name / "stat"
    return int(stat.read_text().split()[6]) * 512 if stat.exists() else None


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


class MemoryWatch:
    """Samples this process's RssAnon and RssFile (and the system's MemAvailable) every few ms in a
    background thread, and keeps per-phase peaks, times and I/O."""

    def __init__(self, journal: Path, interval: float = 0.02):
        self.journal = journal  # its size is sampled too; the device written to is the one holding it
        self.interval = interval
        self.phases: list[dict] = []
        self.overall = {"RssAnon": 0, "RssFile": 0, "RSS": 0, "MemAvailable": math.inf, "journal": 0}
        self._current: dict | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        status = _status()
        sample = {
            "RssAnon": status["RssAnon"],
            "RssFile": status["RssFile"],
            "RSS": status["RssAnon"] + status["RssFile"] + status["RssShmem"],
            "MemAvailable": _meminfo("MemAvailable"),
            "journal": self.journal.stat().st_size if self.journal.exists() else 0,
        }
        with self._lock:
            for peaks in (self.overall, self._current):
                if peaks is None:
                    continue
                for key, value in sample.items():
                    peaks[key] = min(peaks[key], value) if key == "MemAvailable" else max(peaks[key], value)

    @contextmanager
    def phase(self, name: str):
        io, faults, start = _io(), _major_faults(), time.perf_counter()
        device = _device_written(self.journal.parent.parent)
        with self._lock:
            self._current = {"RssAnon": 0, "RssFile": 0, "RSS": 0, "MemAvailable": math.inf, "journal": 0}
        self.sample()
        try:
            yield
        finally:
            self.sample()
            end_io, end_device = _io(), _device_written(self.journal.parent.parent)
            with self._lock:
                peaks, self._current = self._current, None
            self.phases.append(
                {
                    "phase": name,
                    "seconds": time.perf_counter() - start,
                    **peaks,
                    "disk read": end_io["read"] - io["read"],
                    "dirtied": end_io["write"] - io["write"],
                    "device written": None if device is None else end_device - device,
                    "major faults": _major_faults() - faults,
                }
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        head = f"{'phase':<34}{'time':>9}{'RssAnon':>12}{'RssFile':>12}{'MemAvail':>12}{'read':>11}{'dirtied':>11}"
        head += f"{'dev.write':>11}"
        lines = [head + f"{'maj.faults':>12}"]
        for p in self.phases:
            lines.append(
                f"{p['phase']:<34}{p['seconds']:>8.1f}s{_gb(p['RssAnon']):>12}{_gb(p['RssFile']):>12}"
                f"{_gb(p['MemAvailable']):>12}{_gb(p['disk read']):>11}{_gb(p['dirtied']):>11}"
                f"{'?' if p['device written'] is None else _gb(p['device written']):>11}"
                f"{p['major faults']:>12,}"
            )
        o = self.overall
        lines.append(
            f"peaks over the run: RssAnon {_gb(o['RssAnon'])}, RssFile {_gb(o['RssFile'])}, RSS {_gb(o['RSS'])} "
            f"(VmHWM {_gb(_status()['VmHWM'])}), lowest MemAvailable {_gb(o['MemAvailable'])}, "
            f"largest journal {o['journal'] / 2**20:.1f} MiB"
        )
        return "\n".join(lines)


# -- independent views of the table -------------------------------------------------------------------------
def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    assert len(data) == size, f"short read at byte {offset}"
    return data


def record_offset(row: int, row_bytes: int) -> int:
    """Where the record of ``row`` (float32 rows of ``row_bytes``, then the row's checksum) starts in its file."""
    return DATA_OFFSET + row * (row_bytes + CHECKSUM_BYTES)


def pread_rows(fd: int, rows: torch.Tensor, row_bytes: int, dtype=np.float32) -> torch.Tensor:
    """Rows of a table file, read with plain os.pread from the start of each row's record."""
    data = b"".join(_pread_exact(fd, row_bytes, record_offset(row, row_bytes)) for row in rows.tolist())
    values = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(rows.numel(), -1)
    return torch.from_numpy(values.copy())


def file_crcs(fd: int, num_rows: int, row_bytes: int) -> list[int]:
    """CRC-32 of every CHUNK_BYTES of row records (rows and checksums) of a table file, read with os.pread."""
    record = row_bytes + CHECKSUM_BYTES
    chunk = CHUNK_BYTES // record
    return [
        zlib.crc32(_pread_exact(fd, (min(num_rows, s + chunk) - s) * record, record_offset(s, row_bytes)))
        for s in range(0, num_rows, chunk)
    ]


class AdagradRecorder:
    """Wraps ``RowAdagrad._update``: before each update of the table, records the rows, their summed
    gradient, lr and eps, and the records (values and checksum) of rows updated for the first time, read
    from the weight file with os.pread (not through the table). Recordings go to files, not memory."""

    def __init__(self, weight_fd: int, dim: int, directory: Path):
        directory.mkdir()
        self.fd, self.dim, self.row_bytes = weight_fd, dim, dim * 4
        self._firsts_path, self._updates_path = directory / "first_values.bin", directory / "updates.bin"
        self._firsts = open(self._firsts_path, "wb")  # noqa: SIM115  (closed in replay)
        self._updates = open(self._updates_path, "wb")  # noqa: SIM115
        self.first_rows: list[torch.Tensor] = []  # ids, in first-update order
        self.updates: list[tuple[int, float, float]] = []  # (rows, lr, eps) of each update
        self.times: list[float] = []
        self.seen = torch.empty(0, dtype=torch.int64)
        self.since_checkpoint = (0, 0)  # (updates, distinct rows) since the last checkpoint
        self._interval_rows = torch.empty(0, dtype=torch.int64)

    def wrap(self, update):
        def recording_update(optimizer, table, rows, grad):
            self.record(rows, grad, optimizer.param_groups[0])
            return update(optimizer, table, rows, grad)

        return recording_update

    def record(self, rows: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        rows, grad = rows.cpu(), grad.cpu().float().contiguous()
        new = rows[~torch.isin(rows, self.seen)]
        for row in new.tolist():
            record = self.row_bytes + CHECKSUM_BYTES
            self._firsts.write(_pread_exact(self.fd, record, record_offset(row, self.row_bytes)))
        self.first_rows.append(new)
        self.seen = torch.cat([self.seen, new])
        self._updates.write(rows.numpy().tobytes())
        self._updates.write(grad.numpy().tobytes())
        self.updates.append((rows.numel(), float(group["lr"]), float(group["eps"])))
        self.times.append(time.perf_counter())
        self._interval_rows = torch.cat([self._interval_rows, rows]).unique()
        self.since_checkpoint = (self.since_checkpoint[0] + 1, self._interval_rows.numel())

    def checkpointed(self) -> None:
        self.since_checkpoint, self._interval_rows = (0, 0), torch.empty(0, dtype=torch.int64)

    def replay(self) -> dict[str, torch.Tensor]:
        """The touched rows (sorted), their first values (float32) and records (bytes) and, replayed in
        float64 with s_r += mean(g_r^2); p_r -= lr g_r / (sqrt(s_r) + eps), their values and sum_sq now."""
        self._firsts.close()
        self._updates.close()
        first_rows = torch.cat(self.first_rows)
        records = np.fromfile(self._firsts_path, dtype=np.uint8).reshape(-1, self.row_bytes + CHECKSUM_BYTES)
        order = first_rows.argsort()
        touched, records = first_rows[order], records[order.numpy()]
        initial = torch.from_numpy(records[:, : self.row_bytes].copy().view("<f4"))
        values, sum_sq = initial.double(), torch.zeros(touched.numel(), dtype=torch.float64)
        with open(self._updates_path, "rb") as f:
            for n, lr, eps in self.updates:
                rows = torch.frombuffer(bytearray(f.read(8 * n)), dtype=torch.int64)
                grad = torch.frombuffer(bytearray(f.read(n * self.row_bytes)), dtype=torch.float32).view(n, -1)
                grad = grad.double()
                idx = torch.searchsorted(touched, rows)
                sum_sq[idx] += grad.square().mean(dim=1)
                values[idx] -= lr * grad / (sum_sq[idx].sqrt() + eps).unsqueeze(1)
        return {"rows": touched, "initial": initial, "records": records, "values": values, "sum_sq": sum_sq}


def check_rows(table: DiskTable, weight_fd: int, state_fd: int, expected: dict, sample: dict) -> None:
    """Touched rows: the table, the file and the float64 replay agree; sampled untouched rows: unchanged.

    In slices of CHECK_ROWS rows, so that the check's own memory stays small next to the table's."""
    row_bytes, sum_sq_state, moved = table.dim * 4, table.row_states()["sum_sq"], 0
    for start in range(0, expected["rows"].numel(), CHECK_ROWS):
        part = {key: value[start : start + CHECK_ROWS] for key, value in expected.items()}
        rows = part["rows"]
        got = table.read_rows(rows)
        assert torch.equal(got, pread_rows(weight_fd, rows, row_bytes)), "the table and its file disagree"
        torch.testing.assert_close(got.double(), part["values"], rtol=1e-4, atol=2e-6)
        moved += int(((part["values"] - part["initial"].double()).abs().amax(dim=1) > 1e-4).sum())
        sum_sq = sum_sq_state[rows]
        assert torch.equal(sum_sq, pread_rows(state_fd, rows, 4).squeeze(1)), "sum_sq and its file disagree"
        torch.testing.assert_close(sum_sq.double(), part["sum_sq"], rtol=1e-4, atol=1e-12)
    assert moved > 0.99 * expected["rows"].numel(), "the training steps did not move the rows they touched"

    untouched = ~torch.isin(sample["rows"], expected["rows"])
    assert untouched.sum() > 0.9 * sample["rows"].numel()  # a tiny fraction of the table is ever touched
    quiet = sample["rows"][untouched]
    assert torch.equal(table.read_rows(quiet), sample["initial"][untouched])
    assert torch.equal(pread_rows(weight_fd, quiet, row_bytes), sample["initial"][untouched])
    assert not sum_sq_state[quiet].any()


def read_whole_table(table: DiskTable, weight_fd: int, state_fd: int, crcs: list[int], expected: dict) -> None:
    """Every row, looked up through the table as a model would: equal to the file's bytes, and
    the file equal to its pre-training CRCs once the touched rows get their first records back."""
    row_bytes = table.dim * 4
    record = row_bytes + CHECKSUM_BYTES
    chunk = CHUNK_BYTES // record
    touched = expected["rows"].tolist()
    initial = expected["records"]
    table.eval()
    k = 0
    with torch.no_grad():
        for i, start in enumerate(range(0, table.num_rows, chunk)):
            stop = min(table.num_rows, start + chunk)
            # pread first: its read-ahead brings the chunk in with large reads; the table's mapping is
            # MADV_RANDOM (no read-ahead), so faulting it in first would read the chunk 4 KiB at a time
            data = _pread_exact(weight_fd, (stop - start) * record, record_offset(start, row_bytes))
            values = table(torch.arange(start, stop))  # the lookup path of a forward pass
            from_file = torch.frombuffer(bytearray(data), dtype=torch.float32).view(stop - start, -1)[:, : table.dim]
            assert torch.equal(values, from_file), f"rows {start}..{stop}: the table and its file disagree"
            crc, pos, view = 0, 0, memoryview(data)
            while k < len(touched) and touched[k] < stop:  # touched rows: their values before training
                at = (touched[k] - start) * record
                crc = zlib.crc32(initial[k], zlib.crc32(view[pos:at], crc))
                pos, k = at + record, k + 1
            assert zlib.crc32(view[pos:], crc) == crcs[i], f"rows {start}..{stop} changed outside the trained rows"
    assert k == len(touched)
    # sum_sq: nonzero exactly where training put a nonzero gradient (records of one float32 and a checksum)
    state_chunk = CHUNK_BYTES // 8
    nonzero = []
    for start in range(0, table.num_rows, state_chunk):
        n = min(table.num_rows, start + state_chunk) - start
        records = np.frombuffer(_pread_exact(state_fd, 8 * n, record_offset(start, 4)), dtype="<f4").reshape(n, 2)
        found = np.flatnonzero(records[:, 0])
        nonzero.append(torch.from_numpy(found + start))
    assert torch.equal(torch.cat(nonzero), expected["rows"][expected["sum_sq"] > 0])


# -- the run --------------------------------------------------------------------------------------------------
def disk_needed(num_rows: int, dim: int, n_heads: int) -> int:
    """Bytes the run writes: weight, Adagrad's sum_sq, journal (bound), recordings (bound), margin."""
    rows_per_step = BATCH * SEQ * n_heads
    weight = DATA_OFFSET + num_rows * (dim * 4 + CHECKSUM_BYTES)
    sum_sq = DATA_OFFSET + num_rows * (4 + CHECKSUM_BYTES)
    journal = (STEPS // 2) * rows_per_step * (dim * 4 + 4 + 8 + 2 * CHECKSUM_BYTES + 52)
    recordings = STEPS * rows_per_step * (8 + dim * 4) + min(num_rows, STEPS * rows_per_step) * dim * 4
    return weight + sum_sq + journal + recordings + GiB


def train_and_check(workdir: Path, config: EngramConfig, monkeypatch, report: list[str]) -> dict:
    """Create, train, checkpoint, check, reopen and read back the table; returns facts for the caller."""
    model_config = dataclasses.replace(MODEL, engram=config)
    compressor = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
    table_dir = workdir / "tables" / f"layer_{LAYER:02d}"
    watch = MemoryWatch(table_dir / "journal.undo")
    fds: list[int] = []
    try:
        with watch.phase("create the table (random init)"):
            seed_everything(0)
            model = EngramLM(model_config, indexer=EngramIndexer(config, compressor))
            place_tables(model, StorageConfig(tier="disk", directory=str(workdir / "tables"), journal=True))
        table = model.engram_tables()[0]
        assert isinstance(table, DiskTable) and table.directory == table_dir
        weight_path = table_dir / "weight.table"
        fds.append(os.open(weight_path, os.O_RDONLY))
        weight_fd, row_bytes = fds[0], table.dim * 4
        facts = {
            "rows": table.num_rows,
            "dim": table.dim,
            "file_bytes": weight_path.stat().st_size,
            "allocated_bytes": weight_path.stat().st_blocks * 512,
        }
        assert facts["file_bytes"] == DATA_OFFSET + table.num_rows * (row_bytes + CHECKSUM_BYTES)

        with watch.phase("CRC-32 of the whole file (pread)"):
            crcs = file_crcs(weight_fd, table.num_rows, row_bytes)
            sample_rows = torch.randint(0, table.num_rows, (SAMPLE_ROWS,), generator=torch.Generator().manual_seed(1))
            sample = {"rows": sample_rows, "initial": pread_rows(weight_fd, sample_rows, row_bytes)}
        assert sample["initial"].std().item() == pytest.approx(config.table_init_std, rel=0.1)

        recorder = AdagradRecorder(weight_fd, table.dim, workdir / "recording")
        monkeypatch.setattr(RowAdagrad, "_update", recorder.wrap(RowAdagrad._update))
        train_config = TrainConfig(
            steps=STEPS,
            batch_size=BATCH,
            seq_len=SEQ,
            lr=3e-3,
            warmup_steps=10,
            log_every=10,
            eval_every=0,
            checkpoint_every=0,  # saved by hand below, to time it
            device="cpu",
            table_optimizer="adagrad",
        )
        train_tokens, val_tokens = sonnets_tokens()
        seed_everything(0)
        trainer = Trainer(
            model,
            train_config,
            train_tokens,
            val_tokens,
            out_dir=workdir / "run",
            byte_lengths=token_byte_lengths(compressor),
            progress=False,
        )
        journal_path, at_commit = table_dir / "journal.undo", []

        def recording_commit(disk_table, step, commit=DiskTable.commit_checkpoint):
            # just before the commit empties it, the journal holds every row changed since the last one
            at_commit.append(journal_path.stat().st_size if journal_path.exists() else 0)
            return commit(disk_table, step)

        monkeypatch.setattr(DiskTable, "commit_checkpoint", recording_commit)
        losses, journals = [], []
        for half in (1, 2):
            commits = len(at_commit)
            with watch.phase(f"train steps {trainer.step + 1}-{half * STEPS // 2}"):
                losses += trainer.train(until=half * STEPS // 2)
            updates, rows = recorder.since_checkpoint
            with watch.phase(f"checkpoint at step {trainer.step}"):
                checkpoint = trainer.save()
            # the first commit of the half finds the full journal (train() may end with a checkpoint of its own)
            journals.append((max(at_commit[commits:]), updates, rows))
            recorder.checkpointed()
            assert journal_path.stat().st_size <= 4096  # committed: the journal is empty again
        # Before the first checkpoint there is nothing to return to, so nothing is journaled; before
        # the second, the journal holds each row changed since the first once (weight, sum_sq, the
        # checksums of both, row id), plus 52 bytes per record (at least one row each).
        assert journals[0][0] <= 4096
        size, _, rows = journals[1]
        journal_row = row_bytes + 4 + 2 * CHECKSUM_BYTES + 8
        assert rows * journal_row <= size <= 4096 + rows * (journal_row + 52)
        assert table.metadata["committed_step"] == STEPS and not table.metadata["dirty"]
        assert all(math.isfinite(loss) for loss in losses)
        assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3, "the model did not learn"
        facts["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        assert facts["checkpoint_bytes"] < 50 << 20  # the table is not copied into checkpoints

        fds.append(os.open(table_dir / "sum_sq.table", os.O_RDONLY))
        state_fd = fds[1]
        with watch.phase("check touched + sampled rows"):
            expected = recorder.replay()
            check_rows(table, weight_fd, state_fd, expected, sample)
        table.close()
        del trainer, model, table
        gc.collect()  # unmaps the training table's files

        with watch.phase("reopen, look up all rows, check"):
            reopened = DiskTable(table_dir, writable=False)
            assert reopened.metadata["committed_step"] == STEPS and not reopened.metadata["dirty"]
            read_whole_table(reopened, weight_fd, state_fd, crcs, expected)
            check_rows(reopened, weight_fd, state_fd, expected, sample)
            reopened.close()

        step_times = np.diff(recorder.times)
        training = [p for p in watch.phases if p["phase"].startswith("train")]
        facts.update(
            touched_rows=expected["rows"].numel(),
            lookups_per_step=BATCH * SEQ * config.n_heads,
            step_seconds=(float(np.median(step_times)), float(np.percentile(step_times, 90))),
            journals=journals,
            losses=(float(np.mean(losses[:10])), float(np.mean(losses[-10:]))),
            peak_rss_anon=watch.overall["RssAnon"],
            peak_rss_file=watch.overall["RssFile"],
            min_available=watch.overall["MemAvailable"],
            read_per_step=sum(p["disk read"] for p in training) / STEPS,
            dirtied_per_step=sum(p["dirtied"] for p in training) / STEPS,
            rows_per_step=sum(n for n, _, _ in recorder.updates) / STEPS,
        )
        return facts
    finally:
        watch.stop()
        report.append(watch.report())
        for fd in fds:
            os.close(fd)


def summary(facts: dict, mem_total: int) -> str:
    row_mib = facts["rows_per_step"] * facts["dim"] * 4 / 2**20
    lines = [
        f"table {facts['rows']:,} rows x {facts['dim']} float32 = {_gb(facts['file_bytes'])} "
        f"({facts['file_bytes'] / mem_total:.2f} x MemTotal), {_gb(facts['allocated_bytes'])} allocated on disk",
        f"{STEPS} steps of {facts['lookups_per_step']:,} lookups: median {facts['step_seconds'][0]:.3f} s, "
        f"p90 {facts['step_seconds'][1]:.3f} s; {facts['touched_rows']:,} distinct rows trained; "
        f"loss {facts['losses'][0]:.2f} -> {facts['losses'][1]:.2f}",
        f"per step: {facts['rows_per_step']:,.0f} rows updated ({row_mib:.1f} MiB of row data), "
        f"{_gb(facts['read_per_step'])} read from the disk, {_gb(facts['dirtied_per_step'])} of pages dirtied",
    ]
    for i, (size, updates, rows) in enumerate(facts["journals"]):
        changed = f"{rows:,} rows changed in the {updates} steps before"
        lines.append(f"journal at checkpoint {i + 1}: {size / 2**20:.1f} MiB; {changed}")
    lines.append(f"checkpoint folder: {facts['checkpoint_bytes'] / 2**20:.2f} MiB")
    return "\n".join(lines)


def test_a_table_larger_than_ram_trains_and_reads_back_with_bounded_memory(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads this process's memory from /proc (Linux)")
    parent = Path(os.environ.get("ENGRAM_BIG_TABLE_DIR", tmp_path))
    fstype = _mount(parent)[1]
    if fstype in RAM_FILESYSTEMS:
        pytest.skip(f"{parent} is on {fstype}, which is memory; set ENGRAM_BIG_TABLE_DIR to a folder on a disk")
    mem_total = _meminfo("MemTotal")
    config = engram_config(int(1.1 * mem_total) + GiB)
    num_rows, dim = Engram.table_shape(config, LAYER)
    needed, free = disk_needed(num_rows, dim, config.n_heads), shutil.disk_usage(parent).free
    if free < needed:
        pytest.skip(
            f"needs {_gb(needed)} free on {parent} ({fstype}) for a {_gb(num_rows * dim * 4)} table "
            f"(1.1 x MemTotal {_gb(mem_total)} + 1 GiB) and its state; {_gb(free)} free. "
            "Set ENGRAM_BIG_TABLE_DIR to a folder on a disk with room"
        )
    oom_kills = _oom_kills()
    workdir = Path(tempfile.mkdtemp(prefix="engram-bigger-than-ram-", dir=parent))
    report: list[str] = []
    start = time.perf_counter()
    try:
        facts = train_and_check(workdir, config, monkeypatch, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(
            f"\nbigger than RAM: MemTotal {_gb(mem_total)}, {os.cpu_count()} CPUs, folder {parent} ({fstype}), "
            f"total {time.perf_counter() - start:.0f} s",
            *report,
            sep="\n",
        )
    print(summary(facts, mem_total))
    assert facts["file_bytes"] > mem_total
    assert facts["allocated_bytes"] >= facts["file_bytes"] - DATA_OFFSET  # not sparse: every page is on the disk
    assert facts["peak_rss_anon"] < RSS_ANON_LIMIT
    assert _oom_kills() == oom_kills, "the kernel killed a process for memory during the run"
