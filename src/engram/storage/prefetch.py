"""Fetching table rows ahead of the layer that needs them.

An Engram layer's row indices depend only on the input ids, so as soon as a batch exists the rows
of every Engram layer can be fetched while the layers before it compute. ``prefetch`` hands the
work to a pool of background threads and returns a ``PendingRows`` (one table's fetches run in
order, one at a time; different tables' fetches at once); the layer calls ``result(indices)``,
which waits only if the rows are not there yet. On CUDA the host-to-device copy runs on a side
stream, and the layer's stream waits for it with an event, not the host.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

# Fetches of one table run one after another, in the order they were started: a table's fetch
# changes its hot-row cache and reads its write-back buffer, neither of which is safe to use from
# two threads at once. Fetches of different tables run at the same time, on a pool shared by all
# tables, so that the cold reads of every Engram layer of a batch wait for the disk together.
# Threads mostly wait on the disk or in torch kernels (the GIL is released), so the pool may be
# larger than the number of cores.
POOL_WORKERS = max(2, min(8, os.cpu_count() or 2))

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=POOL_WORKERS, thread_name_prefix="engram-prefetch")
        return _executor


class _SerialQueues:
    """Tasks grouped by key: those of one key run in submission order, one at a time; different keys in parallel.

    A key with tasks waiting has one drain job on the pool, which runs the key's tasks until its
    queue is empty; a key whose queue is empty holds nothing, so keys (tables) come and go freely.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[Hashable, deque[tuple[Future, Callable[[], object]]]] = {}
        self._last: dict[Hashable, Future] = {}  # each key's newest task: when it is done, all of the key's are

    def submit(self, key: Hashable, task: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._lock:
            queue = self._queues.get(key)
            start = queue is None  # no drain job running for this key
            if start:
                queue = self._queues[key] = deque()
            queue.append((future, task))
            self._last[key] = future
        if start:
            _pool().submit(self._drain, key)
        return future

    def _drain(self, key: Hashable) -> None:
        while True:
            with self._lock:
                queue = self._queues[key]
                if not queue:
                    del self._queues[key]
                    return
                future, task = queue.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(task())
                except BaseException as error:  # reaches the layer through result()
                    future.set_exception(error)
            with self._lock:
                if self._last.get(key) is future:
                    del self._last[key]

    def wait(self, key: Hashable | None = None) -> None:
        """Block until the tasks of ``key`` (None: of every key) submitted so far have run, and those that
        they submitted (a disk table's fetch queues the advice of its optimizer-state pages)."""
        while True:
            with self._lock:
                last = list(self._last.values()) if key is None else [self._last[key]] if key in self._last else []
            pending = [future for future in last if not future.done()]  # a task submits before it is done
            if not pending:
                return
            wait(pending)


_queues = _SerialQueues()


def run_after_fetches(key: Hashable, task: Callable[[], object]) -> Future:
    """Run ``task`` in the background after the fetches (and tasks) queued under ``key`` so far, before later ones.

    A table passes itself as ``key``: ``task`` then never runs at the same time as one of its fetches.
    """
    return _queues.submit(key, task)


def wait_for_background(key: Hashable | None = None) -> None:
    """Block until every fetch and task queued under ``key`` (None: any key) so far has finished, and every
    task that those queued.

    Errors stay with their futures (a fetch's reaches the layer through ``PendingRows.result``).
    """
    _queues.wait(key)


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
    batch can never be served to another. Fetches with the same ``queue`` (a table passes itself)
    run in the order they were started, one at a time; fetches of different queues run at once.
    """

    def __init__(
        self, indices: torch.Tensor, fetch: Callable[[torch.Tensor], FetchedRows], queue: Hashable | None = None
    ):
        self.indices = indices
        after = None
        if indices.is_cuda:  # the indices may still be being computed on the current stream
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(indices.device))
        key = fetch if queue is None else queue
        self._future: Future[FetchedRows] = _queues.submit(key, lambda: self._run(fetch, indices, after))

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
