"""The initial rows of a table: N(0, std^2) values addressed by position, so every tier and every
sharding of a table starts from the same numbers.

Element ``i`` of the flattened (num_rows, dim) table comes from block ``i // BLOCK``, drawn whole
from its own generator seeded with a hash of (seed, block). Any row range can therefore be produced
on its own (a rank's shard, a chunk of a file being written) and equals the same rows of the whole
table: a device table, a disk table and four shards of the same seed hold identical rows.
"""

from __future__ import annotations

import hashlib

import torch

BLOCK = 1 << 20  # random values are drawn in fixed blocks of this many elements


def _block_seed(seed: int, block: int) -> int:
    # a 64-bit seed per block, so that blocks are independent streams of the one user seed
    return int.from_bytes(hashlib.sha256(f"engram-table/{seed}/{block}".encode()).digest()[:8], "little")


def draw_seed() -> int:
    """A table seed drawn from torch's global generator, so ``torch.manual_seed`` fixes a model's tables."""
    return int(torch.randint(0, 2**62, (), device="cpu"))  # on the CPU even when models are built on "meta"


class NormalStream:
    """Standard normal float32 values of one seed, addressed by flat element index.

    Reading consecutive ranges reuses the last block, so a table written chunk by chunk draws each
    block once.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._block = -1
        self._values = torch.empty(0)

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` as a float32 tensor of shape (stop - start,)."""
        parts = []
        while start < stop:
            block = start // BLOCK
            if block != self._block:  # chunks usually end mid-block: keep the last block for the next chunk
                generator = torch.Generator().manual_seed(_block_seed(self.seed, block))
                self._values = torch.randn(BLOCK, generator=generator)
                self._block = block
            end = min(stop, (block + 1) * BLOCK)
            base = block * BLOCK
            parts.append(self._values[start - base : end - base])
            start = end
        return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def fill_normal_rows(target: torch.Tensor, seed: int, std: float, first_row: int = 0) -> torch.Tensor:
    """Fill ``target`` (R, D) with rows ``[first_row, first_row + R)`` of the seeded N(0, std^2) table; returns it.

    Works in chunks of about 64 MiB, so a table of any size (on any device) is filled without a
    full-size temporary.
    """
    if target.is_meta:  # a model built for its shapes only (parameter accounting)
        return target
    rows, dim = target.shape
    stream = NormalStream(seed)
    chunk = max(1, (64 << 20) // (4 * dim))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        values = stream.take((first_row + start) * dim, (first_row + stop) * dim).view(stop - start, dim)
        target[start:stop].copy_(values * std)
    return target
