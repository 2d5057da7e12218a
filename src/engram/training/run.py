"""A training run on disk: its spec (model, training, data, tokenizer) and everything built from it.

A run folder holds ``run.json`` (the spec), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/``.
``start_run`` builds the tokenizer, dataset, model and trainer from a spec (resuming if the folder
already has checkpoints); ``load_run`` rebuilds the trained model for evaluation and generation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engram._json_config import JsonConfig
from engram.data import TokenDataset
from engram.eval.evaluate import token_byte_lengths
from engram.hashing.compression import CompressedTokenizer
from engram.hashing.indexer import EngramIndexer
from engram.model.config import ModelConfig
from engram.model.lm import EngramLM
from engram.storage.config import StorageConfig
from engram.training.checkpoint import latest_checkpoint, load_checkpoint
from engram.training.config import TrainConfig
from engram.training.distributed import barrier, init_distributed, rank
from engram.training.trainer import Trainer, resolve_device, seed_everything

SPEC_FILE = "run.json"


@dataclass
class RunSpec(JsonConfig):
    """What a run trains, on what, with which tokenizer (``None``: DeepSeek-V3), and where its tables live.

    ``storage`` is a deployment choice, not part of the model: a run's tables can change tier
    (``engram tables convert``) without changing the run.
    """

    model: ModelConfig
    train: TrainConfig
    data: str
    tokenizer: str | None = None
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.storage, dict):
            self.storage = StorageConfig.from_dict(self.storage)

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
    """The model of ``config`` with its output vocabulary trimmed to the dataset's kept ids."""
    kept = torch.from_numpy(dataset.vocabulary.astype("int64"))
    config = dataclasses.replace(config, vocab_size=len(kept) + 1, input_vocab_size=tokenizer.raw_vocab_size)
    indexer = EngramIndexer(config.engram, tokenizer) if config.engram is not None else None
    model = EngramLM(config, indexer=indexer, storage=storage)
    model.set_vocabulary(kept)
    return model


def _open(spec: RunSpec) -> tuple[CompressedTokenizer, TokenDataset]:
    tokenizer = CompressedTokenizer(spec.tokenizer)
    dataset = TokenDataset(spec.data)
    dataset.check_tokenizer(tokenizer)
    return tokenizer, dataset


def start_run(spec: RunSpec, run_dir: str | Path, progress: bool = True) -> Trainer:
    """Build the trainer of a run, resuming from its newest checkpoint if there is one.

    Under ``torchrun`` every rank calls this: it joins the process group first, so the model's
    Engram tables are sharded over the ranks (see ``engram.training.distributed``).

    Raises:
        ValueError: ``run_dir`` already holds a different spec (a different model, data or tokenizer).
    """
    run_dir = Path(run_dir)
    spec_path = run_dir / SPEC_FILE
    if spec_path.is_file():
        saved = RunSpec.from_json(spec_path.read_text())
        if saved.model != spec.model or saved.data != spec.data or saved.tokenizer != spec.tokenizer:
            raise ValueError(f"{run_dir} holds another run (see {spec_path}); choose a new --out folder")
    init_distributed(spec.train.dist_timeout_s)  # under torchrun: before the model, whose tables it shards
    if rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_spec(run_dir, spec)
    barrier()

    tokenizer, dataset = _open(spec)
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
    trainer.resume()
    return trainer


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
    return RunSpec.from_json(spec_path.read_text()), checkpoint


def write_spec(run_dir: str | Path, spec: RunSpec) -> None:
    """Write ``run_dir/run.json`` atomically."""
    path = Path(run_dir) / SPEC_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(spec.to_json() + "\n")
    os.replace(tmp, path)


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[EngramLM, RunSpec, CompressedTokenizer, TokenDataset]:
    """The trained model of a run (newest checkpoint), in eval mode, with its spec, tokenizer and data."""
    run_dir = Path(run_dir)
    spec, checkpoint = read_run(run_dir)
    tokenizer, dataset = _open(spec)
    model = build_model(spec.model, tokenizer, dataset, spec.storage_for(run_dir)).to(resolve_device(device))
    load_checkpoint(checkpoint, model)
    return model.eval(), spec, tokenizer, dataset
