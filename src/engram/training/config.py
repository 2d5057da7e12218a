"""Training hyper-parameters: one dataclass, round-tripping to JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from engram._json_config import JsonConfig


@dataclass
class TrainConfig(JsonConfig):
    """How to train.

    The defaults follow the paper's recipe where it states one: backbone weight decay 0.1, Engram
    tables at 5x the backbone learning rate with Adam and no weight decay, updated as sparse rows.

    Attributes:
        steps: optimizer steps in the whole run.
        batch_size, seq_len: sequences per step and tokens per sequence.
        lr: peak learning rate of the backbone.
        optimizer: ``"adamw"`` for every backbone parameter, or ``"muon"`` for the 2-D hidden
            matrices (embedding, LM head, norms and other vectors stay on AdamW).
        betas, weight_decay: AdamW's; weight decay applies to matrices only.
        table_optimizer: the Engram tables' sparse row optimizer: ``"adam"`` (the paper's; two
            moments per element) or ``"adagrad"`` (row-wise, one float per row: for tables whose
            Adam state would not fit their tier).
        table_lr_mult, table_weight_decay, table_betas: its learning rate multiplier, and Adam's
            weight decay and betas.
        schedule: ``"cosine"`` decay to ``min_lr_ratio * lr``, ``"step"`` (x0.316 at 80% and again
            at 90% of the run, the DeepSeek schedule), or ``"constant"``; all after linear warmup.
        warmup_steps: linear warmup from 0.
        grad_clip: clip the global norm of the dense gradients (0 disables).
        seed: seeds the initialisation, the data order and every random generator.
        log_every, eval_every, eval_batches, checkpoint_every: cadence (in steps; 0 disables).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``; bf16 autocast on CUDA.
        threads: CPU threads for torch (0 leaves torch's default).
        dist_timeout_s: runs on several processes (``torchrun``): how long a rank waits for the
            others in a collective before it fails with an error (a rank died or hangs). Must
            cover the slowest checkpoint write.
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    optimizer: Literal["adamw", "muon"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    table_optimizer: Literal["adam", "adagrad"] = "adam"
    table_lr_mult: float = 5.0
    table_weight_decay: float = 0.0
    table_betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 500
    device: str = "auto"
    threads: int = 0
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.table_betas = tuple(self.table_betas)
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.table_lr_mult <= 0:
            raise ValueError("lr and table_lr_mult must be > 0")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.table_optimizer not in ("adam", "adagrad"):
            raise ValueError(f"table_optimizer must be 'adam' or 'adagrad', got {self.table_optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        for name in ("warmup_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return 1.0 if progress < 0.8 else 0.316 if progress < 0.9 else 0.316**2
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine
