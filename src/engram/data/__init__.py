"""Token data for training and evaluation."""

from engram.data.batches import RandomWindows, sequential_windows

__all__ = ["RandomWindows", "sequential_windows"]
