"""SparseRowAdam against a per-row float64 Adam loop and torch.optim.AdamW, on its own and on a real Engram table."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engram import DeviceTable, Engram, EngramConfig, NgramHasher, engram_table_sizes
from engram.training.sparse_adam import SparseRowAdam

SMALL = dict(layer_ids=[1, 4], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, engram_vocab_size=[31, 37])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Rows of a 12-row table touched in four steps: duplicates within a step (3 in step 0, 5 in step 1), rows seen in
# some steps only (0, 3, 7, 11, ...), row 7 looked up in step 2 with duplicates that cancel (a zero gradient after
# a non-zero history), row 2 first looked up with a zero gradient; rows 1, 4, 6, 8, 10 never touched.
STEP_ROWS = [[0, 3, 3, 7, 11], [3, 5, 5, 5, 0], [7, 2, 7, 2], [3, 11, 0, 9, 9]]
CANCELLING = {2: [7, 2]}  # step -> rows whose entries in that step sum to exactly zero
NEVER = [1, 4, 6, 8, 10]


def _sparse(rows: list[int], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An uncoalesced sparse COO gradient, as F.embedding(sparse=True) produces: one entry per lookup."""
    index = torch.tensor(rows, dtype=torch.long, device=values.device).unsqueeze(0)
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=True)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        dict(lr=0.05, betas=(0.7, 0.95), eps=1e-3, weight_decay=0.3),
    ],
)
def test_touched_rows_follow_per_row_adam(device, hyper):
    gen = torch.Generator().manual_seed(0)
    shape = (12, 3)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    param = p0.clone().to(device)
    opt = SparseRowAdam([param], **hyper)
    grads = []
    for step in range(len(STEP_ROWS)):
        values = _step_values(step, shape[1], gen)
        summed: dict[int, np.ndarray] = {}
        for row, value in zip(STEP_ROWS[step], values.numpy(), strict=True):
            summed[row] = summed.get(row, 0.0) + value
        grads.append(summed)
        param.grad = _sparse(STEP_ROWS[step], values.to(device), shape)
        opt.step()

    p_ref, m_ref, v_ref, t_ref = _reference(p0.numpy(), grads, **hyper)
    state = opt.state[param]
    tol = dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(param.cpu(), torch.from_numpy(p_ref), **tol)
    torch.testing.assert_close(state["exp_avg"].cpu(), torch.from_numpy(m_ref), **tol)
    torch.testing.assert_close(state["exp_avg_sq"].cpu(), torch.from_numpy(v_ref), **tol)
    assert torch.equal(state["row_step"].cpu(), torch.from_numpy(t_ref))
    assert state["row_step"].tolist() == [3, 0, 1, 3, 0, 1, 0, 2, 0, 1, 0, 2]
    # Zero-gradient lookups count: row 7 (history, then cancelling entries) moved and its m decayed.
    assert grads[2][7].tolist() == [0.0] * 3 and grads[2][2].tolist() == [0.0] * 3
    assert torch.equal(param[NEVER].cpu(), p0[NEVER])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_equals_dense_adamw_on_the_touched_rows(dtype, n_steps):
    """With the same rows each step, every touched row's count equals AdamW's global step."""
    torch.manual_seed(1)
    hyper = dict(lr=0.02, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1)
    rows = [4, 9, 4, 0, 17, 9, 9]  # duplicates, unsorted
    touched = sorted(set(rows))
    table = torch.randn(20, 5, dtype=dtype)
    dense = table[touched].clone()
    opt = SparseRowAdam([table], **hyper)
    ref = torch.optim.AdamW([dense], **hyper)
    for _ in range(n_steps):
        values = torch.randn(len(rows), 5, dtype=dtype)
        table.grad = _sparse(rows, values, tuple(table.shape))
        dense.grad = table.grad.coalesce().to_dense()[touched]
        opt.step()
        ref.step()
    torch.testing.assert_close(table[touched], dense)
    torch.testing.assert_close(opt.state[table]["exp_avg"][touched], ref.state[dense]["exp_avg"])
    torch.testing.assert_close(opt.state[table]["exp_avg_sq"][touched], ref.state[dense]["exp_avg_sq"])


def test_float32_bias_correction_is_accurate():
    """In float32, 1 - 0.999**1 computed naively is off by ~1e-5 relative; the step must not inherit that."""
    torch.manual_seed(9)
    table = torch.zeros(6, 8)  # zero parameters and no weight decay: after one step the parameter is the update
    exact = torch.zeros(3, 8, dtype=torch.float64)
    opt = SparseRowAdam([table], lr=1.0)
    ref = torch.optim.AdamW([exact], lr=1.0, weight_decay=0.0)
    table.grad = _sparse([0, 2, 5], torch.randn(3, 8), (6, 8))
    exact.grad = table.grad.to_dense()[[0, 2, 5]].double()
    opt.step()
    ref.step()
    torch.testing.assert_close(table[[0, 2, 5]], exact.float(), rtol=1e-6, atol=0)


def test_param_groups_use_their_own_hyperparameters():
    torch.manual_seed(2)
    a, b = torch.randn(6, 2), torch.randn(6, 2)
    dense_a, dense_b = a[[1, 3]].clone(), b[[1, 3]].clone()
    opt = SparseRowAdam([{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b]}], lr=0.01)
    ref = torch.optim.AdamW(
        [{"params": [dense_a], "lr": 0.1, "weight_decay": 0.5}, {"params": [dense_b]}], lr=0.01, weight_decay=0.0
    )
    for p, d in ((a, dense_a), (b, dense_b)):
        values = torch.randn(2, 2)
        p.grad = _sparse([1, 3], values, (6, 2))
        d.grad = values.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(a[[1, 3]], dense_a)
    torch.testing.assert_close(b[[1, 3]], dense_b)


def test_untouched_rows_and_their_state_are_bit_identical():
    torch.manual_seed(3)
    table = torch.randn(30, 4)
    opt = SparseRowAdam([table], lr=0.1, weight_decay=0.2)
    table.grad = _sparse([0, 5, 5, 29, 12], torch.randn(5, 4), (30, 4))
    opt.step()
    before = table.clone()
    state_before = {k: v.clone() for k, v in opt.state[table].items()}

    step_rows = [5, 7, 7, 20]  # 5 seen before, 7 and 20 new; 0, 12, 29 seen before but not now
    table.grad = _sparse(step_rows, torch.randn(4, 4), (30, 4))
    opt.step()
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[step_rows] = False
    assert torch.equal(table[untouched], before[untouched])
    for key, value in opt.state[table].items():
        assert torch.equal(value[untouched], state_before[key][untouched]), key
    assert not torch.equal(table[~untouched], before[~untouched])
    assert opt.state[table]["row_step"][[0, 5, 7, 12, 20, 29]].tolist() == [1, 2, 1, 1, 1, 1]


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

    weight = layer.table.weight
    before = weight.detach().clone()
    opt = SparseRowAdam([weight], lr=1e-2)
    layer(hidden, hash_ids=hash_ids).square().sum().backward()
    assert weight.grad.is_sparse
    opt.step()

    looked_up = torch.unique(hash_ids + layer.offsets)
    changed = (weight.detach() != before).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, looked_up)
    assert torch.equal(opt.state[weight]["row_step"].nonzero().squeeze(1), looked_up)
    assert looked_up.numel() < num_rows


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(5)
    hyper = dict(lr=0.03, betas=(0.8, 0.98), weight_decay=0.05)
    first, second = torch.randn(40, 3), torch.randn(25, 3)
    opt_a = SparseRowAdam([{"params": [first], "lr": 0.1}, {"params": [second]}], **hyper)
    steps = [[(rows, torch.randn(len(rows), 3)) for rows in ([1, 5, 5, 39, k], [0, 24, k])] for k in range(5)]

    def run(opt, params, chunk):
        for step in chunk:
            for p, (rows, values) in zip(params, step, strict=True):
                p.grad = _sparse(rows, values.clone(), tuple(p.shape))
            opt.step()

    run(opt_a, [first, second], steps[:3])
    opt_a.state[first]["row_step"][33] = 2**24 + 1  # not representable in float32
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    copies = [first.clone(), second.clone()]
    buffer.seek(0)
    opt_b = SparseRowAdam([{"params": [copies[0]]}, {"params": [copies[1]]}], **hyper)
    opt_b.load_state_dict(torch.load(buffer))
    assert opt_b.param_groups[0]["lr"] == 0.1
    for p, q in zip([first, second], copies, strict=True):
        assert opt_b.state[q]["row_step"].dtype == torch.int64
        assert torch.equal(opt_b.state[q]["row_step"], opt_a.state[p]["row_step"])

    run(opt_a, [first, second], steps[3:])
    run(opt_b, copies, steps[3:])
    for p, q in zip([first, second], copies, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


def test_dense_gradient_is_refused_and_nothing_changes():
    torch.manual_seed(6)
    config = EngramConfig(**SMALL)
    layer = Engram(config, layer_id=1, hidden_size=6)  # default storage: dense gradient
    other = torch.randn(5, 2)
    other.grad = _sparse([1], torch.ones(1, 2), (5, 2))
    opt = SparseRowAdam([other, layer.table.weight])
    hasher = NgramHasher(config.layer_ids, 3, 2, config.engram_vocab_size, 90, pad_id=0)
    layer(torch.randn(1, 4, 6), hash_ids=hasher.hash(torch.randint(0, 90, (1, 4)), 1)).sum().backward()
    before = other.clone()
    with pytest.raises(RuntimeError, match=r"sparse_grad=True"):
        opt.step()
    assert torch.equal(other, before)  # the refused step did not update the earlier parameter
    assert not opt.state[other]


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
        SparseRowAdam([torch.zeros(3, 2)], **kwargs)


def test_bad_parameters_are_refused():
    for bad in (torch.zeros(3), torch.zeros(2, 3, 4)):
        with pytest.raises(ValueError, match="2-D"):
            SparseRowAdam([bad])
    with pytest.raises(ValueError, match="floating-point"):
        SparseRowAdam([torch.zeros(3, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="learning rate"):
        SparseRowAdam([{"params": [torch.zeros(3, 2)], "lr": -1.0}])
    opt = SparseRowAdam([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": [torch.zeros(4)]})
    assert len(opt.param_groups) == 1


def test_fully_sparse_gradient_equals_the_row_sparse_one():
    torch.manual_seed(7)
    a = torch.randn(8, 3)
    b = a.clone()
    opt_a, opt_b = SparseRowAdam([a], lr=0.1), SparseRowAdam([b], lr=0.1)
    values = torch.randn(3, 3)
    a.grad = _sparse([6, 1, 6], values, (8, 3))
    b.grad = a.grad.to_dense().to_sparse()  # (row, col) entries: sparse_dim 2
    assert b.grad.sparse_dim() == 2
    opt_a.step()
    opt_b.step()
    assert torch.equal(a, b)


def test_half_precision_tables_keep_their_dtype():
    torch.manual_seed(8)
    table = torch.randn(10, 4)
    half = table.to(torch.bfloat16)
    opt, opt_half = SparseRowAdam([table], lr=0.1), SparseRowAdam([half], lr=0.1)
    values = torch.randn(2, 4)
    table.grad = _sparse([2, 7], values, (10, 4))
    half.grad = _sparse([2, 7], values.to(torch.bfloat16), (10, 4))
    opt.step()
    opt_half.step()
    assert half.dtype == opt_half.state[half]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), table, rtol=2e-2, atol=2e-2)


class _OpSizes(TorchDispatchMode):
    """Records the largest dense, non-mutating op output (the mutated state tensors are not temporaries)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    self.largest = max(self.largest, t.numel())
        return out


def test_a_step_costs_the_touched_rows_not_the_table():
    rows = torch.tensor([999_999, 3, 500_000, 42, 7, 123_456, 8, 9, 10, 77])
    table = torch.zeros(1_000_000, 4)
    opt = SparseRowAdam([table])
    table.grad = _sparse(rows.tolist(), torch.randn(10, 4), tuple(table.shape))
    opt.step()
    row_step = opt.state[table]["row_step"]
    assert int(row_step.sum()) == 10
    assert row_step[rows].tolist() == [1] * 10

    # A second step (state already allocated): no op produces a temporary anywhere near the table's size.
    table.grad = _sparse([3, 3, 11], torch.randn(3, 4), tuple(table.shape))
    with _OpSizes() as sizes:
        opt.step()
    assert 0 < sizes.largest <= 3 * 4
    assert int(row_step.sum()) == 12 and row_step[[3, 11]].tolist() == [2, 1]
