"""Durable, atomic file operations shared by datasets, checkpoints and caches.

Everything that must never be seen half-written (a dataset folder, a checkpoint) is written into a
temporary sibling folder, fsynced, and renamed into place; these are the pieces of that pattern, and
the lock that keeps a second process from writing the same folder at the same time.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders are not locked
    fcntl = None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created or renamed files) durable; directories cannot be opened on Windows."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader finds the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)
    return path


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the folder ``tmp`` to ``target``; an existing ``target`` is moved aside first, deleted afterwards.

    If the final rename fails, the previous ``target`` is put back, so a reader finds either the old
    complete folder or the new complete one.
    """
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{secrets.token_hex(8)}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


LOCK_FILE = ".engram.lock"


class FolderInUseError(RuntimeError):
    """Another running process holds the folder's lock; the message names it."""


class FolderLock:
    """One process at a time per folder: an exclusive advisory lock on ``<folder>/.engram.lock``.

    The lock is ``flock`` on an open file, so the kernel releases it when its holder exits, however it
    exits (``kill -9`` included): a lock left by a dead process never stands in the way. The file holds
    the holder's pid, host, purpose and start time, only to name it when another process is refused.
    Works wherever the filesystem supports ``flock`` (local disks, and NFS through POSIX locks on Linux).

    Args:
        folder: the folder to lock (it must exist).
        purpose: what the holder does, for the message (``"engram train"``).
    """

    def __init__(self, folder: str | os.PathLike, purpose: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise ``FolderInUseError`` at once if a live process holds it."""
        if self._fd is not None:
            return self
        if fcntl is None:
            warnings.warn(f"folder locks need POSIX flock; {self.folder} is not locked on this system", stacklevel=2)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise FolderInUseError(self._refusal(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def _refusal(self, raw: bytes) -> str:
        try:
            holder = json.loads(raw)
            who = f"{holder['purpose']} (process {holder['pid']} on {holder['host']}, since {holder['since']})"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return (
            f"{self.folder} is in use by {who}: one process at a time may write it. Wait for that process to "
            f"finish or stop it, then run this command again (the lock file is {self.path}; it is released "
            "automatically when its holder exits)"
        )

    def release(self) -> None:
        """Let the lock go (also done by the kernel when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
