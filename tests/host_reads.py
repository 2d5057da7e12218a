"""Count the host reads of tensor values (device-to-host syncs on a GPU) that a piece of code makes, on any device.

On a GPU every read of a tensor's value by Python (``.item()``, ``bool(t)``, ``int(t)``, ``if t.any():``,
``.tolist()``, ``.cpu()``, ``.numpy()``) waits for the device to finish everything queued before it, and so
do the operators whose output shape depends on the values (``nonzero``, ``unique``, boolean-mask
indexing, ...): the host must learn the shape before it can go on. Each is also a graph break for
``torch.compile`` and impossible inside a CUDA graph. On a CPU nothing waits, so such reads are cheap
and easy to miss; ``HostReads`` finds them anyway:

- a ``TorchDispatchMode`` sees every ATen operator (forward and backward): ``aten._local_scalar_dense``
  is what every scalar read becomes, and the operators in ``DATA_DEPENDENT`` (and indexing with a
  boolean mask) are the ones whose output shape depends on values;
- a ``TorchFunctionMode`` sees the Tensor methods that copy values out without an ATen operator on
  a CPU (``tolist``, ``numpy``, ``cpu``).

Each read is attributed to its call site: the innermost frame in ``src/engram`` (the library) and,
if the read happens inside torch's own code below it (an optimizer, ``clip_grad_norm_``), the
innermost frame in torch as well. Used by ``benchmarks/bench_host_syncs.py`` and the tests.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import engram

_ENGRAM = str(Path(engram.__file__).resolve().parent) + "/"
_TORCH = str(Path(torch.__file__).resolve().parent) + "/"
# torch's thin Python wrappers of an operator the caller asked for: a read below them is the caller's.
_WRAPPERS = tuple(
    _TORCH + name
    for name in (
        "utils/_python_dispatch.py",
        "overrides.py",
        "_tensor.py",
        "functional.py",
        "_jit_internal.py",
        "nn/functional.py",
        "nn/modules/module.py",
        "_ops.py",
        "_compile.py",
        "_dynamo/eval_frame.py",
    )
)

#: ATen operators whose output shape depends on the input values (overload names stripped).
DATA_DEPENDENT = frozenset(
    {
        "nonzero",
        "argwhere",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "bincount",
        "_coalesce",
        "equal",
        "is_nonzero",
        "allclose",
    }
)
_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_COPIES = {"tolist", "numpy", "cpu"}


@dataclass(frozen=True)
class Read:
    """One host read: its kind, the operator or method, and where it came from."""

    kind: str  # "value" (a scalar read), "copy" (tolist/numpy/cpu) or "shape" (a data-dependent output shape)
    op: str
    site: str  # innermost src/engram frame, "engram/<path>:<line> (<function>)" (and its caller's, for
    # the shared checks of _checks.py), or "-" if none
    torch_site: str | None  # innermost frame inside torch's own code below ``site``, if the read is there

    @property
    def ours(self) -> bool:
        """Made by the library's own code (not inside a torch function it called)."""
        return self.torch_site is None and self.site != "-"


def _where() -> tuple[str, str | None]:
    frames: list[traceback.FrameSummary] = []  # innermost first
    torch_site = None
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name == __file__:
            continue
        if name.startswith(_ENGRAM):
            frames.append(frame)
            if not (name.endswith("/_checks.py") or frame.name.lstrip("_").startswith("check")):
                break  # (a shared check: name who called it too)
        elif not frames and torch_site is None and name.startswith(_TORCH) and not name.startswith(_WRAPPERS):
            torch_site = f"torch/{name[len(_TORCH) :]}:{frame.lineno} ({frame.name})"
    if not frames:
        return "-", torch_site
    caller = frames[-1]
    site = f"engram/{caller.filename[len(_ENGRAM) :]}:{caller.lineno} ({caller.name})"
    if len(frames) > 1:
        site += " via " + " > ".join(f.name for f in reversed(frames[:-1]))
    return site, torch_site


def _tensor_repeats(args: tuple, kwargs: dict) -> bool:
    """``repeat_interleave`` with a tensor of repeats and no ``output_size``: its length depends on them."""
    return "output_size" not in kwargs and isinstance(args[0], torch.Tensor)


def _is_mask(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8)


@dataclass
class HostReads:
    """Context manager recording every host read made inside it (``reads``); nestable, not thread-aware.

    Only the thread that entered it is watched (torch's modes are thread-local), which is also
    where the backward pass of CPU tensors runs.
    """

    reads: list[Read] = field(default_factory=list)

    def __enter__(self) -> HostReads:
        self._function = _FunctionMode(self)
        self._dispatch = _DispatchMode(self)
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)

    def record(self, kind: str, op: str) -> None:
        self.reads.append(Read(kind, op, *_where()))

    # -- summaries ----------------------------------------------------------------------------------
    def ours(self) -> list[Read]:
        return [r for r in self.reads if r.ours]

    def by_kind(self) -> Counter[str]:
        return Counter(r.kind for r in self.reads)

    def by_site(self) -> Counter[tuple[str, str, str, str | None]]:
        """How many reads each (kind, op, site, torch site) made."""
        return Counter((r.kind, r.op, r.site, r.torch_site) for r in self.reads)


class _DispatchMode(TorchDispatchMode):
    def __init__(self, owner: HostReads):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.owner.record("value", "item/bool/int")
        elif name in DATA_DEPENDENT or (name == "repeat_interleave" and _tensor_repeats(args, kwargs)):
            self.owner.record("shape", name)
        elif name in _INDEXING and len(args) > 1 and any(_is_mask(i) for i in args[1] if i is not None):
            self.owner.record("shape", f"{name} (boolean mask)")
        return func(*args, **kwargs)


class _FunctionMode(TorchFunctionMode):
    def __init__(self, owner: HostReads):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _COPIES and getattr(func, "__objclass__", None) is not None:  # a Tensor method
            self.owner.record("copy", name)
        return func(*args, **(kwargs or {}))


def format_reads(reads: HostReads | list[Read], markdown: bool = False) -> list[str]:
    """One line per call site: count, kind, operator, site (and the torch frame below it)."""
    counter = (
        reads.by_site()
        if isinstance(reads, HostReads)
        else Counter((r.kind, r.op, r.site, r.torch_site) for r in reads)
    )
    lines = []
    for (kind, op, site, torch_site), n in sorted(counter.items(), key=lambda item: (item[0][2], item[0][3] or "")):
        where = site if torch_site is None else f"{site} -> {torch_site}"
        lines.append(f"{n} x {kind}: {op} at {where}")
    return lines


if __name__ == "__main__":  # a smoke test: python tests/host_reads.py
    t = torch.arange(5)
    with HostReads() as seen:
        bool(t.any()), t.tolist(), t[t > 2], t.unique()
    print("\n".join(format_reads(seen)), file=sys.stderr)
