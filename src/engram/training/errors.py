"""Why a training run stopped or could not start: errors that the command line turns into clear messages."""

from __future__ import annotations

import signal
from pathlib import Path


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient (or a checkpoint would hold non-finite values).

    Nothing of the offending step was applied; the message says what was non-finite, at which step,
    and where the last good state was saved.
    """


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint of its last completed step.

    Attributes:
        signal_number: the signal that asked for the stop.
        step: the last completed step.
        checkpoint: the checkpoint of that step (None when the trainer keeps nothing on disk).
    """

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None):
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signal_number).name
        saved = f"; its checkpoint is {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"stopped by {name} after step {step}{saved}")


class DamagedCheckpointError(ValueError):
    """A checkpoint's files do not match what it recorded (missing, cut short, changed, unreadable)."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path} cannot be used: {reason}")


class CheckpointVersionError(ValueError):
    """A checkpoint in a format version this engram does not read (an older or a newer one).

    Not damage: such a checkpoint is refused as it is, never skipped or set aside; the message names the
    version found, the version this code reads and what to do.
    """


class NoUsableCheckpointError(ValueError):
    """A run has checkpoints, and none of them can be resumed from; the message lists why and what to do."""
