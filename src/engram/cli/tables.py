"""``engram tables``: inspect disk tables and move a run's tables between tiers."""

from __future__ import annotations

import argparse
from pathlib import Path

from engram.storage.config import StorageConfig
from engram.storage.disk import JOURNAL_FILE, STATE_SUFFIX, WEIGHT_FILE
from engram.storage.table_file import TableFile
from engram.training.convert import convert_run_tables


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tables",
        help="inspect disk tables; move a run's Engram tables between device, host and disk",
        description="Engram tables can live on the device, in host memory or on disk (memory-mapped files).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    convert = actions.add_parser(
        "convert",
        help="move the tables of a run's newest checkpoint to another tier",
        description="Rewrite the newest checkpoint of RUN with its Engram tables (and their optimizer state) "
        "in tier --to, and record the tier in RUN/run.json. Disk tables are written to --directory "
        "(default RUN/tables); converting away from disk leaves the table files in place.",
    )
    convert.add_argument("run_dir", type=Path, metavar="RUN", help="run folder written by `engram train`")
    convert.add_argument("--to", required=True, choices=["device", "host", "disk"], help="the target tier")
    convert.add_argument("--directory", type=Path, default=None, help="disk tier: folder for the table files")
    convert.add_argument("--cache-mb", type=float, default=0.0, help="hot-row cache per table in MiB (host, disk)")
    convert.set_defaults(run=run_convert)

    info = actions.add_parser(
        "info",
        help="describe disk tables (shape, dtype, size, checkpoint state), checking their headers",
        description="PATH is a table file, a table folder (weight.table inside) or a folder of layer folders.",
    )
    info.add_argument("path", type=Path, metavar="PATH")
    info.set_defaults(run=run_info)


def run_convert(args: argparse.Namespace) -> int:
    directory = None if args.directory is None else str(args.directory.resolve())
    target = StorageConfig(tier=args.to, directory=directory, cache_mb=args.cache_mb)
    checkpoint = convert_run_tables(args.run_dir, target)
    print(f"{args.run_dir}: tables now in the {args.to!r} tier (checkpoint {checkpoint.name}, run.json updated)")
    return 0


def _table_folders(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / WEIGHT_FILE).is_file():
        return [path]
    # layer folders, and the shard folders inside them of a run sharded over several processes
    folders = sorted(p.parent for p in path.rglob(WEIGHT_FILE)) if path.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{path} holds no engram table ({WEIGHT_FILE} or layer folders with one)")
    return folders


def _describe(path: Path) -> list[str]:
    lines = []
    files = [path] if path.is_file() else [path / WEIGHT_FILE, *sorted(path.glob(f"*{STATE_SUFFIX}"))]
    for file in dict.fromkeys(files):
        with TableFile.open(file) as table:
            size = table.nbytes / 2**30
            lines.append(
                f"  {file.name:<22} ({table.num_rows:,} x {table.dim}) {str(table.dtype).removeprefix('torch.')}"
                f"  {size:.3f} GiB  {table.metadata}"
            )
    journal = path / JOURNAL_FILE if path.is_dir() else None
    if journal is not None and journal.exists():
        lines.append(f"  {JOURNAL_FILE:<22} {journal.stat().st_size:,} bytes")
    return lines


def run_info(args: argparse.Namespace) -> int:
    for folder in _table_folders(args.path):
        print(folder)
        print("\n".join(_describe(folder)))
    return 0
