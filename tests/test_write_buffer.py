"""The write-back buffer against a plain model of the arrays it stands in front of."""

from __future__ import annotations

import pytest
import torch

from engram.storage.write_buffer import WriteBuffer


def _arrays(rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(rows, 4, generator=generator),
        "exp_avg": torch.randn(rows, 4, generator=generator),
        "row_step": torch.randint(0, 9, (rows,), generator=generator),
    }


@pytest.mark.parametrize("slots", [1, 7, 64])
def test_reads_see_every_write_and_write_back_leaves_the_arrays_right(slots):
    backing = _arrays(100)
    logical = {name: array.clone() for name, array in backing.items()}  # what the arrays should read as
    slot_bytes = 8 + 4 * 4 + 4 * 4 + 8
    written_back = []

    def before_write_back(rows: torch.Tensor) -> None:
        # The callback runs before the backing rows change: they still hold their old values.
        written_back.append(rows.clone())
        assert len(set(rows.tolist())) == rows.numel()

    buffer = WriteBuffer(backing, slots * slot_bytes, before_write_back)
    assert buffer.num_slots == slots
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
        assert buffer.buffered_rows <= slots
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

    buffer = WriteBuffer(backing, 2 * (8 + 16 + 16 + 8), before_write_back)
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

    buffer = WriteBuffer(backing, 4 * (8 + 16 + 16 + 8), read_rows=read_rows)
    buffer.write("weight", torch.tensor([1, 2]), torch.ones(2, 4))  # a claim loads every array of its rows
    assert sorted(reads) == [("exp_avg", [1, 2]), ("row_step", [1, 2]), ("weight", [1, 2])]
    reads.clear()
    assert torch.equal(buffer.read("exp_avg", torch.tensor([1, 3, 2])), backing["exp_avg"][[1, 3, 2]])
    assert reads == [("exp_avg", [3])]  # only the row that is not buffered

    with pytest.raises(ValueError, match="row 5 is damaged"):
        buffer.write("weight", torch.tensor([5]), torch.zeros(1, 4))  # row 5 would displace row 1 (slot 1)
    assert buffer.buffered_rows == 2
    assert torch.equal(buffer.read("weight", torch.tensor([1, 2])), torch.ones(2, 4))  # still buffered
    for name in backing:
        assert torch.equal(backing[name], snapshot[name]), name  # row 1 was not written back
