"""Training hyper-parameters: one dataclass, round-tripping to JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from engram._json_config import JsonConfig, require


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
        nonfinite: what a step with a non-finite loss or gradient does: ``"stop"`` (default: no
            update is applied, the last good state is checkpointed and training ends with an
            error) or ``"skip"`` (the step's update is dropped, counted and logged; training goes on).
        max_skipped_steps: with ``nonfinite="skip"``, stop anyway after this many skipped steps in a row.
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    dist_timeout_s: float = 600.0
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 20

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "max_skipped_steps"):
            require(self, name, ge=1)
        for name in ("warmup_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "threads"):
            require(self, name, ge=0)
        require(self, "lr", gt=0)
        require(self, "table_lr_mult", gt=0)
        for name in ("betas", "table_betas"):
            require(self, name, ge=0, lt=1)
        for name in ("weight_decay", "table_weight_decay", "grad_clip"):
            require(self, name, ge=0)
        require(self, "min_lr_ratio", ge=0, le=1)
        require(self, "seed", ge=0, le=2**32 - 1)  # numpy's global seed (seed_everything) takes 32 bits
        require(self, "dist_timeout_s", gt=0)


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
