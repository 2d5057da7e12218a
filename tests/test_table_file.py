"""Table files: layout on disk, crash-safe header updates, deterministic initialisation and refusals.

The on-disk checks read the file with plain ``open()`` and numpy, independently of TableFile; row
checksums are checked against the plain-Python loop of tests/test_row_checksums.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from engram.storage import DeviceTable, DiskTable, HostTable, shard_ranges
from engram.storage import init as table_init
from engram.storage.table_file import (
    DATA_OFFSET,
    TableFile,
    TableFileError,
    _slot_bytes,
    record_layout,
    row_checksums,
)
from tests.test_row_checksums import reference_checksums

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RAW_DTYPE = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<u2", torch.int64: "<i8"}


def read_slot(path, slot: int) -> tuple[int, int, dict, bool]:
    """(version, seq, header JSON, checksum ok) of a header slot, parsed from the raw bytes."""
    with open(path, "rb") as f:
        f.seek(slot * 4096)
        raw = f.read(4096)
    assert raw[:8] == b"ENGRAMTB"
    version, length, seq = struct.unpack_from("<IIQ", raw, 8)
    header = json.loads(raw[24 : 24 + length])
    assert raw[24 + length : 4064] == bytes(4064 - 24 - length)  # zero padding
    return version, seq, header, hashlib.sha256(raw[:4064]).digest() == raw[4064:]


def write_slot(path, slot: int, header: dict, seq: int, version: int = 2) -> None:
    """Write a header slot with a valid checksum, built from the documented layout."""
    data = json.dumps(header).encode()
    body = b"ENGRAMTB" + struct.pack("<IIQ", version, len(data), seq) + data
    body += bytes(4064 - len(body))
    with open(path, "r+b") as f:
        f.seek(slot * 4096)
        f.write(body + hashlib.sha256(body).digest())


def record_bytes(dim: int, itemsize: int) -> tuple[int, int]:
    """(checksum offset, record size) of a format-2 row record, from the documented layout: the row, its
    checksum at the row's length rounded up to 4, padding to a multiple of 4 and of the element size."""
    checksum_at = -(-dim * itemsize // 4) * 4
    align = max(4, itemsize)
    return checksum_at, -(-(checksum_at + 4) // align) * align


def raw_records(path, shape, dtype) -> tuple[np.ndarray, list[int]]:
    """(rows (shape[0], shape[1]), checksums as uint32) of a format-2 file, read from byte 8192."""
    itemsize = np.dtype(RAW_DTYPE[dtype]).itemsize
    checksum_at, size = record_bytes(shape[1], itemsize)
    with open(path, "rb") as f:
        f.seek(8192)
        records = np.frombuffer(f.read(shape[0] * size), dtype=np.uint8).reshape(shape[0], size)
    assert not records[:, checksum_at + 4 :].any() and not records[:, shape[1] * itemsize : checksum_at].any()
    rows = records[:, : shape[1] * itemsize].copy().view(RAW_DTYPE[dtype])
    return rows, records[:, checksum_at : checksum_at + 4].copy().view("<u4")[:, 0].tolist()


def raw_data(path, shape, dtype) -> np.ndarray:
    """The rows of a format-2 file (``raw_records``)."""
    return raw_records(path, shape, dtype)[0]


def raw_checksums(path, shape, dtype=torch.float32) -> list[int]:
    """The row checksums of a format-2 file (``raw_records``)."""
    return raw_records(path, shape, dtype)[1]


def header_json(num_rows: int, dim: int, dtype: str = "float32", metadata: dict | None = None) -> dict:
    """A format-2 header."""
    meta = {} if metadata is None else metadata
    return {"num_rows": num_rows, "dim": dim, "dtype": dtype, "metadata": meta, "row_checksum": "wsum32"}


def downgrade_to_format_1(path) -> None:
    """Make a table file what engram wrote before row checksums: version-1 headers, records of the rows alone."""
    for slot in (0, 1):
        _, seq, header, _ = read_slot(path, slot)
        del header["row_checksum"]
        write_slot(path, slot, header, seq, version=1)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
    rows = raw_data(path, (header["num_rows"], header["dim"]), dtype[header["dtype"]])
    with open(path, "r+b") as f:
        f.seek(8192)
        f.write(rows.tobytes())
        f.truncate(8192 + rows.nbytes)


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_layout_and_values_on_disk(tmp_path, dtype):
    path = tmp_path / "t.engram"
    meta = {"layer": 3, "name": "a", "nested": {"x": [1, 2.5]}}
    with TableFile.create(path, 6, 4, dtype, metadata=meta) as table:
        assert table.tensor.shape == (6, 4) and table.tensor.dtype == dtype
        assert table.nbytes == 24 * table.tensor.element_size()
        # multiples of 1/4 are exact in every dtype, so the expected bits can be computed from float32
        values = torch.arange(24, dtype=torch.float32).view(6, 4) * 0.25 - 2
        table.write_rows(torch.arange(6), values.to(dtype))
        table.write_rows(torch.tensor([5]), torch.tensor([[-2.0, 100.0, -1.5, -1.25]]))
        values[5, :] = torch.tensor([-2.0, 100.0, -1.5, -1.25])
        table.flush()
        checksum_at, size = record_bytes(4, table.tensor.element_size())
        assert os.path.getsize(path) == 8192 + 6 * size  # a record per row: the row and its checksum
        assert (checksum_at, size) == {4: (16, 20), 2: (8, 12)}[table.tensor.element_size()]

        raw = raw_data(path, (6, 4), dtype)
        if dtype == torch.bfloat16:  # bfloat16 is the top half of a float32
            expected = (values.numpy().view(np.uint32) >> 16).astype(np.uint16)
            assert np.array_equal(raw, expected)
        else:
            assert np.array_equal(raw.astype(np.float32), values.numpy())
        assert raw_checksums(path, (6, 4), dtype) == reference_checksums(raw)

    for slot in (0, 1):
        version, _, header, ok = read_slot(path, slot)
        assert ok and version == 2
        assert header == header_json(6, 4, str(dtype).removeprefix("torch."), meta)

    with TableFile.open(path) as table:
        assert (table.num_rows, table.dim, table.dtype, table.writable) == (6, 4, dtype, False)
        assert table.metadata == meta
        assert torch.equal(table.tensor.float(), values)


def test_init_is_deterministic_independent_of_chunking_and_has_the_right_std(tmp_path):
    def make(name, **kw):
        with TableFile.create(tmp_path / name, 97, 48, init_std=0.02, **kw):
            pass
        assert (tmp_path / name).stat().st_size == 8192 + 97 * (48 * 4 + 4)
        rows, checksums = raw_records(tmp_path / name, (97, 48), torch.float32)
        assert checksums == reference_checksums(rows)
        return rows.tobytes()

    a, chunked, other = make("a", seed=5), make("b", seed=5, chunk_rows=7), make("c", seed=6)
    assert a == chunked
    assert a != other
    values = np.frombuffer(a, dtype="<f4")
    assert abs(values.std() - 0.02) < 0.001  # 4656 values: the std is within ~2% of 0.02
    assert abs(values.mean()) < 0.0015
    assert np.corrcoef(values, np.frombuffer(other, dtype="<f4"))[0, 1] < 0.1

    # bfloat16 holds the rounded float32 values of the same seed
    with TableFile.create(tmp_path / "h", 97, 48, torch.bfloat16, init_std=0.02, seed=5) as half:
        assert torch.equal(half.tensor, torch.from_numpy(values.copy()).view(97, 48).to(torch.bfloat16))


def test_chunks_cross_the_random_blocks(tmp_path, monkeypatch):
    # small blocks, so that chunks of 7 rows start and end inside blocks and span several of them
    monkeypatch.setattr(table_init, "BLOCK", 50)
    with (
        TableFile.create(tmp_path / "a", 40, 9, init_std=1.0) as a,
        TableFile.create(tmp_path / "b", 40, 9, init_std=1.0, chunk_rows=7) as b,
    ):
        assert torch.equal(a.tensor, b.tensor)
        assert len(torch.unique(a.tensor)) == 360  # no block repeated


def test_every_tier_and_every_shard_starts_from_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(table_init, "BLOCK", 50)  # shards start and end inside blocks
    whole = DeviceTable(40, 9, init_std=0.5, seed=3).weight.detach()
    assert torch.equal(HostTable(40, 9, init_std=0.5, seed=3).weight, whole)
    assert torch.equal(DiskTable(tmp_path / "d", 40, 9, init_std=0.5, seed=3).weight, whole)
    # the rows of a 3-way sharding, each built on its own, are the whole table's rows
    for index, (start, end) in enumerate(shard_ranges(40, 3)):
        shards = (
            DeviceTable(end - start, 9, init_std=0.5, seed=3, first_row=start).weight.detach(),
            HostTable(end - start, 9, init_std=0.5, seed=3, first_row=start).weight,
            DiskTable(tmp_path / f"s{index}", end - start, 9, init_std=0.5, seed=3, first_row=start).weight,
        )
        for shard in shards:
            assert torch.equal(shard, whole[start:end])
    assert not torch.equal(DeviceTable(40, 9, init_std=0.5, seed=4).weight.detach(), whole)
    torch.manual_seed(0)
    drawn = DeviceTable(40, 9).weight.detach()
    torch.manual_seed(0)
    assert torch.equal(HostTable(40, 9).weight, drawn)  # the seed comes from the global generator


def test_zeros_are_created_sparse(tmp_path):
    path = tmp_path / "z"
    with TableFile.create(path, 4096, 4096) as table:  # 64 MiB
        assert table.tensor[::511].abs().max() == 0
    st = os.stat(path)
    assert st.st_size == 8192 + 4096 * (4096 * 4 + 4)
    assert st.st_blocks * 512 < 1 << 20  # nearly nothing allocated: zero rows have checksum 0
    rows, checksums = raw_records(path, (4096, 4096), torch.float32)
    assert rows[::97].max() == 0 and set(checksums) == {0}


def test_metadata_update_writes_the_other_slot_and_survives_a_torn_write(tmp_path):
    path = tmp_path / "t"
    TableFile.create(path, 3, 2, metadata={"step": 0}).close()
    assert [read_slot(path, s)[1] for s in (0, 1)] == [1, 0]
    slot0 = path.read_bytes()[:4096]

    with TableFile.open(path, writable=True) as table:
        table.set_metadata({"step": 1})
        assert path.read_bytes()[:4096] == slot0  # the current slot is left alone
        assert read_slot(path, 1)[1:3] == (2, header_json(3, 2, metadata={"step": 1}))
        table.set_metadata({"step": 2})
        assert read_slot(path, 0)[1] == 3
    with TableFile.open(path) as table:
        assert table.metadata == {"step": 2}

    flip_byte(path, 40)  # tear slot 0, just written: the previous header in slot 1 is used
    with TableFile.open(path, writable=True) as table:
        assert table.metadata == {"step": 1}
        table.set_metadata({"step": 3})  # goes to the damaged slot, repairing it
    assert read_slot(path, 0)[1:] == (3, header_json(3, 2, metadata={"step": 3}), True)
    with TableFile.open(path) as table:
        assert table.metadata == {"step": 3}


def test_damaged_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "t"
    TableFile.create(path, 5, 3).close()
    good = path.read_bytes()

    flip_byte(path, 100)
    flip_byte(path, 4096 + 4000)
    with pytest.raises(TableFileError, match="header damaged"):
        TableFile.open(path)

    path.write_bytes(good[:-1])
    with pytest.raises(TableFileError, match=r"truncated: expected 8272 bytes from the header .*, found 8271"):
        TableFile.open(path)  # 8192 + 5 records of 3 x 4 bytes and a 4-byte checksum
    path.write_bytes(good + b"\0")
    with pytest.raises(TableFileError, match="too long"):
        TableFile.open(path)

    foreign = tmp_path / "f"
    foreign.write_bytes(np.random.default_rng(0).bytes(10000))
    with pytest.raises(TableFileError, match="not an engram table file"):
        TableFile.open(foreign)
    foreign.write_text("hello\n")
    with pytest.raises(TableFileError, match="not an engram table file"):
        TableFile.open(foreign)
    foreign.write_bytes(good[:5000])
    with pytest.raises(TableFileError, match="shorter than the 8192-byte header"):
        TableFile.open(foreign)
    with pytest.raises(FileNotFoundError):
        TableFile.open(tmp_path / "missing")


@pytest.mark.parametrize(
    ("header", "version", "message"),
    [
        (header_json(5, 3), 3, "written by a newer version"),
        ({"num_rows": 5, "dim": 3, "dtype": "int8", "metadata": {}}, 1, "unknown dtype 'int8'"),
        ({"num_rows": 5, "dim": 3, "dtype": "float32"}, 1, "keys"),
        ({"num_rows": 5, "dim": 3, "dtype": "float32", "metadata": {}}, 2, "version 2 header .* keys"),
        (header_json(5, 3, "int8"), 2, "unknown dtype 'int8'"),
        ({**header_json(5, 3), "row_checksum": "crc32c"}, 2, "rows checksummed with 'crc32c'.* upgrade engram"),
        ({"num_rows": "5", "dim": 3, "dtype": "float32", "metadata": {}}, 1, "num_rows must be an integer"),
        ({"num_rows": 5, "dim": 3, "dtype": "float32", "metadata": []}, 1, "metadata must be a JSON object"),
        ([5, 3], 1, "JSON object"),
    ],
)
def test_bad_headers_are_refused(tmp_path, header, version, message):
    path = tmp_path / "t"
    TableFile.create(path, 5, 3).close()
    write_slot(path, 0, header, seq=1, version=version)
    write_slot(path, 1, header, seq=0, version=version)
    with pytest.raises(TableFileError, match=message):
        TableFile.open(path)


def test_slots_disagreeing_on_shape_are_refused(tmp_path):
    path = tmp_path / "t"
    TableFile.create(path, 5, 3).close()
    write_slot(path, 1, header_json(3, 5), seq=0)
    with pytest.raises(TableFileError, match="disagree"):
        TableFile.open(path)
    write_slot(path, 1, {"num_rows": 5, "dim": 3, "dtype": "float32", "metadata": {}}, seq=0, version=1)
    with pytest.raises(TableFileError, match="disagree on the table's format"):
        TableFile.open(path)


def test_read_only_open_cannot_write(tmp_path):
    path = tmp_path / "t"
    TableFile.create(path, 4, 2).close()
    with TableFile.open(path) as table, pytest.raises(TableFileError, match="read-only"):
        table.set_metadata({"a": 1})
    # the mapping is read-only: a write through the tensor is a memory fault, so test it in a child process
    code = (
        "import sys; from engram.storage.table_file import TableFile\n"
        "t = TableFile.open(sys.argv[1]); print('opened', flush=True); t.tensor[0, 0] = 1.0\n"
    )
    child = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert child.stdout == "opened\n"
    assert child.returncode < 0  # killed by a signal (a segmentation fault), not a Python error
    assert raw_data(path, (4, 2), torch.float32).max() == 0


def test_create_refuses_bad_arguments_and_existing_files(tmp_path):
    path = tmp_path / "t"
    for kwargs, message in [
        ({"num_rows": 0}, "num_rows must be an integer >= 1"),
        ({"dim": 2.0}, "dim must be an integer >= 1"),
        ({"dtype": torch.int32}, "not supported"),
        ({"init_std": -1.0}, "init_std must be a finite number >= 0"),
        ({"init_std": float("nan")}, "init_std"),
        ({"metadata": {"x": object()}}, "JSON-serialisable"),
        ({"metadata": {"x": "a" * 5000}}, "more than the 4040 a header slot holds"),
        ({"chunk_rows": 0}, "chunk_rows"),
    ]:
        args = {"num_rows": 4, "dim": 2, **kwargs}
        with pytest.raises(TableFileError, match=message):
            TableFile.create(path, **args)
    assert list(tmp_path.iterdir()) == []

    TableFile.create(path, 4, 2, init_std=1.0).close()
    before = path.read_bytes()
    with pytest.raises(TableFileError, match="already exists; pass overwrite=True"):
        TableFile.create(path, 8, 2)
    assert path.read_bytes() == before
    with TableFile.create(path, 8, 2, overwrite=True) as table:
        assert table.num_rows == 8
    assert os.path.getsize(path) == 8192 + 8 * (2 * 4 + 4)


def test_failed_create_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "t"
    TableFile.create(path, 4, 2, metadata={"old": True}).close()
    before = path.read_bytes()
    calls = []

    def failing_take(self, start, stop):
        calls.append(start)
        if len(calls) % 3 == 0:
            raise OSError("disk full")
        return torch.zeros(stop - start)

    monkeypatch.setattr(table_init.NormalStream, "take", failing_take)
    with pytest.raises(OSError, match="disk full"):
        TableFile.create(path, 100, 2, init_std=1.0, chunk_rows=10, overwrite=True)
    assert len(calls) == 3  # it failed midway through writing
    assert [p.name for p in tmp_path.iterdir()] == ["t"]
    assert path.read_bytes() == before  # the old table is untouched
    with pytest.raises(OSError, match="disk full"):
        TableFile.create(tmp_path / "new", 100, 2, init_std=1.0, chunk_rows=10)
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_evict_page_cache_keeps_unflushed_writes(tmp_path):
    path = tmp_path / "t"
    with TableFile.create(path, 64, 16, init_std=1.0) as table:
        table.tensor[3] = 42.0  # not flushed yet: eviction must write it first, not drop it
        expected = table.tensor.clone()
        table.evict_page_cache()
        assert torch.equal(table.tensor, expected)
    assert np.array_equal(raw_data(path, (64, 16), torch.float32), expected.numpy())


def test_closed_table_and_views_outliving_it(tmp_path):
    table = TableFile.create(tmp_path / "t", 4, 2, init_std=1.0)
    view = table.tensor
    expected = view.clone()
    table.close()
    table.close()  # closing twice is harmless
    with pytest.raises(TableFileError, match="closed"):
        _ = table.tensor
    assert torch.equal(view, expected)  # a view taken before close keeps the mapping alive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_write_rows_writes_each_rows_checksum_and_nothing_else(tmp_path, dtype):
    path = tmp_path / "t"
    table = TableFile.create(path, 50, 3, dtype)
    rows = torch.tensor([2, 3, 4, 9, 40])  # a run of three and two single rows
    values = (torch.arange(15).view(5, 3) - 7).to(dtype)
    table.write_rows(rows, values)
    table.close()
    raw = raw_data(path, (50, 3), dtype)
    expected = [0] * 50  # zero rows: checksum 0
    for row, checksum in zip(rows.tolist(), reference_checksums(raw[rows.numpy()]), strict=True):
        expected[row] = checksum
    assert raw_checksums(path, (50, 3), dtype) == expected
    assert reference_checksums(raw[[2]]) != [0]


def test_reads_check_the_rows_and_verify_finds_every_damaged_row(tmp_path):
    from engram.storage.table_file import RowChecksumError

    path = tmp_path / "t"
    TableFile.create(path, 1000, 5, init_std=1.0).close()
    for row in (0, 1, 2, 500, 999):  # rows 0-2 in a run; the first and last row of the file
        flip_byte(path, 8192 + row * 24 + row % 20)  # records of 5 float32 and a checksum
    flip_byte(path, 8192 + 700 * 24 + 20 + 3)  # a damaged checksum is a damaged row too
    with TableFile.open(path) as table:
        assert torch.equal(table.read_rows(torch.tensor([3, 998])), table.tensor[[3, 998]])
        with pytest.raises(RowChecksumError, match=r"2 of the 4 rows read do not match .*\(rows 500, 700\)") as error:
            table.read_rows(torch.tensor([700, 3, 500, 4]))
        assert error.value.path == path and error.value.rows == [500, 700]
        assert table.read_rows(torch.tensor([500]), verify=False).shape == (1, 5)  # the check can be skipped
        for chunk_bytes in (20, 60, 1 << 20):  # runs that cross chunk boundaries are merged
            check = table.verify(chunk_bytes=chunk_bytes)
            assert check.damaged == [(0, 3), (500, 501), (700, 701), (999, 1000)]
            assert (check.rows_checked, check.damaged_rows, check.intact) == (1000, 6, False)


def test_format_1_files_open_read_and_write_without_checksums(tmp_path):
    path = tmp_path / "t"
    with TableFile.create(path, 10, 4, init_std=1.0, metadata={"a": 1}) as table:
        expected = table.tensor.clone()
    downgrade_to_format_1(path)
    size = os.path.getsize(path)
    assert size == 8192 + 10 * 4 * 4  # the rows alone
    with TableFile.open(path, writable=True) as table:
        assert (table.version, table.checksums, table.metadata) == (1, None, {"a": 1})
        assert torch.equal(table.read_rows(torch.tensor([7, 2])), expected[[7, 2]])
        table.write_rows(torch.tensor([3]), torch.ones(1, 4))
        table.set_metadata({"a": 2})
        check = table.verify()
        assert (check.version, check.rows_checked, check.intact) == (1, 0, True)
    assert os.path.getsize(path) == size  # no checksums appear
    assert read_slot(path, 1)[0:3] == (1, 2, {"num_rows": 10, "dim": 4, "dtype": "float32", "metadata": {"a": 2}})
    with TableFile.open(path) as table:
        expected[3] = 1.0
        assert torch.equal(table.tensor, expected)


def _write_row_by_row(table_file: TableFile, rows: torch.Tensor, values: torch.Tensor) -> None:
    """The documented record layout written one ``pwrite`` per row: the reference for ``write_rows``."""
    values = values.to(table_file.dtype).contiguous().view(-1, table_file.dim)
    item = values.element_size()
    checksummed = table_file.version >= 2
    checksum_at, size = record_layout(table_file.dim * item, item, checksummed=checksummed)
    sums = row_checksums(values)
    for row, value, checksum in zip(rows.tolist(), values, sums, strict=True):
        record = bytearray(size)
        record[: table_file.dim * item] = value.view(torch.uint8).numpy().tobytes()
        if checksummed:
            record[checksum_at : checksum_at + 4] = struct.pack("<i", int(checksum))
        os.pwrite(table_file._file.fileno(), bytes(record), DATA_OFFSET + row * size)


@pytest.mark.parametrize(
    ("dim", "dtype"), [(16, torch.float32), (5, torch.bfloat16), (1, torch.int64), (64, torch.float32)]
)
def test_write_rows_in_spans_gives_the_bytes_of_one_write_per_row(tmp_path, dim, dtype):
    """Rows closer than a page share one pwrite with the gap's bytes rewritten: the files must not differ."""
    num_rows = 20_000
    kwargs = {"init_std": 1.0, "seed": 3} if dtype.is_floating_point else {}
    spans = TableFile.create(tmp_path / "spans.table", num_rows, dim, dtype, **kwargs)
    single = TableFile.create(tmp_path / "single.table", num_rows, dim, dtype, **kwargs)
    generator = torch.Generator().manual_seed(4)
    gap_rows = 4096 // spans.record_bytes  # the gap (in rows) at which spans stop merging, and around it
    for _ in range(12):
        # runs, gaps just under and over a page, far-apart rows, and the first and last rows
        steps = torch.tensor([1, 1, gap_rows - 1, gap_rows, gap_rows + 1, gap_rows + 2, 7, 300])
        picks = steps[torch.randint(0, steps.numel(), (400,), generator=generator)]
        rows = torch.cumsum(picks, 0) + int(torch.randint(0, 50, (1,), generator=generator))
        rows = torch.unique(torch.cat([rows[rows < num_rows], torch.tensor([0, num_rows - 1])]))
        rows = rows[torch.randperm(rows.numel(), generator=generator)]  # any order
        if dtype.is_floating_point:
            values = torch.randn(rows.numel(), dim, generator=generator).to(dtype)
        else:
            values = torch.randint(-(2**40), 2**40, (rows.numel(), dim), generator=generator)
        spans.write_rows(rows, values)
        _write_row_by_row(single, rows, values)
    spans.flush()
    single.flush()
    assert (tmp_path / "spans.table").read_bytes()[DATA_OFFSET:] == (tmp_path / "single.table").read_bytes()[
        DATA_OFFSET:
    ]
    assert spans.verify().intact
    spans.close()
    single.close()


def test_write_rows_in_spans_of_a_format_1_file(tmp_path):
    """Files without checksums (records of the row alone) are written in spans too."""
    num_rows, dim = 5000, 8
    paths = [tmp_path / "a.table", tmp_path / "b.table"]
    for path in paths:
        header = json.dumps(
            {"num_rows": num_rows, "dim": dim, "dtype": "float32", "metadata": {}},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        with open(path, "wb") as f:
            f.write(_slot_bytes(header, 1, 1) + _slot_bytes(header, 0, 1))
            f.truncate(DATA_OFFSET + num_rows * dim * 4)
    spans, single = (TableFile.open(path, writable=True) for path in paths)
    assert spans.version == 1
    generator = torch.Generator().manual_seed(5)
    everything = torch.randn(num_rows, dim, generator=generator)  # so that the gaps hold something other than zeros
    for table_file in (spans, single):
        _write_row_by_row(table_file, torch.arange(num_rows), everything)
    rows = torch.unique(torch.randint(0, num_rows, (900,), generator=generator))
    values = torch.randn(rows.numel(), dim, generator=generator)
    spans.write_rows(rows, values)
    _write_row_by_row(single, rows, values)
    spans.close()
    single.close()
    assert paths[0].read_bytes() == paths[1].read_bytes()
