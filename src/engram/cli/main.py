"""Entry point of the ``engram`` command: one subcommand per step of the workflow.

Exit codes: 0 success, 2 bad usage or input (missing file, invalid config, bad ids, damaged files), 1 a run
that cannot go on (folder in use, non-finite loss) or anything else, 128 + N stopped by signal N (after a
checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from engram._files import FolderInUseError
from engram.cli import analyze, data, demo, evaluate, experiment, export, generate, inspect, params, tables, train
from engram.training.errors import NonFiniteError, TrainingInterrupted

# In workflow order: what `engram --help` lists.
COMMANDS = (data, train, evaluate, analyze, generate, export, inspect, params, tables, experiment, demo)

EXIT_USAGE = 2
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram",
        description="Conditional memory for language models: hashed n-gram lookup tables (Engram).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as exc:
        print(f"engram {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FolderInUseError, NonFiniteError) as exc:  # the input was fine; the run cannot go on now
        print(f"engram {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except TrainingInterrupted as stop:  # Ctrl-C or SIGTERM, after a checkpoint
        if os.environ.get("RANK", "0") == "0":  # torchrun: one message for the job
            print(f"engram {args.command}: {stop}; run the same command again to resume", file=sys.stderr)
        return 128 + stop.signal_number


if __name__ == "__main__":
    sys.exit(main())
