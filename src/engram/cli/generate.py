"""``engram generate``: continue a prompt with a trained run's model (KV cache, incremental Engram hashing)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engram._json_config import option_type
from engram.inference import generate
from engram.training.run import load_run


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="continue a prompt with the model of a trained run")
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run folder written by `engram train`")
    parser.add_argument("--prompt", required=True, help="text to continue")
    # Checked here, before the model loads; `generate` checks its arguments again for library callers.
    parser.add_argument(
        "--max-new-tokens", type=option_type(int, ge=1), default=60, help="at least 1 (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature", type=option_type(float, ge=0), default=0.8, help="0 is greedy (default: %(default)s)"
    )
    parser.add_argument(
        "--top-k",
        type=option_type(int, ge=1),
        default=40,
        help="sample among the k likeliest tokens, k >= 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--top-p", type=option_type(float, gt=0, le=1), default=None, help="nucleus sampling threshold in (0, 1]"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--engram-off", action="store_true", help="generate with the Engram output zeroed")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, _, tokenizer, dataset = load_run(args.run_dir, args.device)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt produced no tokens; give some text")
    room = model.config.max_seq_len - len(prompt)
    if room < args.max_new_tokens:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; with --max-new-tokens {args.max_new_tokens} the sequence exceeds "
            f"the model's max_seq_len of {model.config.max_seq_len} (use at most {max(room, 0)} new tokens)"
        )
    if args.engram_off:
        for block in model.blocks:
            block.engram = None
    ids = generate(
        model,
        torch.tensor([prompt]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=dataset.manifest.get("separator_id"),
    )
    print(tokenizer.decode(ids[0].tolist()))
    return 0
