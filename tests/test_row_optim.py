"""RowAdam against a per-row float64 Adam loop and torch.optim.AdamW, on tables of every local tier and on a real
Engram layer; and the row optimizers' step, which trusts the rows ``take_row_grad`` returns (no checks of its own)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engram import DeviceTable, Engram, EngramConfig, NgramHasher, engram_table_sizes
from engram.storage import DiskTable, HostTable, LocalTable
from engram.training import RowAdagrad, RowAdam

SMALL = dict(layer_ids=[1, 4], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, engram_vocab_size=[31, 37])

# Rows of a 12-row table touched in four steps: duplicates within a step (3 in step 0, 5 in step 1), rows seen in
# some steps only (0, 3, 7, 11, ...), row 7 looked up in step 2 with duplicates that cancel (a zero gradient after
# a non-zero history), row 2 first looked up with a zero gradient; rows 1, 4, 6, 8, 10 never touched.
STEP_ROWS = [[0, 3, 3, 7, 11], [3, 5, 5, 5, 0], [7, 2, 7, 2], [3, 11, 0, 9, 9]]
CANCELLING = {2: [7, 2]}  # step -> rows whose entries in that step sum to exactly zero
NEVER = [1, 4, 6, 8, 10]


def _table(tier: str, weight: torch.Tensor, tmp_path=None, **options) -> LocalTable:
    """A table of ``tier`` holding ``weight`` (R, D), in training mode."""
    rows, dim = weight.shape
    if tier == "device":
        table = DeviceTable(rows, dim, dtype=weight.dtype, sparse_grad=True, **options)
    elif tier == "host":
        table = HostTable(rows, dim, dtype=weight.dtype, **options)
    else:
        table = DiskTable(tmp_path / "table", rows, dim, dtype=weight.dtype, init_std=0.0, **options)
    table.write_rows(torch.arange(rows), weight)
    return table.train()


def _backward(table: LocalTable, rows: list[int], values: torch.Tensor) -> None:
    """Give lookup i of row ``rows[i]`` the gradient ``values[i]`` (a row looked up twice gets the sum)."""
    (table(torch.tensor(rows)) * values.to(table.dtype)).sum().backward()


def _step_values(step: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    rows = STEP_ROWS[step]
    values = torch.randn(len(rows), dim, generator=generator, dtype=torch.float64)
    for row in CANCELLING.get(step, []):
        first, second = [i for i, r in enumerate(rows) if r == row]
        values[second] = -values[first]
    return values


def _reference(p0: np.ndarray, grads: list[dict[int, np.ndarray]], lr, betas, eps, weight_decay):
    """Per row, plain Adam(W) over only the steps in which that row was touched (float64, no vectorisation)."""
    b1, b2 = betas
    p = p0.copy()
    m, v, t = np.zeros_like(p0), np.zeros_like(p0), np.zeros(p0.shape[0], dtype=np.int64)
    for row in range(p0.shape[0]):
        sequence = [g[row] for g in grads if row in g]  # this row's gradients, in order
        for k, g in enumerate(sequence, start=1):
            for j in range(p0.shape[1]):
                m[row, j] = b1 * m[row, j] + (1 - b1) * g[j]
                v[row, j] = b2 * v[row, j] + (1 - b2) * g[j] * g[j]
                m_hat = m[row, j] / (1 - b1**k)
                v_hat = v[row, j] / (1 - b2**k)
                p[row, j] -= lr * weight_decay * p[row, j]
                p[row, j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
        t[row] = len(sequence)
    return p, m, v, t


@pytest.mark.parametrize("tier", ["device", "host"])
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        dict(lr=0.05, betas=(0.7, 0.95), eps=1e-3, weight_decay=0.3),
    ],
)
def test_touched_rows_follow_per_row_adam(tier, hyper):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    table = _table(tier, p0)
    opt = RowAdam([table], **hyper)
    grads = []
    for step in range(len(STEP_ROWS)):
        values = _step_values(step, 3, gen)
        summed: dict[int, np.ndarray] = {}
        for row, value in zip(STEP_ROWS[step], values.numpy(), strict=True):
            summed[row] = summed.get(row, 0.0) + value
        grads.append(summed)
        opt.zero_grad()
        _backward(table, STEP_ROWS[step], values)
        opt.step()

    p_ref, m_ref, v_ref, t_ref = _reference(p0.numpy(), grads, **hyper)
    state = table.row_states()
    tol = dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(table.read_rows(torch.arange(12)), torch.from_numpy(p_ref), **tol)
    torch.testing.assert_close(state["exp_avg"], torch.from_numpy(m_ref), **tol)
    torch.testing.assert_close(state["exp_avg_sq"], torch.from_numpy(v_ref), **tol)
    assert torch.equal(state["row_step"], torch.from_numpy(t_ref))
    assert state["row_step"].tolist() == [3, 0, 1, 3, 0, 1, 0, 2, 0, 1, 0, 2]
    # Zero-gradient lookups count: row 7 (history, then cancelling entries) moved and its m decayed.
    assert grads[2][7].tolist() == [0.0] * 3 and grads[2][2].tolist() == [0.0] * 3
    assert torch.equal(table.read_rows(torch.tensor(NEVER)), p0[NEVER])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_equals_dense_adamw_on_the_touched_rows(dtype, n_steps):
    """With the same rows each step, every touched row's count equals AdamW's global step."""
    torch.manual_seed(1)
    hyper = dict(lr=0.02, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1)
    rows = [4, 9, 4, 0, 17, 9, 9]  # duplicates, unsorted
    touched = sorted(set(rows))
    table = _table("device", torch.randn(20, 5, dtype=dtype))
    dense = table.weight.detach()[touched].clone().requires_grad_()
    opt = RowAdam([table], **hyper)
    ref = torch.optim.AdamW([dense], **hyper)
    for _ in range(n_steps):
        values = torch.randn(len(rows), 5, dtype=dtype)
        _backward(table, rows, values)
        dense.grad = table.weight.grad.coalesce().to_dense()[touched]
        opt.step()
        ref.step()
    torch.testing.assert_close(table.read_rows(torch.tensor(touched)), dense.detach())
    torch.testing.assert_close(table.row_states()["exp_avg"][touched], ref.state[dense]["exp_avg"])
    torch.testing.assert_close(table.row_states()["exp_avg_sq"][touched], ref.state[dense]["exp_avg_sq"])


def test_float32_bias_correction_is_accurate():
    """In float32, 1 - 0.999**1 computed naively is off by ~1e-5 relative; the step must not inherit that."""
    torch.manual_seed(9)
    table = _table("host", torch.zeros(6, 8))  # zero rows, no weight decay: after one step the row is the update
    exact = torch.zeros(3, 8, dtype=torch.float64, requires_grad=True)
    opt = RowAdam([table], lr=1.0)
    ref = torch.optim.AdamW([exact], lr=1.0, weight_decay=0.0)
    values = torch.randn(3, 8)
    _backward(table, [0, 2, 5], values)
    exact.grad = values.double()
    opt.step()
    ref.step()
    torch.testing.assert_close(table.read_rows(torch.tensor([0, 2, 5])), exact.detach().float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_untouched_rows_and_their_state_are_bit_identical(tier, tmp_path):
    torch.manual_seed(3)
    table = _table(tier, torch.randn(30, 4), tmp_path, **({"write_buffer_bytes": 4096} if tier == "disk" else {}))
    opt = RowAdam([table], lr=0.1, weight_decay=0.2)
    _backward(table, [0, 5, 5, 29, 12], torch.randn(5, 4))
    opt.step()
    before = table.read_rows(torch.arange(30))
    state_before = {k: v.clone() for k, v in table.row_states().items()}

    step_rows = [5, 7, 7, 20]  # 5 seen before, 7 and 20 new; 0, 12, 29 seen before but not now
    _backward(table, step_rows, torch.randn(4, 4))
    opt.step()
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[step_rows] = False
    after = table.read_rows(torch.arange(30))
    assert torch.equal(after[untouched], before[untouched])
    for key, value in table.row_states().items():
        assert torch.equal(value[untouched], state_before[key][untouched]), key
    assert not torch.equal(after[~untouched], before[~untouched])
    assert table.row_states()["row_step"][[0, 5, 7, 12, 20, 29]].tolist() == [1, 2, 1, 1, 1, 1]


def test_end_to_end_with_an_engram_layer_changes_exactly_the_looked_up_rows():
    torch.manual_seed(4)
    config = EngramConfig(**SMALL)
    sizes = engram_table_sizes(
        config.layer_ids, config.max_ngram_size, config.n_head_per_ngram, config.engram_vocab_size
    )
    num_rows = sum(p for order in sizes[4] for p in order)
    layer = Engram(config, layer_id=4, hidden_size=6, storage=DeviceTable(num_rows, config.head_dim, sparse_grad=True))
    hasher = NgramHasher(config.layer_ids, 3, 2, config.engram_vocab_size, 90, pad_id=0)
    hash_ids = hasher.hash(torch.randint(0, 90, (2, 9)), 4)
    hidden = torch.randn(2, 9, 6)

    before = layer.table.weight.detach().clone()
    opt = RowAdam([layer.table], lr=1e-2)
    layer(hidden, hash_ids=hash_ids).square().sum().backward()
    assert layer.table.weight.grad.is_sparse
    opt.step()

    looked_up = torch.unique(hash_ids + layer.offsets)
    changed = (layer.table.weight.detach() != before).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, looked_up)
    assert torch.equal(layer.table.row_states()["row_step"].nonzero().squeeze(1), looked_up)
    assert looked_up.numel() < num_rows


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(5)
    hyper = dict(lr=0.03, betas=(0.8, 0.98), weight_decay=0.05)
    start = [torch.randn(40, 3), torch.randn(25, 3)]
    tables = [_table("host", weight) for weight in start]
    opt_a = RowAdam(tables, **hyper)
    steps = [[(rows, torch.randn(len(rows), 3)) for rows in ([1, 5, 5, 39, k], [0, 24, k])] for k in range(5)]

    def run(opt, chunk):
        for step in chunk:
            for table, (rows, values) in zip(opt.tables, step, strict=True):
                _backward(table, rows, values)
            opt.step()

    run(opt_a, steps[:3])
    tables[0].row_states()["row_step"][33] = 2**24 + 1  # not representable in float32
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    copies = [_table("host", table.read_rows(torch.arange(table.num_rows))) for table in tables]
    buffer.seek(0)
    opt_b = RowAdam(copies, lr=1.0)
    opt_b.load_state_dict(torch.load(buffer))
    assert opt_b.param_groups[0]["lr"] == 0.03
    for table, copy in zip(tables, copies, strict=True):
        assert copy.row_states()["row_step"].dtype == torch.int64
        assert torch.equal(copy.row_states()["row_step"], table.row_states()["row_step"])

    run(opt_a, steps[3:])
    run(opt_b, steps[3:])
    for table, copy in zip(tables, copies, strict=True):
        assert torch.equal(table.weight, copy.weight)
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert torch.equal(table.row_states()[key], copy.row_states()[key]), key


def test_a_dense_gradient_is_refused_before_any_row_changes():
    torch.manual_seed(6)
    config = EngramConfig(**SMALL)
    layer = Engram(config, layer_id=1, hidden_size=6)  # built plainly: a device table with a dense gradient
    other = _table("host", torch.randn(5, 2))
    opt = RowAdam([other, layer.table])
    _backward(other, [1], torch.ones(1, 2))
    hasher = NgramHasher(config.layer_ids, 3, 2, config.engram_vocab_size, 90, pad_id=0)
    layer(torch.randn(1, 4, 6), hash_ids=hasher.hash(torch.randint(0, 90, (1, 4)), 1)).sum().backward()
    before = other.read_rows(torch.arange(5))
    with pytest.raises(RuntimeError, match=r"sparse_grad=True"):
        opt.step()
    assert torch.equal(other.read_rows(torch.arange(5)), before)  # the refused step updated no table
    assert not other.row_states()["row_step"].any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1e-3), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "pair"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RowAdam([DeviceTable(3, 2)], **kwargs)


def test_only_tables_are_accepted():
    with pytest.raises(TypeError, match="TableStorage tables, got Tensor"):
        RowAdam([torch.zeros(3, 2)])
    with pytest.raises(TypeError, match="TableStorage tables, got Parameter"):
        RowAdagrad([DeviceTable(3, 2).weight])


def test_half_precision_tables_keep_their_dtype():
    torch.manual_seed(8)
    start = torch.randn(10, 4)
    table, half = _table("host", start), _table("host", start.to(torch.bfloat16))
    opt, opt_half = RowAdam([table], lr=0.1), RowAdam([half], lr=0.1)
    values = torch.randn(2, 4)
    _backward(table, [2, 7], values)
    _backward(half, [2, 7], values)
    opt.step()
    opt_half.step()
    assert half.dtype == half.row_states()["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(half.weight.float(), table.weight, rtol=2e-2, atol=2e-2)


class _Ops(TorchDispatchMode):
    """Records every op's name and the largest dense, non-mutating op output (mutated state tensors are not
    temporaries)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.add(func._schema.name)
        if not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    self.largest = max(self.largest, t.numel())
        return out


def test_a_step_costs_the_touched_rows_not_the_table():
    rows = [999_999, 3, 500_000, 42, 7, 123_456, 8, 9, 10, 77]
    table = DeviceTable(1_000_000, 4, init_std=0.0, sparse_grad=True).train()
    opt = RowAdam([table])
    _backward(table, rows, torch.randn(10, 4))
    opt.step()
    row_step = table.row_states()["row_step"]
    assert int(row_step.sum()) == 10
    assert row_step[rows].tolist() == [1] * 10

    # A second step (state allocated): no op produces a temporary anywhere near the table's size.
    _backward(table, [3, 3, 11], torch.randn(3, 4))
    with _Ops() as ops:
        opt.step()
    assert 0 < ops.largest <= 3 * 4
    assert int(row_step.sum()) == 12 and row_step[[3, 11]].tolist() == [2, 1]


@pytest.mark.parametrize("tier", ["device", "host"])
@pytest.mark.parametrize("optimizer", [RowAdam, RowAdagrad])
def test_the_step_does_not_check_the_rows_take_row_grad_gave_it(tier, optimizer):
    """The rows of ``take_grads`` are distinct, sorted and in range by construction: the update reads and writes
    them without a range check (a reduction, and on a GPU a wait for it) or any other read back to the host."""
    torch.manual_seed(10)
    table = _table(tier, torch.randn(50, 4), **({"cache_bytes": 4096} if tier == "host" else {}))
    opt = optimizer([table])
    table(torch.tensor([[1, 7, 7], [40, 1, 3]]))  # rows in the hot-row cache: the step writes through it
    _backward(table, [1, 7, 7, 40, 3], torch.randn(5, 4))
    grads = opt.take_grads()
    with _Ops() as ops:
        opt.step(grads)
    checks = {"aten::aminmax", "aten::min", "aten::max", "aten::_unique2", "aten::unique_dim", "aten::any"}
    assert not ops.names & checks, ops.names & checks
    assert "aten::_local_scalar_dense" not in ops.names  # no .item(), int(), bool() of a tensor
    assert table.row_states()[next(iter(table.row_states()))].any()  # the step did update
