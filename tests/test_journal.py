"""The undo journal: rows written after protect() go back to their values at the last commit.

The arrays are real memory-mapped files (table files and a numpy memmap), and a crash is
simulated by building a new UndoJournal on the same journal path, as a restarted process would.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
import torch

from engram.storage.journal import JournalError, SavedRows, UndoJournal
from engram.storage.table_file import TableFile

R, D = 20, 4
ROW_BYTES = D * 4 + D * 2 + 8 + 4  # weight float32, exp_avg bfloat16, row_step int64, sum_sq float32


def record_len(n: int) -> int:
    """Bytes of a record of n rows, from the documented layout."""
    return 8 + 4 + 8 + 8 * n + n * ROW_BYTES + 32 if n else 0


class Arrays:
    """The arrays of one disk table under training, mapped from files in ``folder``."""

    def __init__(self, folder, create: bool = False):
        if create:
            TableFile.create(folder / "weight", R, D, init_std=1.0, seed=1).close()
            TableFile.create(folder / "exp_avg", R, D, torch.bfloat16, init_std=1.0, seed=2).close()
            np.memmap(folder / "row_step", dtype="<i8", mode="w+", shape=(R,))[:] = np.arange(R)
            np.memmap(folder / "sum_sq", dtype="<f4", mode="w+", shape=(R,))[:] = np.arange(R) / 8
        self.tables = [TableFile.open(folder / name, writable=True) for name in ("weight", "exp_avg")]
        self.memmaps = [
            np.memmap(folder / n, dtype=t, mode="r+", shape=(R,)) for n, t in [("row_step", "<i8"), ("sum_sq", "<f4")]
        ]
        self.tensors = {
            "weight": self.tables[0].tensor,
            "exp_avg": self.tables[1].tensor,
            "row_step": torch.from_numpy(self.memmaps[0]),
            "sum_sq": torch.from_numpy(self.memmaps[1]),
        }

    def write(self, rows: list[int], amount: float = 1.0) -> None:
        """An optimizer step: every array changes at ``rows``."""
        idx = torch.tensor(rows, dtype=torch.long)
        for name, tensor in self.tensors.items():
            tensor[idx] += int(amount) if name == "row_step" else amount

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.tensors.items()}

    def equals(self, snapshot: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(self.tensors[name], snapshot[name]) for name in snapshot)

    def flush(self) -> None:
        for table in self.tables:
            table.flush()
        for mm in self.memmaps:
            mm.flush()

    def close(self) -> None:
        for table in self.tables:
            table.close()


@pytest.fixture
def arrays(tmp_path):
    a = Arrays(tmp_path, create=True)
    yield a
    a.close()


def protect_and_write(journal: UndoJournal, arrays: Arrays, rows: list[int], new_rows: int, amount=1.0) -> None:
    """protect() then write, checking that the journal grew by exactly one record of ``new_rows`` rows."""
    before = os.path.getsize(journal.path)
    journal.protect(torch.tensor(rows, dtype=torch.long))
    assert os.path.getsize(journal.path) - before == record_len(new_rows)
    arrays.write(rows, amount)


def test_rollback_restores_the_commit_state(tmp_path, arrays):
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    header_len = os.path.getsize(tmp_path / "j")
    committed = arrays.snapshot()

    protect_and_write(journal, arrays, [3, 1, 3, 7], new_rows=3)
    protect_and_write(journal, arrays, [7, 2, 9], new_rows=2)  # 7 is already saved
    protect_and_write(journal, arrays, [], new_rows=0)
    protect_and_write(journal, arrays, [9, 1], new_rows=0, amount=5.0)
    assert journal.pending_rows == 5
    assert not arrays.equals(committed)

    # the first record, read by hand: sorted new row ids, then the arrays in name order
    raw = (tmp_path / "j").read_bytes()[header_len:]
    assert raw[:8] == b"ENGRAMUJ"
    assert struct.unpack_from("<IQ", raw, 8) == (1, 3)
    assert np.frombuffer(raw, "<i8", 3, 20).tolist() == [1, 3, 7]
    exp_avg = np.frombuffer(raw, "<u2", 3 * D, 44).reshape(3, D)
    assert np.array_equal(exp_avg, committed["exp_avg"][[1, 3, 7]].view(torch.int16).numpy().view("<u2"))
    row_step = np.frombuffer(raw, "<i8", 3, 44 + 3 * D * 2)
    assert row_step.tolist() == [1, 3, 7]
    n1 = record_len(3)
    assert hashlib.sha256(raw[: n1 - 32]).digest() == raw[n1 - 32 : n1]

    assert journal.rollback() == 5
    assert arrays.equals(committed)
    journal.close()


def test_rollback_goes_back_to_the_latest_commit(tmp_path, arrays):
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    header_len = os.path.getsize(tmp_path / "j")
    protect_and_write(journal, arrays, [0, 5], new_rows=2)
    arrays.flush()
    journal.commit()
    assert os.path.getsize(tmp_path / "j") == header_len
    assert journal.pending_rows == 0
    second = arrays.snapshot()

    protect_and_write(journal, arrays, [5, 6], new_rows=2)  # 5 changed before the commit: saved again
    protect_and_write(journal, arrays, [19, 6, 0], new_rows=2)
    assert journal.rollback() == 4
    assert arrays.equals(second)
    journal.close()


def test_crash_restart_rollback(tmp_path, arrays):
    committed = arrays.snapshot()
    first = UndoJournal(tmp_path / "j", arrays.tensors)
    protect_and_write(first, arrays, [4, 8], new_rows=2)
    protect_and_write(first, arrays, [8, 12], new_rows=1)
    arrays.flush()  # some of the new values reached the disk before the crash
    first.close()

    restarted = UndoJournal(tmp_path / "j", arrays.tensors)
    with pytest.raises(JournalError, match=r"call rollback\(\) before changing the arrays"):
        restarted.protect(torch.tensor([1]))
    assert restarted.rollback() == 3
    assert arrays.equals(committed)

    # a second crash before the next commit: the journal still restores the same state
    protect_and_write(restarted, arrays, [8, 0], new_rows=1)
    restarted.close()
    again = UndoJournal(tmp_path / "j", arrays.tensors)
    assert again.rollback() == 4
    assert arrays.equals(committed)

    arrays.flush()
    again.commit()
    again.close()
    empty = UndoJournal(tmp_path / "j", arrays.tensors)
    assert empty.rollback() == 0
    empty.close()


def test_commit_after_restart_discards_the_records(tmp_path, arrays):
    # the earlier run flushed the arrays for a checkpoint and stopped before committing:
    # the arrays as they are become the restore point
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    header_len = os.path.getsize(tmp_path / "j")
    protect_and_write(journal, arrays, [4, 8], new_rows=2)
    arrays.flush()
    journal.close()
    flushed = arrays.snapshot()

    restarted = UndoJournal(tmp_path / "j", arrays.tensors)
    restarted.commit()
    assert os.path.getsize(tmp_path / "j") == header_len
    protect_and_write(restarted, arrays, [8, 9], new_rows=2)  # 8 is saved again, with its new value
    assert restarted.rollback() == 2
    assert arrays.equals(flushed)
    restarted.close()


@pytest.mark.parametrize("damage", ["cut 5 bytes", "cut inside the prefix", "zeros"])
def test_torn_last_record_is_ignored(tmp_path, arrays, damage):
    committed = arrays.snapshot()
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    protect_and_write(journal, arrays, [2, 3], new_rows=2)
    valid_end = os.path.getsize(tmp_path / "j")
    journal.protect(torch.tensor([3, 10, 11]))  # the crash hits while this record is appended ...
    journal.close()  # ... so rows 10 and 11 were never written

    with open(tmp_path / "j", "r+b") as f:
        if damage == "cut 5 bytes":
            f.truncate(valid_end + record_len(2) - 5)
        elif damage == "cut inside the prefix":
            f.truncate(valid_end + 10)
        else:  # the file grew but the record's blocks never reached the disk
            f.seek(valid_end)
            f.write(bytes(record_len(2)))

    restarted = UndoJournal(tmp_path / "j", arrays.tensors)
    assert restarted.rollback() == 2
    assert arrays.equals(committed)
    assert os.path.getsize(tmp_path / "j") == valid_end  # the torn tail is cut off

    # records appended now follow the valid ones, and still restore after another crash
    protect_and_write(restarted, arrays, [3, 15], new_rows=1)
    restarted.close()
    again = UndoJournal(tmp_path / "j", arrays.tensors)
    assert again.rollback() == 3
    assert arrays.equals(committed)
    again.close()


@pytest.mark.parametrize("where", ["values", "magic"])
def test_damaged_middle_record_is_refused(tmp_path, arrays, where):
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    protect_and_write(journal, arrays, [1], new_rows=1)
    middle = os.path.getsize(tmp_path / "j")
    protect_and_write(journal, arrays, [2, 3], new_rows=2)
    protect_and_write(journal, arrays, [4], new_rows=1)
    journal.close()
    crashed = arrays.snapshot()

    offset = middle + (60 if where == "values" else 2)
    with open(tmp_path / "j", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    size = os.path.getsize(tmp_path / "j")

    restarted = UndoJournal(tmp_path / "j", arrays.tensors)
    with pytest.raises(JournalError, match=f"record at byte {middle} is damaged but later records are intact"):
        restarted.rollback()
    assert arrays.equals(crashed)  # nothing was half restored
    assert os.path.getsize(tmp_path / "j") == size  # and the evidence is kept
    restarted.close()


def test_bad_rows_are_refused(tmp_path, arrays):
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    size = os.path.getsize(tmp_path / "j")
    with pytest.raises(ValueError, match=r"rows contains id 20, outside the valid range \[0, 20\)"):
        journal.protect(torch.tensor([0, R]))
    with pytest.raises(ValueError, match="id -1"):
        journal.protect(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer ids"):
        journal.protect(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="1 dimensions"):
        journal.protect(torch.tensor([[1, 2]]))
    assert os.path.getsize(tmp_path / "j") == size
    assert journal.pending_rows == 0
    journal.close()


def test_journal_of_other_arrays(tmp_path, arrays):
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    protect_and_write(journal, arrays, [1], new_rows=1)
    journal.close()
    crashed = arrays.snapshot()

    weight_only = {"weight": arrays.tensors["weight"]}
    other = UndoJournal(tmp_path / "j", weight_only)
    with pytest.raises(JournalError, match="written for other arrays than those given"):
        other.rollback()
    with pytest.raises(JournalError, match=r"rollback\(\)"):
        other.protect(torch.tensor([2]))
    assert arrays.equals(crashed)
    other.close()

    # committing starts the journal over for the arrays given; an empty journal is reused for other arrays
    other = UndoJournal(tmp_path / "j", weight_only)
    other.commit()
    header_len = os.path.getsize(tmp_path / "j")
    other.protect(torch.tensor([2, 3]))
    assert os.path.getsize(tmp_path / "j") == header_len + 20 + 2 * 8 + 2 * D * 4 + 32
    arrays.write([2, 3])
    assert other.rollback() == 2
    assert torch.equal(arrays.tensors["weight"], crashed["weight"])
    arrays.flush()
    other.commit()
    other.close()
    reused = UndoJournal(tmp_path / "j", arrays.tensors)
    assert os.path.getsize(tmp_path / "j") > header_len  # rewritten with the header of four arrays
    protect_and_write(reused, arrays, [5, 5], new_rows=1)
    assert reused.rollback() == 1
    assert torch.equal(arrays.tensors["weight"], crashed["weight"])
    reused.close()


def test_refusals_at_construction(tmp_path, arrays):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a journal\n")
    with pytest.raises(JournalError, match="not an engram undo journal"):
        UndoJournal(foreign, arrays.tensors)
    assert foreign.read_text() == "not a journal\n"

    with pytest.raises(JournalError, match="same number of rows"):
        UndoJournal(tmp_path / "j", {"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(JournalError, match="non-empty dict"):
        UndoJournal(tmp_path / "j", {})
    assert not (tmp_path / "j").exists()


def test_saved_rows_bitmap_matches_a_set():
    """The journal's bitmap of saved rows against a plain Python set, with rows sharing bytes and the last row."""
    num_rows = 37  # not a multiple of 8: the last byte is partly used
    saved, reference = SavedRows(num_rows), set()
    assert saved.bits.numel() == 5  # one bit per row
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = torch.randint(0, num_rows, (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator)
        rows = torch.cat([rows, torch.tensor([num_rows - 1])])
        assert saved.contains(rows).tolist() == [int(r) in reference for r in rows]
        new = torch.unique(rows[~saved.contains(rows)])  # as protect() adds them: distinct, not yet saved
        saved.add(new)
        reference.update(new.tolist())
        assert saved.contains(torch.arange(num_rows)).tolist() == [r in reference for r in range(num_rows)]
        if len(reference) > 30:
            saved.clear()
            reference.clear()


def test_after_a_crash_the_rebuilt_bitmap_saves_each_row_once(tmp_path, arrays):
    journal = UndoJournal(tmp_path / "j", arrays.tensors)
    committed = arrays.snapshot()
    protect_and_write(journal, arrays, list(range(8)), new_rows=8)  # a whole byte of the bitmap
    protect_and_write(journal, arrays, [8, 19, 0], new_rows=2)  # 19: the last row, in the last byte
    journal.close()

    restarted = UndoJournal(tmp_path / "j", arrays.tensors)  # a new process: the bitmap comes from the records
    assert restarted.rollback() == 10
    assert arrays.equals(committed)
    assert restarted.pending_rows == 10
    # rows saved before the crash are not saved again; their neighbours in the same bytes are
    protect_and_write(restarted, arrays, [3, 9, 19, 18, 8], new_rows=2)
    assert restarted.pending_rows == 12
    assert restarted.rollback() == 12
    assert arrays.equals(committed)
    restarted.commit()
    protect_and_write(restarted, arrays, [3, 19], new_rows=2)  # a commit empties the bitmap
    restarted.close()
