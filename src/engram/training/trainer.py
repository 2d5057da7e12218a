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
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engram._files import FolderLock
from engram.data.batches import RandomWindows
from engram.eval.evaluate import evaluate_with_and_without_engram
from engram.model.lm import EngramLM
from engram.storage.base import durable
from engram.storage.device import DeviceTable
from engram.storage.disk import TableStateError
from engram.storage.sharded import ShardedTable
from engram.training.checkpoint import (
    checkpoint_damage,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    step_folders,
)
from engram.training.config import TrainConfig, lr_factor
from engram.training.distributed import peer_failure, rank, sum_over_ranks, sum_over_ranks_, world_size, wrap_dense_ddp
from engram.training.errors import DamagedCheckpointError, NonFiniteError, NoUsableCheckpointError, TrainingInterrupted
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

    On several ranks (``torch.distributed`` initialised and the tables sharded over its ranks by
    ``engram.storage.place_tables``) each rank takes its slice of every step's batch of ``config.batch_size`` sequences,
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
        for table in model.engram_tables():  # draw device tables' rows now, not inside the first (compiled) step
            if isinstance(table, DeviceTable):
                table.materialize()
        self.config = config
        self.world, self.rank = world_size(), rank()
        if config.batch_size % self.world:
            raise ValueError(
                f"train.batch_size={config.batch_size} must be a multiple of the {self.world} ranks: each rank "
                "takes an equal slice of every step's batch"
            )
        if self.world > 1 and not all(isinstance(t, ShardedTable) for t in model.engram_tables()):
            raise ValueError(
                f"this process is one of {self.world} ranks, but the model's Engram tables are not sharded: join "
                "the process group first (engram.training.distributed.init_distributed), then shard them with "
                "engram.storage.place_tables(model, storage, process_group) before building the Trainer"
            )
        # The module the forward pass goes through: DDP averages the dense gradients across ranks.
        self.forward_model = wrap_dense_ddp(self.model) if self.world > 1 else self.model
        # The batches' ids are checked on the host, before their copy to the device: the step then
        # calls the model with check_ids=False and reads no value on the device but its status.
        self.batches = RandomWindows(
            train_tokens, config.batch_size, config.seq_len, seed=config.seed, vocab_size=model.num_input_ids
        )
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
        self.skipped_steps = 0  # steps dropped for a non-finite loss or gradient (nonfinite="skip")
        self._skipped_in_a_row = 0
        self._stop_signal: int | None = None  # set by SIGINT/SIGTERM: save and stop after this step
        self._stopping = False  # every rank agreed to stop after this step
        self.last_checkpoint: Path | None = None  # the newest checkpoint saved or resumed from
        self.lock: FolderLock | None = None  # the run folder's lock, when start_run took it
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

    def _rank_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's equal slice of the sequences of batch ``step`` (the whole batch on one process)."""
        inputs, targets = self.batches.batch(step)
        share = self.config.batch_size // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        return inputs[mine].to(self.device), targets[mine].to(self.device)

    def train_step(self) -> float:
        """One optimizer step on batch ``self.step``; returns the language-model loss (mean over the ranks).

        The step is applied only if the loss and every gradient (dense and table rows) are finite on
        every rank. Otherwise nothing changes: with ``config.nonfinite == "skip"`` the step is counted
        in ``skipped_steps`` and NaN is returned; with ``"stop"`` (or after ``max_skipped_steps``
        skips in a row) ``NonFiniteError`` is raised.
        """
        self.model.train()
        inputs, targets = self._rank_batch(self.step)
        # Disk tables read the next batch's rows into the page cache while this one computes.
        following = self._rank_batch(self.step + 1)[0] if self.model.reads_ahead() else None
        with self._autocast():  # the ids were checked by self.batches
            out = self.forward_model(inputs, targets=targets, check_ids=False, read_ahead=following)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._dense_grad_norm()
        tables = self.optimizers.get("tables")
        row_grads = tables.take_grads() if tables is not None else []
        rows_finite = [torch.isfinite(grad).all() for _, _, grad in row_grads]
        # One transfer to the host per step: the loss, which values were finite, whether a stop was asked for.
        device = out.loss.device
        status = torch.stack(
            [
                out.loss.detach().double(),
                torch.isfinite(loss.detach()).double(),
                torch.isfinite(grad_norm).double().to(device),
                torch.stack(rows_finite).all().double().to(device) if rows_finite else torch.ones((), device=device),
                torch.tensor(float(self._stop_signal is not None), device=device),
            ]
        )
        loss_sum, loss_ok, dense_ok, rows_ok, stops = sum_over_ranks(status)
        self._stopping = stops > 0
        checks = {"loss": loss_ok, "dense gradient": dense_ok, "table row gradient": rows_ok}
        if any(ok < self.world for ok in checks.values()):
            return self._drop_step(" and ".join(name for name, ok in checks.items() if ok < self.world))
        self._skipped_in_a_row = 0
        self._set_lr()
        for name, optimizer in self.optimizers.items():
            if name == "tables":
                optimizer.step(row_grads)
            else:
                optimizer.step()
        for moe in self.model.moe_layers():  # every rank moves its selection bias by the whole batch's loads
            sum_over_ranks_(moe.load)
        self.model.update_router_biases()
        self.step += 1
        return loss_sum / self.world

    def _dense_grad_norm(self) -> torch.Tensor:
        """The global norm of the dense gradients, clipped to ``grad_clip`` when that is > 0."""
        if self.config.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.dense_params, self.config.grad_clip)
        norms = [torch.linalg.vector_norm(p.grad) for p in self.dense_params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def _drop_step(self, what: str) -> float:
        """Discard the gradients of a step whose ``what`` was not finite; skip it, or raise ``NonFiniteError``."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        for moe in self.model.moe_layers():
            moe.load.zero_()
        self._skipped_in_a_row += 1
        if self.config.nonfinite == "stop" or self._skipped_in_a_row >= self.config.max_skipped_steps:
            why = (
                f"the {what} of step {self.step + 1} is NaN or infinite"
                if self.config.nonfinite == "stop"
                else f"{self._skipped_in_a_row} steps in a row (the last: step {self.step + 1}) had a non-finite "
                f"{what} (train.max_skipped_steps={self.config.max_skipped_steps})"
            )
            raise NonFiniteError(
                f"{why}; no update of that step was applied. Lower train.lr or raise train.warmup_steps, check the "
                "data, or set train.nonfinite=skip to drop such steps"
            )
        self.step += 1
        self.skipped_steps += 1
        self._log({"step": self.step, "skipped": f"non-finite {what}", "skipped_steps": self.skipped_steps})
        return float("nan")

    def train(self, until: int | None = None) -> list[float]:
        """Train from the current step up to ``until`` (default: ``config.steps``); returns the step losses
        (NaN for a skipped step).

        With an ``out_dir``, training always ends with a checkpoint of its last completed step
        (``last_checkpoint``), also when it stops early: on SIGINT or SIGTERM (Ctrl-C) the current step
        finishes, a checkpoint is written and ``TrainingInterrupted`` is raised (a second signal stops at
        once); on a non-finite loss or gradient the last good state is saved and ``NonFiniteError``
        raised.
        """
        until = self.config.steps if until is None else min(until, self.config.steps)
        self._stop_signal, self._stopping = None, False
        if self.step == 0:  # a disk table trained by an earlier, crashed attempt must not be reused silently
            for table in self.model.engram_tables():
                if (in_place := durable(table)) is not None:
                    in_place.check_untrained()
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
        try:
            with bar, self._explain_failed_collectives(), self._stop_on_signals():
                try:
                    while self.step < until and not self._stopping:
                        loss = self.train_step()
                        losses.append(loss)
                        window_steps += 1
                        bar.update(1)
                        elapsed = time.perf_counter() - window_start
                        speed = tokens_per_step * window_steps / max(elapsed, 1e-9)
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}")
                        skipped = math.isnan(loss)  # logged as such by train_step
                        if not skipped and (self._due(self.config.log_every) or self.step == until):
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
                        if self._stopping:
                            break
                        if self._due(self.config.eval_every) and self.val_tokens is not None:
                            self._log({"step": self.step, **self.evaluate()})
                        if self._due(self.config.checkpoint_every) and self.out_dir is not None:
                            self.save()
                except NonFiniteError as error:
                    saved = self._save_last_step()
                    where = f"the last good state, step {self.step}, is saved in {saved}" if saved else "nothing saved"
                    raise NonFiniteError(f"{error}; {where}") from None
                self._save_last_step()
        finally:
            if self.metrics is not None:
                plot_losses(self.metrics.read(), self.out_dir / "loss.png")
        if self._stopping:
            raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, self.step, self.last_checkpoint)
        return losses

    def _save_last_step(self) -> Path | None:
        """A checkpoint of the current step unless one was saved (or resumed from) already; None without out_dir."""
        if self.out_dir is None:
            return None
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step_{self.step:08d}":
            self.save()
        return self.last_checkpoint

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM ask for a stop after the current step (with a checkpoint);
        a second signal stops at once (``KeyboardInterrupt``). Only the main thread can take signals."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.rank == 0:
                print(
                    f"\n{signal.Signals(signum).name}: stopping after step {self.step + 1} with a checkpoint "
                    "(send it again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def _explain_failed_collectives(self) -> Iterator[None]:
        """On several ranks, turn the error of a failed collective (a rank died, or hung past the
        timeout: in a step, an evaluation or a checkpoint) into one that says what to do. Any
        other error (out of memory, a bug) passes through unchanged."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except RuntimeError as error:
            failure = peer_failure(error)
            if failure is None:
                raise
            timeout = f"train.dist_timeout_s={self.config.dist_timeout_s:g} s"
            what = {
                "gone": "another rank's connection closed (it died or was stopped)",
                "timed out": f"another rank did not answer within {timeout}",
                "failed": "a collective operation failed",
            }[failure]
            newest = latest_checkpoint(self.out_dir / "checkpoints") if self.out_dir is not None else None
            resume = f"the newest complete checkpoint is {newest}" if newest else "there is no complete checkpoint yet"
            raise RuntimeError(
                f"rank {self.rank} of {self.world} stopped at step {self.step} because {what}; {resume}. "
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

    def close(self) -> None:
        """Let go of the run folder's lock (``start_run`` takes it): another process may train the folder now.

        The trainer stays usable in memory (evaluation, generation)."""
        if self.lock is not None:
            self.lock.release()

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the current step under ``out_dir/checkpoints``."""
        if self.out_dir is None:
            raise ValueError("the Trainer has no out_dir to save into")
        self.last_checkpoint = save_checkpoint(
            self.out_dir / "checkpoints",
            self.step,
            self.model,
            self.optimizers,
            train_config=self.config,
            run_info=self.run_info,
            trainer_state={"skipped_steps": self.skipped_steps, "skipped_in_a_row": self._skipped_in_a_row},
        )
        return self.last_checkpoint

    def resume(self) -> bool:
        """Continue from the newest usable checkpoint in ``out_dir``; False if there is none.

        A damaged checkpoint (a file missing, cut short or changed) is skipped with a warning and
        renamed ``step_XXXXXXXX.damaged-*``, so that it is never overwritten; metrics past the step
        resumed from are dropped (a resumed run rewrites them), as are all metrics when the run has no
        checkpoint at all (an earlier attempt stopped before its first one).

        Raises:
            NoUsableCheckpointError: the run has checkpoints and none is usable; the message lists what
                is damaged and how to start over. Nothing was changed.
            ValueError: a checkpoint belongs to another model, run, tier or optimizer setup.
            CheckpointVersionError: a checkpoint is in another format version (an older engram's); nothing
                was changed.
        """
        if self.out_dir is None:
            return False
        damaged: list[DamagedCheckpointError] = []
        for path in step_folders(self.out_dir / "checkpoints"):
            problem = checkpoint_damage(path)
            if problem is not None:  # found alike by every rank: the files are shared
                damaged.append(DamagedCheckpointError(path, problem))
                continue
            try:
                meta = load_checkpoint(path, self.model, self.optimizers, run_info=self.run_info)
            except DamagedCheckpointError as error:
                damaged.append(error)
                continue
            except TableStateError as error:  # disk tables return to their newest checkpoint only
                if not damaged:
                    raise
                extra = f"the disk tables cannot return to {path.name}: {error}"
                raise self._no_usable_checkpoint(damaged, extra) from None
            self.step = int(meta["step"])
            self.skipped_steps = int(meta.get("trainer", {}).get("skipped_steps", 0))
            self._skipped_in_a_row = int(meta.get("trainer", {}).get("skipped_in_a_row", 0))
            self.last_checkpoint = path
            for error in damaged:
                aside = set_aside(error.path) if self.rank == 0 else error.path
                warnings.warn(
                    f"{error}; resuming from {path.name} instead (the damaged one is now {aside})", stacklevel=2
                )
            if self.metrics is not None:
                self.metrics.truncate_after(self.step)
            return True
        if damaged:
            raise self._no_usable_checkpoint(damaged)
        if self.metrics is not None:
            self.metrics.truncate_after(0)
        return False

    def _no_usable_checkpoint(self, damaged: list[DamagedCheckpointError], extra: str = "") -> NoUsableCheckpointError:
        listing = "".join(f"\n  {error.path.name}: {error.reason}" for error in damaged)
        run = self.out_dir
        return NoUsableCheckpointError(
            f"no checkpoint of {run} is usable:{listing}"
            + (f"\n  {extra}" if extra else "")
            + f"\nNothing was changed. To start this run over deliberately, move {run} away (or train into "
            "another --out folder); to keep it, restore the damaged files from a copy.",
        )
