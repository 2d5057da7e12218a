"""The table storage interface, on the device tier."""

from __future__ import annotations

import pytest
import torch

from engram import DeviceTable


def test_lookup_read_and_sparse_update():
    torch.manual_seed(0)
    table = DeviceTable(50, 4, init_std=0.5)
    before = table.weight.detach().clone()
    idx = torch.tensor([[3, 7], [7, 49]])
    assert torch.equal(table.lookup(idx), before[idx])
    assert torch.equal(table.read_rows(torch.tensor([49, 0])), before[[49, 0]])

    delta = torch.arange(12, dtype=torch.float32).view(3, 4)
    table.apply_sparse_update(torch.tensor([7, 2, 7]), delta)  # row 7 twice: the deltas add up
    after = table.weight.detach()
    expected = before.clone()
    expected[7] += delta[0] + delta[2]
    expected[2] += delta[1]
    assert torch.equal(after, expected)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[[2, 7]] = False
    assert torch.equal(after[untouched], before[untouched])


def test_init_std_and_dtype():
    torch.manual_seed(0)
    table = DeviceTable(20_000, 8, init_std=0.02, dtype=torch.float64)
    assert table.weight.dtype == torch.float64
    assert abs(table.weight.std().item() - 0.02) < 0.001


def test_bad_rows_and_shapes_are_refused():
    table = DeviceTable(10, 3)
    with pytest.raises(ValueError, match=r"rows contains id 10, outside the valid range \[0, 10\)"):
        table.read_rows(torch.tensor([10]))
    with pytest.raises(ValueError, match="id -1"):
        table.apply_sparse_update(torch.tensor([-1]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 3\)"):
        table.apply_sparse_update(torch.tensor([1, 2]), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="integer ids"):
        table.read_rows(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_rows >= 1"):
        DeviceTable(0, 3)
