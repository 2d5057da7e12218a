"""Adam for huge embedding tables with sparse gradients, with a step count per row.

An Engram table has millions of rows and a batch looks up a few thousand of them. With
``DeviceTable(..., sparse_grad=True)`` the table's gradient is a ``torch.sparse_coo`` tensor that
holds only the looked-up rows, and ``SparseRowAdam`` updates only those rows: the cost of a step
grows with the number of rows looked up, never with the size of the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["SparseRowAdam"]


class SparseRowAdam(Optimizer):
    """Lazy Adam(W) with a per-row step count, for 2-D tables with sparse gradients.

    Shapes: a parameter is a table (R, D) of R rows of width D; its gradient is a sparse COO
    tensor of the same shape, as produced by ``F.embedding(..., sparse=True)`` (i.e.
    ``DeviceTable(sparse_grad=True)``): indices (1, n) row ids, possibly repeated, and values
    (n, D). A fully sparse gradient (indices (2, n), values (n,)) is accepted too.

    On each ``step()``, for each parameter with a gradient: the gradient is coalesced (values of
    repeated rows are summed) and U, its unique rows (U,), are the *touched* rows, including rows
    whose summed gradient is exactly zero (they were looked up). For a touched row r only, with
    its gradient g_r (D,)::

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

    Cost per step for one parameter with n looked-up entries and U unique rows: a coalesce
    (O(n log n)), then gathers, arithmetic and scatters on (U, D) rows (``index_select`` /
    ``index_copy_``). No temporary of the table's size is allocated; the state ``exp_avg`` and
    ``exp_avg_sq`` (R, D, the parameter's dtype) and ``row_step`` (R,) int64 are allocated once,
    at the first step, on the parameter's device.

    A dense gradient is refused (``RuntimeError``) rather than densified: densifying would make
    every row "touched" and the step O(R * D).

    Args:
        params: 2-D floating-point tensors, or dicts defining parameter groups.
        lr: learning rate (>= 0).
        betas: (b1, b2), each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0), applied to touched rows only.

    State per parameter (``optimizer.state[p]``): ``exp_avg`` (R, D), ``exp_avg_sq`` (R, D),
    ``row_step`` (R,) int64. ``state_dict()`` / ``load_state_dict()`` round-trip it exactly
    (``row_step`` stays int64 on load).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its tensors (2-D, floating point) and hyper-parameters."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters must be an ordered iterable of tensors, not a set")
        else:
            params = list(params) if params is not None else []
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"SparseRowAdam parameters must be tensors, got {type(p).__name__} at position {i}")
            if p.dim() != 2:
                raise ValueError(
                    f"SparseRowAdam needs 2-D (rows x dim) tables, got a parameter of shape {tuple(p.shape)} "
                    f"at position {i}; optimise other parameters with a dense optimizer"
                )
            if not p.is_floating_point():
                raise ValueError(f"SparseRowAdam needs floating-point tables, got dtype {p.dtype} at position {i}")
        group["params"] = params
        _check_hyperparameters({**self.defaults, **{k: v for k, v in group.items() if k in self.defaults}})
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of the looked-up rows of every table that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Check every gradient before touching any table, so a refused step changes nothing.
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise RuntimeError(
                        f"SparseRowAdam needs sparse gradients, but a parameter of shape {tuple(p.shape)} has a "
                        f"dense ({grad.layout}) gradient; build the table with DeviceTable(..., sparse_grad=True) "
                        "(or use F.embedding(..., sparse=True)), or use a dense optimizer such as torch.optim.AdamW"
                    )
                if grad.shape != p.shape:
                    raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}")
                work.append((group, p, grad))

        for group, p, grad in work:
            rows, values = _touched_rows(grad)
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            if rows.numel() == 0:
                continue
            _update_rows(p, rows, values, state, group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Standard loading, except that ``row_step`` is kept int64 (exact), on the parameter's device.

        ``Optimizer.load_state_dict`` casts every floating-point parameter's state tensors to the
        parameter's dtype, ``row_step`` included; a float32 count is exact only up to 2^24.
        """
        saved_steps = {
            key: value["row_step"]
            for key, value in state_dict["state"].items()
            if isinstance(value, dict) and "row_step" in value
        }
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            if saved_id in saved_steps:
                self.state[p]["row_step"] = saved_steps[saved_id].to(device=p.device, dtype=torch.int64, copy=True)


def _check_hyperparameters(group: dict[str, Any]) -> None:
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
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


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique row ids (U,) (sorted, int64) and their summed gradient rows (U, D) of a sparse gradient."""
    grad = grad.coalesce()  # sums repeated indices; keeps entries whose sum is zero
    indices, values = grad.indices(), grad.values()
    if grad.sparse_dim() == 1:  # hybrid (rows sparse, dim dense): the layout F.embedding produces
        return indices[0], values
    # Fully sparse (row, column) entries: gather them into dense rows; absent entries are zero.
    rows, inverse = torch.unique(indices[0], sorted=True, return_inverse=True)
    dense = values.new_zeros(rows.numel(), grad.shape[1])
    dense.index_put_((inverse, indices[1]), values, accumulate=True)
    return rows, dense


def _update_rows(
    p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
) -> None:
    """The Adam(W) update of rows ``rows`` (U,) of ``p`` with gradient rows ``grad`` (U, D)."""
    exp_avg, exp_avg_sq, row_step = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
    param, m, v, step = adam_rows(
        p.index_select(0, rows),
        grad,
        exp_avg.index_select(0, rows),
        exp_avg_sq.index_select(0, rows),
        row_step.index_select(0, rows),
        group,
    )
    row_step.index_copy_(0, rows, step)
    exp_avg.index_copy_(0, rows, m.to(p.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(p.dtype))
    p.index_copy_(0, rows, param.to(p.dtype))


def adam_rows(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    group: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam(W) update of U gathered rows, each with its own step count (the class docstring's rule).

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
