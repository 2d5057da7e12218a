"""``engram eval``: validation or test loss, bits per byte, and the loss with Engram switched off."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram._json_config import option_type
from engram.eval.evaluate import evaluate_with_and_without_engram, token_byte_lengths
from engram.training.run import load_run


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a trained run on its dataset's validation or test split")
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run folder written by `engram train`")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument(
        "--batches", type=option_type(int, ge=1), default=None, help="evaluate at most this many batches (default: all)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, spec, tokenizer, dataset = load_run(args.run_dir, args.device)
    kwargs = dict(
        batch_size=spec.train.batch_size,
        seq_len=spec.train.seq_len,
        max_batches=args.batches,
        byte_lengths=token_byte_lengths(tokenizer),
    )
    on, off = evaluate_with_and_without_engram(model, dataset.tokens(args.split), **kwargs)
    result = {"split": args.split, "tokens": on.tokens, "loss": round(on.loss, 4), "bits_per_byte": on.bits_per_byte}
    if off is not None:
        result["loss_engram_off"] = round(off.loss, 4)
    print(json.dumps(result))
    return 0
