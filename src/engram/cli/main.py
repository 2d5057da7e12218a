"""Entry point of the ``engram`` command: one subcommand per step of the workflow.

Exit codes: 0 success, 2 bad usage or input (missing file, invalid config, bad ids), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engram.cli import data, demo, evaluate, generate, inspect, params, tables, train

# In workflow order: what `engram --help` lists.
COMMANDS = (data, train, evaluate, generate, inspect, params, tables, demo)

EXIT_USAGE = 2


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


if __name__ == "__main__":
    sys.exit(main())
