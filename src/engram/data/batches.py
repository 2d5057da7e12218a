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
        vocab_size: if given, every batch is checked to hold ids in ``[0, vocab_size)`` only, here on
            the host (NumPy, before any copy to a device), so that the model need not check them on
            the device (the ``Trainer`` passes the model's ``num_input_ids``).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, vocab_size: int | None = None):
        self.tokens = _check_tokens(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.batch_size, self.seq_len, self.seed, self.vocab_size = batch_size, seq_len, seed, vocab_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        if self.vocab_size is not None:
            self._check_ids(windows, starts)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def _check_ids(self, windows: np.ndarray, starts: np.ndarray) -> None:
        low, high = int(windows.min()), int(windows.max())
        if low >= 0 and high < self.vocab_size:
            return
        bad = low if low < 0 else high
        sequence, offset = (int(i[0]) for i in np.nonzero(windows == bad))
        raise ValueError(
            f"the training tokens hold id {bad} at position {int(starts[sequence]) + offset}, outside the valid "
            f"range [0, {self.vocab_size}) of the model's ids; was the data prepared with this model's tokenizer?"
        )


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
