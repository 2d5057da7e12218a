"""Sparse row optimizers for Engram tables, with their state in the table's own tier.

A step takes each table's gradient rows (``take_row_grad``: U distinct rows and their summed
gradient), gathers those rows of the weight and of the state arrays from the table's local shard
(``LocalTable``), updates them and writes them back. The state arrays come from
``LocalTable.row_state``, so they sit where the table sits: device memory, host memory, or files
next to a disk table. The cost of a step follows U, never the table. The rows come from
``take_row_grad`` (distinct, sorted, in range), so the step reads and writes them unchecked
(``gather``/``scatter``): no range check, reduction or host read per step.

- ``RowAdam``: Adam(W) with a step count per row (the paper's choice; the rule is in its docstring).
- ``RowAdagrad``: row-wise Adagrad, one float of state per row instead of two per element, for
  tables whose Adam moments would not fit the tier::

      s_r = s_r + mean(g_r^2)            (one scalar per row)
      p_r = p_r - lr * g_r / (sqrt(s_r) + eps)

Both expose ``param_groups`` (one group, with ``lr``), ``zero_grad``, ``step``, ``state_dict`` and
``load_state_dict`` like ``torch.optim`` optimizers, so schedules and checkpoints treat them alike.
The state of ``Durable`` tables (the disk tier) stays in their files and is not part of
``state_dict``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from engram.storage.base import LocalTable, TableStorage, durable


class RowOptimizer(ABC):
    """Base: one parameter group of hyper-parameters applied to every table."""

    def __init__(self, tables: Sequence[TableStorage], **hyper: Any):
        tables = list(tables)
        for table in tables:
            if not isinstance(table, TableStorage):
                raise TypeError(f"row optimizers take TableStorage tables, got {type(table).__name__}")
        self.tables = tables
        self.param_groups = [dict(hyper)]
        for table in tables:  # allocate the state now: a disk table's journal must cover it from the start
            self._state(table.local_shard())

    @abstractmethod
    def _state(self, table: LocalTable) -> dict[str, torch.Tensor]:
        """The table's state arrays, allocated in its tier on first use."""

    @abstractmethod
    def _update(self, table: LocalTable, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update rows (U,) of ``table`` (as ``take_row_grad`` returns them) given their gradient (U, D)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for table in self.tables:
            table.zero_row_grad()

    @torch.no_grad()
    def take_grads(self) -> list[tuple[TableStorage, torch.Tensor, torch.Tensor]]:
        """``(table, rows (U,), grad (U, D))`` of every table that received a gradient, clearing them.

        Lets a trainer look at the gradients (are they finite?) before anything is updated.
        """
        taken = []
        for table in self.tables:
            rows_grad = table.take_row_grad()  # collective for a sharded table: every rank calls it
            if rows_grad is not None and rows_grad[0].numel() > 0:
                taken.append((table, *rows_grad))
        return taken

    @torch.no_grad()
    def step(self, grads: list[tuple[TableStorage, torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Update the looked-up rows of every table that received a gradient (``grads``: from ``take_grads``)."""
        for table, rows, grad in self.take_grads() if grads is None else grads:
            shard = table.local_shard()
            shard.begin_update(rows)
            self._update(shard, rows, grad)

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, and the state arrays of the tables that are not ``Durable``."""
        state = {
            i: dict(self._state(table.local_shard())) for i, table in enumerate(self.tables) if durable(table) is None
        }
        return {"param_groups": [dict(group) for group in self.param_groups], "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the hyper-parameters and, if ``state_dict`` has them, the state arrays (checkpoints
        keep those with the table rows, and pass only ``param_groups``)."""
        self.param_groups = [dict(group) for group in state_dict["param_groups"]]
        if "state" not in state_dict:
            return
        saved = state_dict["state"]
        expected = {i for i, table in enumerate(self.tables) if durable(table) is None}
        if set(saved) != expected:
            raise ValueError(f"optimizer state holds tables {sorted(saved)}, this optimizer has {sorted(expected)}")
        for i, arrays in saved.items():
            current = self._state(self.tables[i].local_shard())
            if set(arrays) != set(current):
                raise ValueError(f"table {i}: saved state {sorted(arrays)}, expected {sorted(current)}")
            for name, value in arrays.items():
                if value.shape != current[name].shape:
                    raise ValueError(
                        f"table {i} state {name}: saved {tuple(value.shape)}, table {tuple(current[name].shape)}"
                    )
                current[name].copy_(value)


class RowAdam(RowOptimizer):
    """Lazy Adam(W) on the looked-up rows, with a step count per row.

    On each step, for each table with a gradient, U are its *touched* rows (those ``take_row_grad``
    returns: every looked-up row, including rows whose summed gradient is exactly zero). For a
    touched row r only, with its gradient g_r (D,)::

        t_r  = t_r + 1                                      the row's own step count
        m_r  = b1 * m_r + (1 - b1) * g_r
        v_r  = b2 * v_r + (1 - b2) * g_r^2
        p_r  = p_r - lr * wd * p_r                          decoupled weight decay (AdamW)
        p_r  = p_r - lr * (m_r / (1 - b1^t_r)) / (sqrt(v_r / (1 - b2^t_r)) + eps)

    Rows not in U keep their parameters and all their state unchanged. Each row therefore follows
    exactly a dense ``torch.optim.AdamW`` run over only the steps in which it was looked up.

    Why a step count per row: Adam's bias correction 1 - b^t undoes the zero initialisation of m
    and v, and it is right only if t counts the updates that m and v of that row have received.
    ``torch.optim.SparseAdam`` uses one global step: a rarely seen n-gram row first looked up at
    global step 10,000 gets the corrections for t = 10,000 (both about 1) while its m and v hold a
    single update: its first move is lr * (1 - b1) / sqrt(1 - b2) ~ 3.2 lr instead of lr, and its
    corrections stay wrong until it has been seen often (a rare row may never be). With a per-row
    count every row, however rare, gets the corrections of its own history.

    Cost per step and table: gathers, arithmetic and scatters on the (U, D) touched rows; nothing
    of the table's size. Half-precision tables compute in float32 and store in their dtype.

    State per table, in its tier: ``exp_avg`` and ``exp_avg_sq`` (R, D) in the table's dtype,
    ``row_step`` (R,) int64 (exact: ``state_dict``/``load_state_dict`` keep it int64).

    Args:
        tables: the tables (any ``TableStorage``: device tables need ``sparse_grad=True``, which
            ``place_tables`` sets).
        lr: learning rate (>= 0).
        betas: (b1, b2), each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0), applied to touched rows only.
    """

    def __init__(
        self,
        tables: Sequence[TableStorage],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        _check_adam_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(tables, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _state(self, table: LocalTable) -> dict[str, torch.Tensor]:
        return {
            "exp_avg": table.row_state("exp_avg", (table.dim,), table.dtype),
            "exp_avg_sq": table.row_state("exp_avg_sq", (table.dim,), table.dtype),
            "row_step": table.row_state("row_step", (), torch.int64),
        }

    def _update(self, table: LocalTable, rows: torch.Tensor, grad: torch.Tensor) -> None:
        param, m, v, step = adam_rows(
            table.gather(rows),
            grad.to(rows.device),
            table.read_state("exp_avg", rows),
            table.read_state("exp_avg_sq", rows),
            table.read_state("row_step", rows),
            self.param_groups[0],
        )
        table.write_state("row_step", rows, step)
        table.write_state("exp_avg", rows, m)
        table.write_state("exp_avg_sq", rows, v)
        table.scatter(rows, param)


class RowAdagrad(RowOptimizer):
    """Row-wise Adagrad: one float32 of state per row (``sum_sq`` (R,)), for tables too big for Adam's moments."""

    def __init__(self, tables: Sequence[TableStorage], lr: float = 1e-2, eps: float = 1e-8):
        if not lr >= 0.0:
            raise ValueError(f"learning rate must be >= 0, got lr={lr}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got eps={eps}")
        super().__init__(tables, lr=lr, eps=eps)

    def _state(self, table: LocalTable) -> dict[str, torch.Tensor]:
        return {"sum_sq": table.row_state("sum_sq", (), torch.float32)}

    def _update(self, table: LocalTable, rows: torch.Tensor, grad: torch.Tensor) -> None:
        group = self.param_groups[0]
        g = grad.to(device=rows.device, dtype=torch.float32)  # (U, D)
        s = table.read_state("sum_sq", rows).add_(g.square().mean(dim=1))  # (U,)
        table.write_state("sum_sq", rows, s)
        param = table.gather(rows).float()
        param.sub_(g / (s.sqrt().add_(group["eps"])).unsqueeze(1) * group["lr"])
        table.scatter(rows, param)


def _check_adam_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:  # also refuses NaN
        raise ValueError(f"learning rate must be >= 0, got lr={lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got eps={eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay}")


def adam_rows(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    group: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam(W) update of U gathered rows, each with its own step count (``RowAdam``'s rule).

    Args:
        param, grad, exp_avg, exp_avg_sq: (U, D) the rows, their gradient and moments.
        step: (U,) int64 updates each row has had so far.
        group: hyper-parameters ``lr``, ``betas``, ``eps``, ``weight_decay``.

    Returns:
        New ``(param, exp_avg, exp_avg_sq, step)``, rows in float32 (or wider if the input is).
    """
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    # Half-precision tables: do the arithmetic in float32, the caller stores in the table's dtype.
    compute = torch.promote_types(param.dtype, torch.float32)
    step = step + 1
    g = grad.to(compute)
    m = exp_avg.to(compute).lerp_(g, 1.0 - beta1)  # (U, D)
    v = exp_avg_sq.to(compute).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)

    # 1 - b^t = -expm1(t log b): accurate where 1 - b^t cancels (b2 = 0.999, small t); b = 0 gives 1.
    t = step.to(compute).unsqueeze(1)  # (U, 1)
    bias_correction1 = -torch.expm1(t * _log(beta1))
    bias_correction2 = -torch.expm1(t * _log(beta2))
    denom = (v.sqrt() / bias_correction2.sqrt()).add_(eps)

    param = param.to(compute, copy=True)
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.sub_((m / denom).mul_(lr / bias_correction1))
    return param, m, v, step


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf
