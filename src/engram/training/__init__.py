"""Training: sparse table optimizers, schedules, the loop, metrics and checkpoints."""

from engram.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engram.training.config import TrainConfig, lr_factor
from engram.training.distributed import init_distributed
from engram.training.errors import (
    CheckpointVersionError,
    DamagedCheckpointError,
    NonFiniteError,
    NoUsableCheckpointError,
    TrainingInterrupted,
)
from engram.training.row_optim import RowAdagrad, RowAdam, RowOptimizer
from engram.training.trainer import Trainer, build_optimizers, seed_everything

__all__ = [
    "CheckpointVersionError",
    "DamagedCheckpointError",
    "NoUsableCheckpointError",
    "NonFiniteError",
    "RowAdagrad",
    "RowAdam",
    "RowOptimizer",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "build_optimizers",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
    "seed_everything",
]
