"""Durable, atomic file operations shared by datasets, checkpoints and caches.

Everything that must never be seen half-written (a dataset folder, a checkpoint) is written into a
temporary sibling folder, fsynced, and renamed into place; these are the pieces of that pattern.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path


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
