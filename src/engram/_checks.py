"""Validation helpers shared by the public entry points.

Bad input fails loudly with a message that names the value and what was expected; nothing is
clamped or wrapped silently.

Checks of dtypes and shapes read only metadata and always run. Checks of id *values* (ranges) read
the tensor on the host: on a GPU each is a device-to-host sync, and under ``torch.compile`` a graph
break. They run once, where the ids enter (``EngramLM.forward``, ``generate``, the training batches
on the host, a component called directly), and not again in the components the ids then pass
through (compressor, hasher, layer), whose inputs are valid by construction; internal callers pass
``check_ids=False``. ``set_debug_checks(True)`` (or ``ENGRAM_DEBUG_CHECKS=1`` in the environment)
brings every inner check back, to find where a bad value comes from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_debug_checks = os.environ.get("ENGRAM_DEBUG_CHECKS", "").strip() not in ("", "0")


def set_debug_checks(enabled: bool) -> None:
    """Run the value checks of every component, also those an internal caller skips (slow: debugging only).

    Off by default, unless the environment variable ``ENGRAM_DEBUG_CHECKS`` is set to anything but
    ``0`` when ``engram`` is imported.
    """
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks() -> bool:
    """Whether ``set_debug_checks`` (or ``ENGRAM_DEBUG_CHECKS``) turned the inner value checks on."""
    return _debug_checks


def checks_values(requested: bool = True) -> bool:
    """Whether a component checks id values now: when its caller asks for it (``check_ids=True``, the
    default of every public entry point) or in debug mode (``set_debug_checks``).

    Not while ``torch.compile`` traces (outside debug mode): a check reads values on the host, which
    would split the compiled graph; shapes and dtypes are still checked.
    """
    return _debug_checks or (requested and not torch.compiler.is_compiling())


def as_id_tensor(ids: torch.Tensor, name: str, ndim: int | None = None) -> torch.Tensor:
    """Check that ``ids`` is an integer tensor (optionally of rank ``ndim``) and return it as int64."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}; convert with .long()")
    if ndim is not None and ids.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(ids.shape)}")
    if ids.dtype == torch.uint64 and ids.device.type != "meta":
        wrapped = ids.view(torch.int64) < 0  # values >= 2^63 would wrap to negative ids in int64
        if bool(wrapped.any()):
            bad = int(ids.view(torch.int64)[wrapped][0]) + 2**64
            raise ValueError(f"{name} contains id {bad} (uint64), beyond any vocabulary; ids must fit in int64")
    return ids.long()


def id_extremes(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of ``ids`` in one host read; None for an empty or ``meta`` tensor (no values)."""
    if ids.numel() == 0 or ids.device.type == "meta":  # meta tensors carry shapes only
        return None
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    return lo, hi


def check_id_range(
    ids: torch.Tensor,
    low: int,
    high: int,
    name: str,
    hint: str = "",
    extremes: tuple[int, int] | None = None,
) -> None:
    """Raise if any id lies outside ``[low, high)``; the message names the offending extreme.

    One host read (``id_extremes``), none if the caller passes the ``extremes`` it has read already.
    """
    if extremes is None:
        extremes = id_extremes(ids)
        if extremes is None:
            return
    lo, hi = extremes
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise ValueError(f"{name} contains id {bad}, outside the valid range [{low}, {high}){hint}")


def check_hashing_params(
    layer_ids: Sequence[int],
    max_ngram_size: int,
    n_head_per_ngram: int,
    engram_vocab_size: Sequence[int],
) -> None:
    """Validate the parameters that define the hash functions and table sizes."""
    if len(layer_ids) == 0:
        raise ValueError("layer_ids is empty: give at least one layer index, e.g. layer_ids=[1, 15]")
    for lid in layer_ids:
        if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
            raise ValueError(f"layer_ids must be non-negative integers, got {lid!r}")
    if len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"layer_ids must be distinct, got {list(layer_ids)}")
    if isinstance(max_ngram_size, bool) or not isinstance(max_ngram_size, int) or max_ngram_size < 2:
        raise ValueError(f"max_ngram_size must be an integer >= 2 (Engram has no unigrams), got {max_ngram_size!r}")
    if isinstance(n_head_per_ngram, bool) or not isinstance(n_head_per_ngram, int) or n_head_per_ngram < 1:
        raise ValueError(f"n_head_per_ngram must be an integer >= 1, got {n_head_per_ngram!r}")
    if len(engram_vocab_size) != max_ngram_size - 1:
        raise ValueError(
            f"engram_vocab_size needs one base size per n-gram order 2..{max_ngram_size} "
            f"({max_ngram_size - 1} values), got {len(engram_vocab_size)}: {list(engram_vocab_size)}"
        )
    for size in engram_vocab_size:
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"engram_vocab_size entries must be integers >= 2, got {size!r}")
