"""The disk's own limit: random 4 KiB reads per second at queue depth 1 and at deep queues.

A cold-cache fetch of a disk table reads one 4 KiB page per needed row at a hashed, i.e. random,
position, so the rate it can reach is the disk's random 4 KiB read rate. This script measures that
rate on a file of ``--file-gib`` GiB written into a temporary folder under ``--dir`` (default: the
system's temporary folder, where ``bench_tiers.py`` puts its tables), so that both run on the same
disk. Reads bypass the page cache (``O_DIRECT``, one page-aligned buffer per thread), so every read
reaches the disk; where ``O_DIRECT`` is refused (tmpfs, some filesystems) the file's pages are dropped
with ``posix_fadvise(DONTNEED)`` before each pass instead, and offsets are never repeated within a pass.

Queue depth Q is Q threads, each issuing blocking ``pread``s one after another (the GIL is released
during the call, so Q reads are in flight at once). ``--fio`` also runs ``fio`` (libaio, direct) at
the same depths when it is installed, as a cross-check of what threads from Python can reach.

``reads_per_second(path, depth, seconds)`` is importable: ``bench_tiers.py`` reports its cold fetch
as a fraction of the deep-queue rate measured with it.

Run from the repository root::

    python benchmarks/bench_disk.py                 # plain text
    python benchmarks/bench_disk.py --markdown --fio
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _report import environment_lines, format_table

PAGE = 4096
DEPTHS = (1, 4, 16, 32, 64, 128)


@dataclass
class ReadRate:
    """Random 4 KiB reads at one queue depth."""

    depth: int  # threads; 0 for reads queued by the kernel (``willneed_rate``)
    reads: int
    seconds: float
    direct: bool  # O_DIRECT (else: page cache dropped before the pass)

    @property
    def per_second(self) -> float:
        return self.reads / self.seconds

    @property
    def mean_latency_us(self) -> float:
        """Mean time of one read as its thread saw it."""
        return self.seconds * max(1, self.depth) / self.reads * 1e6


def write_file(path: Path, size: int, chunk: int = 64 << 20) -> None:
    """``size`` bytes of incompressible data at ``path``, fsynced (a sparse file would read as zeros, from no disk)."""
    block = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for start in range(0, size, chunk):
            f.write(block[: min(chunk, size - start)])
        f.flush()
        os.fsync(f.fileno())


def _open_uncached(path: Path) -> tuple[int, bool]:
    """A read-only descriptor that bypasses the page cache if the filesystem allows (``O_DIRECT``)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:  # some filesystems accept the flag at open and refuse the read
            os.preadv(fd, [mmap.mmap(-1, PAGE)], 0)
            return fd, True
        except OSError:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    return fd, False


def reads_per_second(path: Path, depth: int, seconds: float = 3.0, seed: int = 0) -> ReadRate:
    """Random page-aligned 4 KiB reads of ``path`` by ``depth`` threads for about ``seconds``.

    Offsets are drawn without repetition within the pass (a permutation of the file's pages, dealt
    out to the threads), so no read can be served from a cache even without ``O_DIRECT``.
    """
    fd, direct = _open_uncached(path)
    try:
        pages = os.fstat(fd).st_size // PAGE
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        order = np.random.default_rng(seed).permutation(pages)
        counts = [0] * depth
        stop = time.perf_counter() + seconds
        start_line = threading.Barrier(depth + 1)

        def worker(k: int) -> None:
            buffer = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT needs
            mine = order[k::depth].tolist()
            start_line.wait()
            done = 0
            for page in mine:
                os.preadv(fd, [buffer], page * PAGE)
                done += 1
                if done % 64 == 0 and time.perf_counter() >= stop:
                    break
            counts[k] = done

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(depth)]
        for thread in threads:
            thread.start()
        start_line.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
    finally:
        os.close(fd)
    return ReadRate(depth, sum(counts), elapsed, direct)


def willneed_rate(path: Path, seconds: float = 3.0, batch: int = 1024, seed: int = 1) -> ReadRate:
    """Random 4 KiB reads issued by the kernel: ``posix_fadvise(WILLNEED)`` for a batch of distinct pages,
    then a buffered ``pread`` of each (which waits for its page), batch after batch, for about ``seconds``.

    The kernel queues all of a batch's reads at once, as deep as the block layer takes them (its
    ``nr_requests``), from one thread: how a disk table's cold fetch issues its reads. The file's
    pages are dropped from the page cache first; offsets are never repeated.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        order = np.random.default_rng(seed).permutation(os.fstat(fd).st_size // PAGE).tolist()
        buffer = bytearray(PAGE)
        reads = 0
        began = time.perf_counter()
        while reads < len(order) and time.perf_counter() - began < seconds:
            pages = order[reads : reads + batch]
            for page in pages:
                os.posix_fadvise(fd, page * PAGE, PAGE, os.POSIX_FADV_WILLNEED)
            for page in pages:
                os.preadv(fd, [buffer], page * PAGE)
            reads += len(pages)
        elapsed = time.perf_counter() - began
    finally:
        os.close(fd)
    return ReadRate(0, reads, elapsed, direct=False)


def fio_rate(path: Path, depth: int, seconds: float) -> float | None:
    """``fio``'s random 4 KiB read IOPS (libaio, direct) at ``depth``, or None without fio."""
    if shutil.which("fio") is None:
        return None
    command = [
        "fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k", "--direct=1",
        "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={seconds:g}", "--time_based", "--output-format=json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return float(json.loads(done.stdout)["jobs"][0]["read"]["iops"])


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; "unknown" elsewhere)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            mount, fs = line.split()[1:3]
            resolved = str(path.resolve())
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fs
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--file-gib", type=float, default=2.0, help="size of the file read (default 2 GiB)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per queue depth (default 3)")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="queue depths (threads)")
    parser.add_argument("--dir", default=None, help="parent of the temporary folder (default: tmp)")
    parser.add_argument("--fio", action="store_true", help="cross-check with fio (libaio) if installed")
    parser.add_argument("--markdown", action="store_true", help="print markdown for docs/benchmarks.md")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    root = Path(tempfile.mkdtemp(prefix="engram-bench-disk-", dir=args.dir))
    try:
        path = root / "random.bin"
        began = time.perf_counter()
        write_file(path, int(args.file_gib * 2**30) // PAGE * PAGE)
        written = time.perf_counter() - began
        body = []
        for depth in depths:
            rate = reads_per_second(path, depth, args.seconds)
            fio = fio_rate(path, depth, args.seconds) if args.fio else None
            body.append(
                [
                    str(depth),
                    f"{rate.per_second:,.0f}",
                    f"{rate.per_second * PAGE / 2**20:,.0f}",
                    f"{rate.mean_latency_us:,.0f}",
                    "-" if fio is None else f"{fio:,.0f}",
                ]
            )
            print(f"queue depth {depth}: {rate.per_second:,.0f} reads/s", file=sys.stderr, flush=True)
        kernel = willneed_rate(path, args.seconds)
        mib = kernel.per_second * PAGE / 2**20
        body.append(["kernel (WILLNEED batches)", f"{kernel.per_second:,.0f}", f"{mib:,.0f}", "-", "-"])
        facts = [
            ("file", f"{args.file_gib:g} GiB of random bytes in {root.parent} ({filesystem_of(root)}), written in "
             f"{written:.1f} s, removed at the end"),
            ("reads", ("O_DIRECT" if rate.direct else "page cache dropped before each pass (no O_DIRECT)")
             + f", {args.seconds:g} s per depth, offsets never repeated in a pass"),
        ]  # fmt: skip
        header = ["queue depth (threads)", "reads/s", "MiB/s", "mean latency us", "fio libaio reads/s"]
        print("\n".join([*environment_lines(facts, args.markdown), "", *format_table(header, body, args.markdown)]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
