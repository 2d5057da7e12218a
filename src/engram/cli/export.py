"""``engram export-hf``: write a trained run's model as a Hugging Face transformers folder (``engram.hf``).

The tables keep the run's tier: device and host tables go into the safetensors, disk tables are copied
into ``OUT/tables/`` (docs/transformers.md). The run's tokenizer is written as a transformers tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engram.training.run import load_run


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export-hf",
        help="write a trained run's model as a transformers folder, tables in the run's tier (needs the 'hf' extra)",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run folder written by `engram train`")
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write; must not exist or be empty")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="safetensors shards of at most this size (default: %(default)s)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:  # the optional dependency: imported here, so that the rest of the command line never needs it
        from engram.hf import EngramForCausalLM
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"{args.out} exists and is not an empty folder; choose a new OUT folder")
    model, _, tokenizer, _ = load_run(args.run_dir, "cpu")  # newest checkpoint, its tables in the run's tier
    try:
        hf_model = EngramForCausalLM.from_engram(model)
        # device and host tables go into the safetensors, disk tables are copied into OUT/tables/
        hf_model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    except NotImplementedError as exc:  # tables sharded over several processes
        raise ValueError(str(exc)) from None
    finally:
        if model.run_lock is not None:  # a disk-tier run: its folder was locked while its tables were read
            model.run_lock.release()
    # for tokenizing text (AutoTokenizer, pipeline("text-generation")); loading the model does not need it
    hf_model.save_tokenizer(tokenizer.tokenizer, args.out)
    print(f"wrote {args.out}: load it with `import engram.hf` and AutoModelForCausalLM.from_pretrained")
    return 0
