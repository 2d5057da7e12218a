"""Row checksums: the function against a plain-Python loop, damaged rows of a trained disk table
detected on every read path, `engram tables verify`, and rollbacks that restore rows with their checksums.

A byte is damaged on disk by writing the file with plain ``open()``, as another program (or the
disk) would; the mapping sees it at once through the page cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.model import EngramLM
from engram.storage import DiskTable, StorageConfig, place_tables
from engram.storage.disk import verify_tables
from engram.storage.table_file import RowChecksumError, row_checksums
from engram.training import RowAdam

REPO = Path(__file__).resolve().parents[1]
GOLDEN = 0x9E3779B97F4A7C15


def reference_checksum(data: bytes) -> int:
    """The documented checksum of one row's bytes, as an unsigned 32-bit number, one word at a time."""
    width = 4 if len(data) % 4 == 0 else 2
    total = 0
    for k in range(len(data) // width):
        word = int.from_bytes(data[k * width : (k + 1) * width], "little", signed=True)
        coefficient = (((k + 1) * GOLDEN) % 2**64) >> 50 | 1
        total += coefficient * word
    return total % 2**32


def reference_checksums(rows: np.ndarray) -> list[int]:
    """``reference_checksum`` of each row of a 2-D numpy array."""
    return [reference_checksum(np.ascontiguousarray(row).tobytes()) for row in rows]


def unsigned(checksums: torch.Tensor) -> list[int]:
    return [value & 0xFFFFFFFF for value in checksums.tolist()]


def random_rows(rows: int, row_bytes: int, seed: int = 0) -> torch.Tensor:
    """(rows, row_bytes) uint8 of random bytes: every bit pattern, NaNs and extreme words included."""
    return torch.randint(0, 256, (rows, row_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("dtype", "row_shape"),
    [
        (torch.float32, (16,)),
        (torch.float32, (600,)),  # 600 words: several float64 products per row
        (torch.bfloat16, (3,)),  # 6 bytes: 16-bit words
        (torch.float16, (16,)),
        (torch.int64, ()),  # row_step: one int64 per row
    ],
)
def test_row_checksums_equal_a_plain_loop(dtype, row_shape):
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    raw = random_rows(50, row_bytes)
    values = raw.view(dtype).view(50, *row_shape)
    assert unsigned(row_checksums(values)) == reference_checksums(raw.numpy())
    assert row_checksums(values).dtype == torch.int32
    assert row_checksums(values[:0]).shape == (0,)


def test_row_checksums_are_exact_at_the_extremes_and_over_many_rows():
    # words of -2^31 and 2^31 - 1 over 600 words: the largest sums the float64 products must keep exact
    extremes = torch.full((2, 600), -(2**31), dtype=torch.int32)
    extremes[1] = 2**31 - 1
    assert unsigned(row_checksums(extremes)) == reference_checksums(extremes.numpy())
    many = random_rows(5000, 256, seed=1)  # more words than one block of rows holds
    assert unsigned(row_checksums(many)) == reference_checksums(many.numpy())
    assert row_checksums(torch.zeros(7, 5)).tolist() == [0] * 7  # zero rows: checksum 0


@pytest.mark.parametrize("row_bytes", [64, 6, 8])
def test_every_single_bit_flip_of_a_row_changes_its_checksum(row_bytes):
    row = random_rows(1, row_bytes, seed=2)
    bits = row_bytes * 8
    flipped = row.repeat(bits, 1)
    positions = torch.arange(bits)
    flipped[positions, positions // 8] ^= (1 << (positions % 8)).to(torch.uint8)
    assert (row_checksums(flipped) != row_checksums(row)).all()


# -- a trained disk table -----------------------------------------------------------------------------------

ROWS, DIM = 300, 8


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def row_offset(table: DiskTable, name: str, row: int) -> int:
    """Byte offset of ``row`` in the file of array ``name``, from the documented layout (records of the row,
    its checksum at the row's length rounded up to 4, padding to a multiple of 4 and of the element size)."""
    array = table.weight if name == "weight" else table.row_states()[name]
    row_bytes, align = array[0].numel() * array.element_size(), max(4, array.element_size())
    record = -(-(-(-row_bytes // 4) * 4 + 4) // align) * align
    return 8192 + row * record


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, ROWS, (4, 6), generator=generator), torch.randn(4, 6, DIM, generator=generator))
        for _ in range(count)
    ]


def train_step(table: DiskTable, optimizer: RowAdam, indices: torch.Tensor, target: torch.Tensor) -> None:
    table.train()
    (table(indices) * target).sum().backward()
    optimizer.step()


def trained_table(directory: Path, write_buffer_bytes: int = 0, **options) -> tuple[DiskTable, RowAdam]:
    """A table after three RowAdam steps, everything written to its files."""
    table = DiskTable(directory, ROWS, DIM, init_std=0.1, seed=0, write_buffer_bytes=write_buffer_bytes, **options)
    optimizer = RowAdam([table], lr=0.01)
    for indices, target in batches(3):
        train_step(table, optimizer, indices, target)
    table.flush()  # buffered rows reach the files, where the damage is
    return table, optimizer


@pytest.mark.parametrize("write_buffer_bytes", [0, 4096])
@pytest.mark.parametrize("name", ["weight", "exp_avg", "row_step"])
def test_a_damaged_row_stops_the_next_step_that_reads_it(tmp_path, name, write_buffer_bytes):
    table, optimizer = trained_table(tmp_path / "t", write_buffer_bytes)
    indices, target = batches(4)[3]
    trained = table.row_states()["row_step"] > 0
    row = next(row for row in indices.flatten().tolist() if trained[row])  # its state is not all zeros
    path = tmp_path / "t" / f"{name}.table"
    flip_byte(path, row_offset(table, name, row) + 1)
    before = {key: value.clone() for key, value in {"weight": table.weight, **table.row_states()}.items()}

    with pytest.raises(RowChecksumError, match=rf"{path}: 1 of the \d+ rows read .*\(rows {row}\)") as error:
        train_step(table, optimizer, indices, target)  # the lookup (weight) or the optimizer (state) reads it
    assert error.value.path == path and error.value.rows == [row]
    table.zero_row_grad()
    table.flush()
    for key, value in {"weight": table.weight, **table.row_states()}.items():
        assert torch.equal(value, before[key]), f"{key} changed by the refused step"
    table.close()

    unchecked = DiskTable(tmp_path / "t", write_buffer_bytes=write_buffer_bytes, verify_rows=False)
    train_step(unchecked, RowAdam([unchecked], lr=0.01), indices, target)  # verify_rows=False: read as it is
    unchecked.close()


def test_rows_served_by_the_buffer_and_the_cache_were_checked_when_they_entered(tmp_path):
    table, optimizer = trained_table(tmp_path / "t", write_buffer_bytes=1 << 16, cache_bytes=1 << 14)
    indices, target = batches(4)[3]
    train_step(table, optimizer, indices, target)  # these rows are now in the buffer and the cache
    row = int(indices[0, 0])
    flip_byte(tmp_path / "t" / "weight.table", row_offset(table, "weight", row) + 2)
    assert torch.equal(table.lookup(indices[:1, :1]), table.read_rows(indices[:1, :1].flatten()).view(1, 1, DIM))
    table.buffer().discard()  # what the buffer held is gone: the next read comes from the file
    table.cache.clear()
    with pytest.raises(RowChecksumError, match=f"rows {row}"):
        table.lookup(indices[:1, :1])


def test_an_error_in_the_prefetch_thread_reaches_the_layer_unchanged(tmp_path):
    table, _ = trained_table(tmp_path / "t")  # prefetch is on by default
    indices, _ = batches(4)[3]
    row = int(indices.min())
    flip_byte(tmp_path / "t" / "weight.table", row_offset(table, "weight", row))
    handle = table.prefetch(indices)
    with pytest.raises(RowChecksumError) as error:
        table.lookup(indices, handle)
    assert type(error.value) is RowChecksumError and error.value.rows == [row]


def test_tables_written_from_tensors_have_every_checksum(tmp_path):
    weight = torch.randn(ROWS, DIM)
    states = {"exp_avg": torch.randn(ROWS, DIM), "row_step": torch.arange(ROWS)}
    table = DiskTable.from_tensors(tmp_path / "t", weight, states, committed_step=3)  # engram tables convert
    assert torch.equal(table.read_rows(torch.arange(ROWS)), weight)
    assert torch.equal(table.read_state("row_step", torch.arange(ROWS)), states["row_step"])
    table.close()
    checks = verify_tables(tmp_path / "t")
    assert len(checks) == 3 and all(check.intact and check.rows_checked == ROWS for check in checks)


def test_storage_config_switches_the_check(tmp_path):
    from tests.test_training import MODEL

    on = place_tables(EngramLM(MODEL), StorageConfig(tier="disk", directory=str(tmp_path / "a")))
    off = place_tables(EngramLM(MODEL), StorageConfig(tier="disk", directory=str(tmp_path / "b"), verify_rows=False))
    assert on.engram_tables()[0].verify_rows and not off.engram_tables()[0].verify_rows


def _engram(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_tables_verify_lists_exactly_the_damaged_rows(tmp_path):
    from engram.training.run import RunSpec, write_spec
    from tests.test_training import MODEL, TRAIN

    run = tmp_path / "run"
    folder = run / "tables" / "layer_01"
    table, _ = trained_table(folder)
    damage = [("weight", 17, 0), ("weight", 18, 31), ("exp_avg", 40, 5), ("row_step", 299, 7)]  # (file, row, byte)
    offsets = [(folder / f"{name}.table", row_offset(table, name, row) + byte) for name, row, byte in damage]
    table.close()
    write_spec(run, RunSpec(model=MODEL, train=TRAIN, data="data", storage=StorageConfig(tier="disk")))
    intact = _engram("tables", "verify", run)  # a run folder: the tables of its storage config
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.count("rows checked: intact") == 4 and "1,200 rows in 4 files" in intact.stdout

    for path, offset in offsets:
        flip_byte(path, offset)
    damaged = _engram("tables", "verify", run / "tables")
    assert damaged.returncode == 1, damaged.stderr
    lines = {line.split()[0]: line for line in damaged.stdout.splitlines() if line.startswith("  ")}
    assert lines["weight.table"].endswith("300 rows checked: 2 damaged, rows 17-18")
    assert lines["exp_avg.table"].endswith("300 rows checked: 1 damaged, rows 40")
    assert lines["row_step.table"].endswith("300 rows checked: 1 damaged, rows 299")
    assert lines["exp_avg_sq.table"].endswith("300 rows checked: intact")
    assert "damage in 3 file(s)" in damaged.stdout

    assert [check.damaged for check in verify_tables(folder / "weight.table")] == [[(17, 19)]]
    missing = _engram("tables", "verify", tmp_path / "nothing")
    assert missing.returncode == 2 and "holds no engram table" in missing.stderr


def test_a_rollback_restores_rows_with_their_checksums(tmp_path):
    table, optimizer = trained_table(tmp_path / "t", write_buffer_bytes=1024)
    table.prepare_checkpoint(3)
    table.commit_checkpoint(3)
    files = sorted((tmp_path / "t").glob("*.table"))
    committed = {path.name: path.read_bytes()[8192:] for path in files}  # rows and checksums
    for indices, target in batches(9)[3:]:  # rows reach the files (journaled first) as the small buffer overflows
        train_step(table, optimizer, indices, target)
    table.weight_file.flush()
    assert table.journal().pending_rows > 0
    changed = [path.name for path in files if path.read_bytes()[8192:] != committed[path.name]]
    assert len(changed) == 4
    del table, optimizer  # a crash: nothing else is written back or committed

    restored = DiskTable(tmp_path / "t", write_buffer_bytes=1024)
    restored.restore_checkpoint(3)
    restored.close()
    assert {path.name: path.read_bytes()[8192:] for path in files} == committed  # bit for bit
    assert all(check.intact and check.rows_checked == ROWS for check in verify_tables(tmp_path / "t"))


def test_a_rollback_never_makes_a_damaged_row_look_valid(tmp_path):
    table, _ = trained_table(tmp_path / "t")
    table.prepare_checkpoint(3)
    table.commit_checkpoint(3)
    flip_byte(tmp_path / "t" / "weight.table", row_offset(table, "weight", 5))  # damaged after the commit ...
    rows = torch.tensor([5, 6])
    table.begin_update(rows)  # ... then journaled as it is, and overwritten without being read
    table.write_rows(rows, torch.zeros(2, DIM))
    assert verify_tables(tmp_path / "t")[0].intact
    table.restore_checkpoint(3)
    assert verify_tables(tmp_path / "t")[0].damaged == [(5, 6)]  # the damage comes back with its old checksum
    table.close()


def test_tables_of_format_1_still_open_train_and_roll_back(tmp_path):
    from tests.test_table_file import downgrade_to_format_1

    table, _ = trained_table(tmp_path / "t")
    table.prepare_checkpoint(3)
    table.commit_checkpoint(3)
    table.close()
    for path in (tmp_path / "t").glob("*.table"):
        downgrade_to_format_1(path)
    sizes = {path.name: path.stat().st_size for path in (tmp_path / "t").glob("*.table")}
    committed = {path.name: path.read_bytes()[8192:] for path in (tmp_path / "t").glob("*.table")}

    old = DiskTable(tmp_path / "t")
    assert old.weight_file.version == 1 and old.weight_file.checksums is None
    optimizer = RowAdam([old], lr=0.01)
    for indices, target in batches(5)[3:]:
        train_step(old, optimizer, indices, target)
    old.flush()
    old.restore_checkpoint(3)  # the journal of a format-1 table holds no checksums
    old.close()
    assert {path.name: path.read_bytes()[8192:] for path in (tmp_path / "t").glob("*.table")} == committed
    assert {path.name: path.stat().st_size for path in (tmp_path / "t").glob("*.table")} == sizes

    verify = _engram("tables", "verify", tmp_path / "t")
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.count("no row checksums (format 1): not checked") == 4
    info = _engram("tables", "info", tmp_path / "t")
    assert info.returncode == 0 and info.stdout.count("format 1, no row checksums") == 4
