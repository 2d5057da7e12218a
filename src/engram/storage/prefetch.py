"""Fetching table rows ahead of the layer that needs them.

An Engram layer's row indices depend only on the input ids, so as soon as a batch exists the rows
of every Engram layer can be fetched while the layers before it compute. ``prefetch`` hands the
work to a background thread and returns a ``PendingRows``; the layer calls ``result(indices)``,
which waits only if the rows are not there yet. On CUDA the host-to-device copy runs on a side
stream, and the layer's stream waits for it with an event, not the host.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _background() -> ThreadPoolExecutor:
    """One worker thread per table layer is not needed: one shared worker keeps fetches in submission order."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
        return _executor


@dataclass
class FetchedRows:
    """The rows a lookup needs, fetched.

    Attributes:
        rows: (U,) the distinct row ids, sorted, int64, on the table's home device.
        inverse: (*indices.shape) position of each index in ``rows``, on the indices' device.
        values: (U, dim) the rows' values, on the indices' device.
        ready: on CUDA, the event after which ``values`` may be read; None otherwise.
    """

    rows: torch.Tensor
    inverse: torch.Tensor
    values: torch.Tensor
    ready: torch.cuda.Event | None = None

    def wait(self) -> FetchedRows:
        """Make the current CUDA stream wait for the copy (no host synchronisation); a no-op on CPU."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.values.device)
            stream.wait_event(self.ready)
            self.values.record_stream(stream)  # the side stream's allocation is now used on this stream
            self.inverse.record_stream(stream)
        return self


class PendingRows:
    """Rows being fetched in the background for one set of indices.

    ``result(indices)`` refuses indices other than those the fetch was started for, so rows of one
    batch can never be served to another.
    """

    def __init__(self, indices: torch.Tensor, fetch: Callable[[torch.Tensor], FetchedRows]):
        self.indices = indices
        after = None
        if indices.is_cuda:  # the indices may still be being computed on the current stream
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(indices.device))
        self._future: Future[FetchedRows] = _background().submit(self._run, fetch, indices, after)

    @staticmethod
    def _run(fetch: Callable[[torch.Tensor], FetchedRows], indices: torch.Tensor, after) -> FetchedRows:
        if after is None:
            return fetch(indices)
        side = torch.cuda.Stream(indices.device)
        with torch.cuda.stream(side):
            side.wait_event(after)
            fetched = fetch(indices)
            fetched.ready = torch.cuda.Event()
            fetched.ready.record(side)
        return fetched

    def done(self) -> bool:
        return self._future.done()

    def result(self, indices: torch.Tensor) -> FetchedRows:
        """The fetched rows of ``indices``, waiting for them if needed.

        Raises:
            RuntimeError: ``indices`` differ from the ones this fetch was started for.
        """
        check_same_indices(self.indices, indices)
        return self._future.result().wait()


def check_same_indices(prefetched: torch.Tensor, indices: torch.Tensor) -> None:
    """Raise unless ``indices`` are those a prefetch was started for (the same tensor, or equal values).

    Raises:
        RuntimeError: they differ.
    """
    if indices is not prefetched and (
        indices.shape != prefetched.shape or indices.device != prefetched.device or not torch.equal(indices, prefetched)
    ):
        raise RuntimeError(
            "prefetched rows belong to other indices than this lookup's (another batch?); "
            "call prefetch() with exactly the indices that lookup() will get"
        )
