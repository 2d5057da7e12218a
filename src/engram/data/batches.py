"""Training and evaluation batches from a flat array of token ids.

A corpus is one 1-D integer array (NumPy array or ``numpy.memmap``) of token ids. Training batches
are random windows whose positions depend only on ``(seed, step)``, so the order is reproducible and
resuming at step s needs no saved iterator, just s. Evaluation walks non-overlapping windows in
order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _check_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise TypeError("tokens must be a 1-D NumPy array (or memmap) of integer token ids")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    return tokens


class RandomWindows:
    """Batches of random windows: ``batch(step)`` -> (inputs, targets), each (B, T) int64.

    Args:
        tokens: the token ids.
        batch_size, seq_len: B and T; each window spans T + 1 tokens.
        seed: with the step, fixes the window starts.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens = _check_tokens(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


def sequential_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in corpus order, ``batch_size`` at a time (the last batch may be smaller)."""
    tokens = _check_tokens(tokens, seq_len)
    starts = range(0, len(tokens) - seq_len, seq_len)
    for n, first in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        windows = np.stack([tokens[s : s + seq_len + 1] for s in starts[first : first + batch_size]])
        windows = torch.from_numpy(windows.astype(np.int64))
        yield windows[:, :-1], windows[:, 1:]
