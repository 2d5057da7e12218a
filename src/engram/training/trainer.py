"""The training loop: parameter groups, schedules, clipping, metrics, checkpoints and exact resume.

Engram tables get a sparse row optimizer (``RowAdam``, or ``RowAdagrad``) that updates only the
rows a batch looked up, with its state in the table's tier, so a step's optimizer cost does not
grow with table size; every other parameter gets AdamW (or Muon
for the hidden matrices). The data order depends only on (seed, step), and a checkpoint holds the
weights, every optimizer's state, the random generators and the step, so a resumed run reproduces
the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engram.data.batches import RandomWindows
from engram.eval.evaluate import evaluate_with_and_without_engram
from engram.model.lm import EngramLM
from engram.storage.sharded import ShardedTable
from engram.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engram.training.config import TrainConfig, lr_factor
from engram.training.distributed import mean_over_ranks, rank, sum_over_ranks_, world_size, wrap_dense_ddp
from engram.training.metrics import MetricsLog, plot_losses
from engram.training.row_optim import RowAdagrad, RowAdam, RowOptimizer


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def table_parameters(model: EngramLM) -> list[nn.Parameter]:
    """The Engram table weights that are model parameters (device tier, sharded or not), which dense optimizers skip."""
    return [p for table in model.engram_tables() for p in table.parameters()]


def build_table_optimizer(model: EngramLM, config: TrainConfig) -> RowOptimizer:
    """The sparse row optimizer of the Engram tables: ``RowAdam`` (default) or ``RowAdagrad``."""
    lr = config.lr * config.table_lr_mult
    if config.table_optimizer == "adagrad":
        return RowAdagrad(model.engram_tables(), lr=lr)
    return RowAdam(model.engram_tables(), lr=lr, betas=config.table_betas, weight_decay=config.table_weight_decay)


def build_optimizers(model: EngramLM, config: TrainConfig) -> dict[str, torch.optim.Optimizer | RowOptimizer]:
    """``{"tables": RowAdam, "adamw": AdamW, "muon": Muon}`` (only the groups that have parameters).

    Weight decay applies to the weights of linear and embedding layers, not to norms, biases,
    convolutions or hyper-connection weights. With Muon, the hidden linear weights move to Muon
    and the embedding, LM head and everything else stay on AdamW.
    """
    tables = {id(p) for p in table_parameters(model)}
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    vocabulary = {id(model.embed.weight), id(model.head.weight)}
    muon, decay, no_decay = [], [], []
    for param in model.parameters():
        if id(param) in tables:
            continue
        if config.optimizer == "muon" and id(param) in matrices and id(param) not in vocabulary:
            muon.append(param)
        elif id(param) in matrices:
            decay.append(param)
        else:
            no_decay.append(param)
    optimizers: dict[str, torch.optim.Optimizer | RowOptimizer] = {}
    if model.engram_tables():
        optimizers["tables"] = build_table_optimizer(model, config)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers["adamw"] = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)
    if muon:
        optimizers["muon"] = torch.optim.Muon(
            muon, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


class Trainer:
    """Trains an ``EngramLM`` on a token array, on one process or on every rank of a ``torchrun`` job.

    On several ranks (``torch.distributed`` initialised before the model was built, so its tables
    are sharded) each rank takes its slice of every step's batch of ``config.batch_size`` sequences,
    dense gradients are averaged by DDP and table row gradients by the shard owners: a step computes
    what one process computes on the whole batch. Rank 0 alone writes metrics and shows progress;
    every rank takes part in checkpoints, which hold each rank's shard of the tables.

    Args:
        model: the model (on any device; moved to ``config.device``).
        config: training hyper-parameters.
        train_tokens: 1-D array of training token ids.
        val_tokens: optional held-out token ids for evaluation.
        out_dir: where metrics, plots and checkpoints go (None keeps nothing on disk).
        byte_lengths: optional (V,) UTF-8 bytes per id, for bits per byte.
        run_info: JSON-able facts stored with every checkpoint and checked on resume; the
            fingerprint of the model's tokenizer is recorded as ``"tokenizer"`` automatically.
        progress: show a progress bar.
    """

    def __init__(
        self,
        model: EngramLM,
        config: TrainConfig,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray | None = None,
        out_dir: str | Path | None = None,
        byte_lengths: np.ndarray | None = None,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
    ):
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals slow the LM head's backward 10-30x on CPU
        self.model = model.to(self.device)
        self.config = config
        self.world, self.rank = world_size(), rank()
        if config.batch_size % self.world:
            raise ValueError(
                f"train.batch_size={config.batch_size} must be a multiple of the {self.world} ranks: each rank "
                "takes an equal slice of every step's batch"
            )
        if self.world > 1 and not all(isinstance(t, ShardedTable) for t in model.engram_tables()):
            raise ValueError(
                f"this process is one of {self.world} ranks, but the model's Engram tables are not sharded: build "
                "the model after joining the process group (engram.training.distributed.init_distributed), so "
                "that build_table shards them"
            )
        # The module the forward pass goes through: DDP averages the dense gradients across ranks.
        self.forward_model = wrap_dense_ddp(self.model) if self.world > 1 else self.model
        self.batches = RandomWindows(train_tokens, config.batch_size, config.seq_len, seed=config.seed)
        self.val_tokens = val_tokens
        self.byte_lengths = byte_lengths
        self.run_info = {}
        if model.indexer is not None and model.indexer.compressor.fingerprint is not None:
            self.run_info["tokenizer"] = model.indexer.compressor.fingerprint
        self.run_info.update(run_info or {})
        self.progress = progress
        self.optimizers = build_optimizers(model, config)
        tables = {id(p) for p in table_parameters(model)}
        self.dense_params = [p for p in model.parameters() if id(p) not in tables]
        self.step = 0
        self._exchange_seconds_logged = 0.0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        keeps_metrics = self.out_dir is not None and self.rank == 0
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl") if keeps_metrics else None

    # -- the loop -----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lr(self) -> float:
        factor = lr_factor(self.config, self.step)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        return self.config.lr * factor

    def _rank_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's equal slice of the sequences of batch ``self.step`` (the whole batch on one process)."""
        inputs, targets = self.batches.batch(self.step)
        share = self.config.batch_size // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        return inputs[mine].to(self.device), targets[mine].to(self.device)

    def train_step(self) -> float:
        """One optimizer step on batch ``self.step``; returns the language-model loss (mean over the ranks)."""
        self.model.train()
        inputs, targets = self._rank_batch()
        with self._autocast():
            out = self.forward_model(inputs, targets=targets)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.config.grad_clip)
        self._set_lr()
        for optimizer in self.optimizers.values():
            optimizer.step()
        for moe in self.model.moe_layers():  # every rank moves its selection bias by the whole batch's loads
            sum_over_ranks_(moe.load)
        self.model.update_router_biases()
        self.step += 1
        return mean_over_ranks(out.loss.item(), self.device)

    def train(self, until: int | None = None) -> list[float]:
        """Train from the current step up to ``until`` (default: ``config.steps``); returns the step losses."""
        until = self.config.steps if until is None else min(until, self.config.steps)
        if self.step == 0:  # a disk table trained by an earlier, crashed attempt must not be reused silently
            for table in self.model.engram_tables():
                table.check_untrained()
        losses: list[float] = []
        tokens_per_step = self.config.batch_size * self.config.seq_len
        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            disable=not self.progress or self.rank != 0,
            unit="step",
            dynamic_ncols=True,
        )
        window_start, window_steps = time.perf_counter(), 0
        with bar, self._explain_failed_collectives():
            while self.step < until:
                loss = self.train_step()
                losses.append(loss)
                window_steps += 1
                bar.update(1)
                elapsed = time.perf_counter() - window_start
                speed = tokens_per_step * window_steps / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}")
                if self._due(self.config.log_every) or self.step == until:
                    self._log(
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": self.config.lr * lr_factor(self.config, self.step - 1),
                            "tokens_per_s": speed,
                            **self._cache_hit_rates(),
                            **self._table_exchange_share(elapsed),
                        }
                    )
                    window_start, window_steps = time.perf_counter(), 0
                if self._due(self.config.eval_every) and self.val_tokens is not None:
                    self._log({"step": self.step, **self.evaluate()})
                if self._due(self.config.checkpoint_every) and self.out_dir is not None:
                    self.save()
        if self.out_dir is not None and self.metrics is not None:
            plot_losses(self.metrics.read(), self.out_dir / "loss.png")
        return losses

    @contextlib.contextmanager
    def _explain_failed_collectives(self) -> Iterator[None]:
        """On several ranks, turn the error of a failed collective (a rank died, or hung past the
        timeout: in a step, an evaluation or a checkpoint) into one that says what to do."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except RuntimeError as error:
            newest = latest_checkpoint(self.out_dir / "checkpoints") if self.out_dir is not None else None
            resume = f"the newest complete checkpoint is {newest}" if newest else "there is no complete checkpoint yet"
            raise RuntimeError(
                f"rank {self.rank} of {self.world} stopped at step {self.step}, most likely because another rank died "
                f"or did not answer within train.dist_timeout_s={self.config.dist_timeout_s:g} s; {resume}. "
                f"Start the same command again to resume from it. Cause: {error}"
            ) from error

    def _cache_hit_rates(self) -> dict[str, float]:
        """Hit rate of each table's hot-row cache since the last log line (``table<layer>_cache_hit_rate``)."""
        rates = {}
        for layer, engram in self.model.engram_layers().items():
            cache = getattr(engram.table, "cache", None)
            if cache is not None:
                rates[f"table{layer}_cache_hit_rate"] = cache.hit_rate
                cache.reset_stats()
        return rates

    def _table_exchange_share(self, elapsed: float) -> dict[str, float]:
        """Share of the wall time since the last log line that this rank spent in the sharded tables'
        all-to-all exchanges (``table_exchange_share``; waiting for slower ranks included)."""
        sharded = [table for table in self.model.engram_tables() if isinstance(table, ShardedTable)]
        if not sharded:
            return {}
        total = sum(table.comm_seconds for table in sharded)
        share = (total - self._exchange_seconds_logged) / max(elapsed, 1e-9)
        self._exchange_seconds_logged = total
        return {"table_exchange_share": share}

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss (and bits per byte) with Engram on and, if the model has Engram, off."""
        if self.val_tokens is None:
            raise ValueError("no validation tokens were given to the Trainer")
        kwargs = dict(
            batch_size=self.config.batch_size,
            seq_len=self.config.seq_len,
            max_batches=max_batches or self.config.eval_batches or None,
            byte_lengths=self.byte_lengths,
        )
        with self._autocast():
            on, off = evaluate_with_and_without_engram(self.model, self.val_tokens, **kwargs)
        result = {"val_loss": on.loss}
        if on.bits_per_byte is not None:
            result["val_bpb"] = on.bits_per_byte
        if off is not None:
            result["val_loss_engram_off"] = off.loss
        return result

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the current step under ``out_dir/checkpoints``."""
        if self.out_dir is None:
            raise ValueError("the Trainer has no out_dir to save into")
        return save_checkpoint(
            self.out_dir / "checkpoints",
            self.step,
            self.model,
            self.optimizers,
            train_config=self.config,
            run_info=self.run_info,
        )

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in ``out_dir``; False if there is none."""
        if self.out_dir is None:
            return False
        path = latest_checkpoint(self.out_dir / "checkpoints")
        if path is None:
            return False
        self.step = load_checkpoint(path, self.model, self.optimizers, run_info=self.run_info)
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
        return True
