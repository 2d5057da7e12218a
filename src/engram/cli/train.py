"""``engram train``: train a model on a prepared dataset, from config files plus overrides, resuming by default."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram.cli._options import add_tokenizer_option
from engram.model.config import ModelConfig
from engram.storage.config import StorageConfig
from engram.training.config import TrainConfig
from engram.training.run import SPEC_FILE, RunSpec, apply_overrides, read_spec, start_run


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a model on a dataset prepared by `engram data` (resumes an interrupted run)",
        description="Train the model of --model on --data. Writes run.json, metrics.jsonl, loss.png and "
        "checkpoints/ into --out; running the same command again continues from the newest checkpoint.",
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder written by `engram data`")
    parser.add_argument("--model", type=Path, required=True, help="ModelConfig JSON (see configs/)")
    parser.add_argument("--train", type=Path, default=None, help="TrainConfig JSON (default: TrainConfig())")
    parser.add_argument(
        "--storage",
        type=Path,
        default=None,
        help="StorageConfig JSON: where the Engram tables live (default: on the device; see docs/usage.md)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    add_tokenizer_option(parser, help="the tokenizer the data was prepared with (default: DeepSeek-V3)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=200 --set model.d_model=128 "
        "--set storage.tier=disk (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = ModelConfig.load(args.model)
    train = TrainConfig.load(args.train) if args.train is not None else TrainConfig()
    if args.storage is not None:
        storage = StorageConfig.load(args.storage)
    elif (args.out / SPEC_FILE).is_file():  # resuming: the tables stay where the run keeps them (--set may change)
        storage = read_spec(args.out).storage
    else:
        storage = StorageConfig()
    tree = {"model": model.to_dict(), "train": train.to_dict(), "storage": storage.to_dict()}
    tree = apply_overrides(tree, args.overrides)
    if not (args.data / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{args.data} is not a dataset folder (no manifest.json); prepare one with `engram data`"
        )
    spec = RunSpec(
        model=tree["model"],
        train=tree["train"],
        data=str(args.data.resolve()),
        tokenizer=None if args.tokenizer is None else str(args.tokenizer.resolve()),
        storage=tree["storage"],
    )
    trainer = start_run(spec, args.out, progress=not args.no_progress)
    report = print if trainer.rank == 0 else (lambda *_: None)  # one report for a job of several ranks
    if trainer.step:
        report(f"resuming {args.out} at step {trainer.step}")
    trainer.train()
    result = trainer.evaluate()
    report(json.dumps({"step": trainer.step, **{k: round(v, 4) for k, v in result.items()}}))
    report(f"checkpoint of step {trainer.step}: {trainer.last_checkpoint}")
    report(f"run folder: {args.out} (metrics.jsonl, loss.png, checkpoints/)")
    return 0
