"""Training: sparse table optimizer, schedules, the loop, metrics and checkpoints."""

from engram.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engram.training.config import TrainConfig, lr_factor
from engram.training.sparse_adam import SparseRowAdam
from engram.training.trainer import Trainer, build_optimizers, seed_everything

__all__ = [
    "SparseRowAdam",
    "TrainConfig",
    "Trainer",
    "build_optimizers",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
    "seed_everything",
]
