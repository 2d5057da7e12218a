"""A training run on disk: its spec (model, training, data, tokenizer) and everything built from it.

A run folder holds ``run.json`` (the spec), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/``.
``start_run`` builds the tokenizer, dataset, model and trainer from a spec (resuming if the folder
already has checkpoints); ``load_run`` rebuilds the trained model for evaluation and generation.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engram._files import FolderInUseError, FolderLock, write_text_atomic
from engram._json_config import JsonConfig
from engram.data import TokenDataset
from engram.eval.evaluate import token_byte_lengths
from engram.indexing.compression import CompressedTokenizer
from engram.indexing.indexer import EngramIndexer
from engram.model.config import ModelConfig
from engram.model.lm import EngramLM
from engram.storage.base import durable
from engram.storage.config import StorageConfig
from engram.storage.disk import WEIGHT_FILE
from engram.storage.placement import place_tables
from engram.storage.table_file import TableFile
from engram.training.checkpoint import latest_checkpoint, load_checkpoint, step_folders
from engram.training.config import TrainConfig
from engram.training.distributed import all_ranks_agree, barrier, init_distributed, rank
from engram.training.trainer import Trainer, resolve_device, seed_everything

SPEC_FILE = "run.json"


@dataclass
class RunSpec(JsonConfig):
    """What a run trains, on what, with which tokenizer (``None``: DeepSeek-V3), and where its tables live.

    ``storage`` is a deployment choice, not part of the model: a run's tables can change tier
    (``engram tables convert``) without changing the run. ``model``, ``train`` and ``storage`` may be
    given as dicts; an error in one names its key path (``train.steps: ...``), and ``RunSpec.load(path)``
    also names the file.
    """

    model: ModelConfig
    train: TrainConfig
    data: str
    tokenizer: str | None = None
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def storage_for(self, run_dir: str | Path) -> StorageConfig:
        """The storage config with the disk tier's folder resolved (default ``<run>/tables``)."""
        if self.storage.tier != "disk" or self.storage.directory is not None:
            return self.storage
        return dataclasses.replace(self.storage, directory=str(Path(run_dir) / "tables"))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict; values are JSON (``1e-3``, ``[1, 2]``) or plain strings.

    Raises:
        ValueError: an override without ``=`` or naming a key that does not exist.
    """
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value, e.g. train.steps=200")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section of the config")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: unknown key {leaf!r}; known here: {sorted(node)}")
        node[leaf] = value
    return data


def build_model(
    config: ModelConfig, tokenizer: CompressedTokenizer, dataset: TokenDataset, storage: StorageConfig | None = None
) -> EngramLM:
    """The model of ``config`` with its output vocabulary trimmed to the dataset's kept ids, its
    Engram tables placed in ``storage`` (default: the device), sharded over the default process
    group if one is initialised (``place_tables``)."""
    kept = torch.from_numpy(dataset.vocabulary.astype("int64"))
    config = dataclasses.replace(config, vocab_size=len(kept) + 1, input_vocab_size=tokenizer.raw_vocab_size)
    indexer = EngramIndexer(config.engram, tokenizer) if config.engram is not None else None
    model = EngramLM(config, indexer=indexer)
    model.set_vocabulary(kept)
    return place_tables(model, storage or StorageConfig())


def _open(spec: RunSpec) -> tuple[CompressedTokenizer, TokenDataset]:
    tokenizer = CompressedTokenizer(spec.tokenizer)
    dataset = TokenDataset(spec.data)
    dataset.check_tokenizer(tokenizer)
    return tokenizer, dataset


def start_run(spec: RunSpec, run_dir: str | Path, progress: bool = True) -> Trainer:
    """Build the trainer of a run, resuming from its newest usable checkpoint if there is one.

    Everything that can refuse the command is checked before the run folder changes: the spec
    against the one the folder holds, the table tier against its checkpoints, the data and
    tokenizer, and the checkpoint resumed from; a refused command leaves the folder as it was (a
    folder it created is removed again). The trainer holds the folder's lock (``trainer.lock``): a
    second process that starts on the same folder is refused until this one exits.

    A disk-tier run that stopped before its first checkpoint starts over: the table files its
    earlier attempt trained in ``<run>/tables`` hold nothing saved and are rebuilt.

    Under ``torchrun`` every rank calls this: it joins the process group first and then builds
    the model, whose Engram tables ``build_model`` shards over the ranks (see
    ``engram.training.distributed``).

    Raises:
        ValueError: ``run_dir`` holds a different run (model, data or tokenizer) or keeps its tables
            in another tier, or a checkpoint does not fit.
        NoUsableCheckpointError: the run has checkpoints and every one is damaged.
        FolderInUseError: another process is working on ``run_dir``.
    """
    run_dir = Path(run_dir)
    saved = read_spec(run_dir) if (run_dir / SPEC_FILE).is_file() else None
    if saved is not None:
        _check_same_run(run_dir, saved, spec)
    init_distributed(spec.train.dist_timeout_s)  # under torchrun: before build_model shards the tables
    tokenizer, dataset = _open(spec)
    created = not run_dir.exists()
    lock = lock_run(run_dir, "engram train")
    try:
        if rank() == 0:
            _forget_unsaved_tables(run_dir, spec)
        barrier()
        seed_everything(spec.train.seed)
        model = build_model(spec.model, tokenizer, dataset, spec.storage_for(run_dir))
        trainer = Trainer(
            model,
            spec.train,
            dataset.tokens("train"),
            dataset.tokens("val"),
            out_dir=run_dir,
            byte_lengths=token_byte_lengths(tokenizer),
            run_info={"data": dataset.manifest.get("fingerprint", spec.data)},
            progress=progress,
        )
        if not step_folders(run_dir / "checkpoints"):  # a custom storage.directory may hold another run's tables
            for table in model.engram_tables():
                if (in_place := durable(table)) is not None:
                    in_place.check_untrained()
        trainer.resume()
        if rank() == 0:
            write_spec(run_dir, spec)
        barrier()
    except BaseException:
        if lock is not None:
            lock.release()
        if created and rank() == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    trainer.lock = lock
    return trainer


def _check_same_run(run_dir: Path, saved: RunSpec, spec: RunSpec) -> None:
    """Refuse a spec that would train another run in ``run_dir``, or move its tables without converting them."""
    if saved.model != spec.model or saved.data != spec.data or saved.tokenizer != spec.tokenizer:
        raise ValueError(f"{run_dir} holds another run (see {run_dir / SPEC_FILE}); choose a new --out folder")
    if not step_folders(run_dir / "checkpoints"):
        return  # nothing saved yet: the tables may start anywhere
    before, after = saved.storage_for(run_dir), spec.storage_for(run_dir)
    folders = [None if side.directory is None else Path(side.directory).resolve() for side in (before, after)]
    if before.tier != after.tier or folders[0] != folders[1]:
        where = f"{before.tier!r} tier" + (f" at {before.directory}" if before.tier == "disk" else "")
        raise ValueError(
            f"{run_dir} keeps its Engram tables in the {where}; a training command cannot move them. Move them with "
            f"`engram tables convert {run_dir} --to {after.tier}`, then train without storage.tier/directory"
        )


def _forget_unsaved_tables(run_dir: Path, spec: RunSpec) -> None:
    """Delete disk tables in ``<run>/tables`` that an earlier attempt trained but never checkpointed.

    Such tables hold no saved state (the run has no checkpoint), so the run starts over with fresh
    ones. Tables outside the run folder, or of a run with checkpoints, are never touched here.
    """
    storage = spec.storage_for(run_dir)
    if storage.tier != "disk" or step_folders(run_dir / "checkpoints"):
        return
    tables = Path(storage.directory)
    if tables.resolve().parent != run_dir.resolve() or not tables.is_dir():
        return
    weights = list(tables.rglob(WEIGHT_FILE))
    for path in weights:
        with TableFile.open(path) as table:
            if table.metadata.get("committed_step") is not None:
                return  # a checkpointed table whose checkpoints are gone: check_untrained explains
    if weights:
        warnings.warn(
            f"{tables} holds tables that an earlier attempt trained but never checkpointed; starting them over",
            stacklevel=3,
        )
    shutil.rmtree(tables)


def lock_run(run_dir: str | Path, purpose: str) -> FolderLock | None:
    """Create ``run_dir`` if needed and take its lock (rank 0 of a distributed job; None on other ranks).

    Raises:
        FolderInUseError: another process holds the lock (on every rank of a distributed job).
    """
    run_dir = Path(run_dir)
    lock, refusal = None, ""
    if rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = FolderLock(run_dir, purpose).acquire()
        except FolderInUseError as error:
            refusal = str(error)
    if not all_ranks_agree(not refusal):
        raise FolderInUseError(refusal or f"{run_dir} is in use by another process (rank 0 could not lock it)")
    return lock


def read_run(run_dir: str | Path) -> tuple[RunSpec, Path]:
    """The spec of a run and its newest complete checkpoint.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run, or has no complete checkpoint yet.
    """
    run_dir = Path(run_dir)
    spec_path = run_dir / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no {SPEC_FILE}); train one with `engram train`")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet")
    return read_spec(run_dir), checkpoint


def read_spec(run_dir: str | Path) -> RunSpec:
    """The spec in ``run_dir/run.json``; errors name the file."""
    return RunSpec.load(Path(run_dir) / SPEC_FILE)


def write_spec(run_dir: str | Path, spec: RunSpec) -> None:
    """Write ``run_dir/run.json`` atomically."""
    write_text_atomic(Path(run_dir) / SPEC_FILE, spec.to_json() + "\n")


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[EngramLM, RunSpec, CompressedTokenizer, TokenDataset]:
    """The trained model of a run (newest checkpoint), in eval mode, with its spec, tokenizer and data.

    Disk tables are brought back to that checkpoint in place (a rollback writes them), so for a run
    whose tables are on disk the model holds the run folder's lock as ``model.run_lock`` for as
    long as it lives (``model.run_lock.release()`` lets it go): a run being trained is refused.
    """
    run_dir = Path(run_dir)
    spec, checkpoint = read_run(run_dir)
    tokenizer, dataset = _open(spec)
    lock = FolderLock(run_dir, "a process reading its disk tables").acquire() if spec.storage.tier == "disk" else None
    try:
        model = build_model(spec.model, tokenizer, dataset, spec.storage_for(run_dir)).to(resolve_device(device))
        load_checkpoint(checkpoint, model)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    model.run_lock = lock
    return model.eval(), spec, tokenizer, dataset
