"""The table storage interfaces, on the device tier, and what every tier implements of them."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from engram import DeviceTable
from engram.storage import (
    DiskTable,
    Durable,
    HostTable,
    LocalTable,
    OffloadedTable,
    ShardedTable,
    TableStorage,
    durable,
)
from engram.training import RowAdam


def test_lookup_read_and_write_rows():
    torch.manual_seed(0)
    table = DeviceTable(50, 4, init_std=0.5)
    before = table.weight.detach().clone()
    idx = torch.tensor([[3, 7], [7, 49]])
    assert torch.equal(table.lookup(idx), before[idx])
    assert torch.equal(table.read_rows(torch.tensor([49, 0])), before[[49, 0]])

    values = torch.arange(8, dtype=torch.float32).view(2, 4)
    table.write_rows(torch.tensor([7, 2]), values)
    after = table.weight.detach()
    expected = before.clone()
    expected[[7, 2]] = values
    assert torch.equal(after, expected)  # only rows 7 and 2 changed


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
        table.write_rows(torch.tensor([-1]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"values must have shape \(2, 3\)"):
        table.write_rows(torch.tensor([1, 2]), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="integer ids"):
        table.read_rows(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_rows >= 1"):
        DeviceTable(0, 3)


# -- the three interfaces: TableStorage (the layer's table), LocalTable (what a row optimizer updates), Durable ------
TABLE_CLASSES = [TableStorage, LocalTable, Durable, DeviceTable, OffloadedTable, HostTable, DiskTable, ShardedTable]


def _class_ast(cls: type) -> ast.ClassDef:
    return ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]


@pytest.mark.parametrize("cls", TABLE_CLASSES, ids=lambda cls: cls.__name__)
def test_no_table_method_refuses_what_its_interface_promises(cls):
    """No method raises NotImplementedError or says "not supported": a table implements all of its interfaces."""
    for node in ast.walk(_class_ast(cls)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            assert not (isinstance(exc, ast.Name) and exc.id == "NotImplementedError"), (
                f"{cls.__name__}, line {node.lineno}"
            )
            text = ast.unparse(node.exc).lower()
            assert "not supported" not in text and "not implemented" not in text, f"{cls.__name__}: {text}"


@pytest.mark.parametrize("cls", [TableStorage, LocalTable, Durable], ids=lambda cls: cls.__name__)
def test_the_interfaces_read_only_attributes_they_define(cls):
    """Every ``self.<name>`` an interface's methods read is defined by it, its ancestors or ``nn.Module``."""
    defined = set(dir(torch.nn.Module))
    for ancestor in cls.__mro__:
        if ancestor.__module__ != cls.__module__:
            continue
        tree = _class_ast(ancestor)
        defined |= {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        defined |= {
            target.attr
            for node in ast.walk(tree)
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
        }
    read = {
        node.attr
        for node in ast.walk(_class_ast(cls))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    }
    assert read <= defined, sorted(read - defined)


def test_only_the_disk_tier_is_durable(tmp_path):
    device, host = DeviceTable(10, 3), HostTable(10, 3)
    disk = DiskTable(tmp_path / "t", 10, 3)
    assert [durable(table) for table in (device, host, disk)] == [None, None, disk]
    for table in (device, host):
        assert not isinstance(table, Durable)
        assert not any(hasattr(table, name) for name in Durable.__abstractmethods__)
    assert all(table.local_shard() is table for table in (device, host, disk))


def test_a_sharded_table_has_the_durability_of_its_local_shard(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        disk = DiskTable(tmp_path / "t", 10, 3)
        on_disk, in_memory = ShardedTable(10, 3, disk), ShardedTable(10, 3, HostTable(10, 3))
        assert on_disk.local_shard() is disk and durable(on_disk) is disk
        assert durable(in_memory) is None
        for table in (on_disk, in_memory):  # the sharded table itself forwards nothing: checkpoints ask durable()
            assert not isinstance(table, Durable) and not hasattr(table, "prepare_checkpoint")
        with pytest.raises(TypeError, match="must be a LocalTable"):
            ShardedTable(10, 3, on_disk)
    finally:
        dist.destroy_process_group()


class _ListTable(LocalTable):
    """A tier of its own, with nothing but the abstract methods: rows in a plain tensor, looked up densely."""

    def __init__(self, rows: torch.Tensor):
        super().__init__(*rows.shape)
        self.rows = rows
        self._looked_up: list[tuple[torch.Tensor, torch.Tensor]] = []

    weight = property(lambda self: self.rows)
    dtype = property(lambda self: self.rows.dtype)
    home_device = property(lambda self: self.rows.device)

    def lookup(self, indices, prefetched=None):
        leaf = self.rows.index_select(0, indices.flatten()).requires_grad_()
        self._looked_up.append((indices.flatten(), leaf))
        return leaf.view(*indices.shape, self.dim)

    def take_row_grad(self):
        grads = [(rows, leaf.grad) for rows, leaf in self._looked_up if leaf.grad is not None]
        self._looked_up = []
        if not grads:
            return None
        rows = torch.cat([rows for rows, _ in grads])
        values = torch.cat([grad for _, grad in grads])
        total = torch.sparse_coo_tensor(rows[None], values, (self.num_rows, self.dim), check_invariants=True).coalesce()
        return total.indices()[0], total.values()

    def zero_row_grad(self):
        self._looked_up = []

    def gather(self, rows):
        return self.rows.index_select(0, rows)

    def scatter(self, rows, values):
        self.rows.index_copy_(0, rows, values.to(self.rows.dtype))

    def _new_row_state(self, name, row_shape, dtype):
        return torch.zeros(self.num_rows, *row_shape, dtype=dtype)


def test_a_new_tier_needs_only_the_abstract_methods():
    """Checked row access, row state and the row optimizer come with ``LocalTable``: a tier implements the rest."""
    torch.manual_seed(1)
    start = torch.randn(20, 4)
    mine, reference = _ListTable(start.clone()), DeviceTable(20, 4, sparse_grad=True)
    reference.write_rows(torch.arange(20), start)
    assert durable(mine) is None and mine.prefetch(torch.tensor([1])) is None and mine.local_shard() is mine
    with pytest.raises(ValueError, match="id 20"):
        mine.read_rows(torch.tensor([20]))
    optimizers = [RowAdam([mine], lr=0.1), RowAdam([reference], lr=0.1)]
    indices, target = torch.tensor([[3, 5], [5, 19]]), torch.randn(2, 2, 4)
    for table, optimizer in zip((mine, reference), optimizers, strict=True):
        (table(indices) * target).sum().backward()
        optimizer.step()
    assert torch.equal(mine.read_rows(torch.arange(20)), reference.read_rows(torch.arange(20)))
    assert torch.equal(mine.row_states()["row_step"], reference.row_states()["row_step"])
