"""``engram tables``: inspect and verify disk tables; move a run's tables between tiers."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engram._files import FolderLock
from engram.storage.config import StorageConfig
from engram.storage.disk import JOURNAL_FILE, table_files, table_folders, verify_tables
from engram.storage.table_file import RowCheck, TableFile
from engram.training.convert import convert_run_tables
from engram.training.run import SPEC_FILE, read_spec

SHOWN_RANGES = 20  # damaged row ranges listed per file without --all


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tables",
        help="inspect and verify disk tables; move a run's Engram tables between device, host and disk",
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

    paths = "PATH is a table file, a table folder (weight.table inside), a folder of layer folders, or a run folder."
    info = actions.add_parser(
        "info",
        help="describe disk tables (shape, dtype, size, format, checkpoint state), checking their headers",
        description=paths,
    )
    info.add_argument("path", type=Path, metavar="PATH")
    info.set_defaults(run=run_info)

    verify = actions.add_parser(
        "verify",
        help="check every row of disk tables and their optimizer state against the row checksums",
        description=f"{paths} Reads every table and optimizer-state file in chunks (a table larger than RAM "
        "is fine) and lists the rows that do not match their checksums; run it while no process trains the "
        "tables. Exit code 0: everything intact; 1: damage found; 2: no table at PATH.",
    )
    verify.add_argument("path", type=Path, metavar="PATH")
    verify.add_argument("--all", action="store_true", help=f"list every damaged row range (default: {SHOWN_RANGES})")
    verify.set_defaults(run=run_verify)


def run_convert(args: argparse.Namespace) -> int:
    directory = None if args.directory is None else str(args.directory.resolve())
    target = StorageConfig(tier=args.to, directory=directory, cache_mb=args.cache_mb)
    checkpoint = convert_run_tables(args.run_dir, target)
    print(f"{args.run_dir}: tables now in the {args.to!r} tier (checkpoint {checkpoint.name}, run.json updated)")
    return 0


def _tables_path(path: Path) -> Path:
    """``path``, or for a run folder the folder its disk tables are in (``storage.directory``, default RUN/tables)."""
    if not (path / SPEC_FILE).is_file():
        return path
    storage = read_spec(path).storage_for(path)
    if storage.tier != "disk":
        raise FileNotFoundError(
            f"{path} keeps its tables in the {storage.tier!r} tier, inside its checkpoints (checked by SHA-256 when "
            "loaded), not in disk table files"
        )
    return Path(storage.directory)


def _format(table: TableFile) -> str:
    return "row checksums" if table.checksums is not None else "no row checksums"


def _describe(path: Path) -> list[str]:
    lines = []
    for file in table_files(path):
        with TableFile.open(file) as table:
            size = table.nbytes / 2**30
            lines.append(
                f"  {file.name:<22} ({table.num_rows:,} x {table.dim}) {str(table.dtype).removeprefix('torch.')}"
                f"  {size:.3f} GiB  format {table.version}, {_format(table)}  {table.metadata}"
            )
    journal = path / JOURNAL_FILE if path.is_dir() else None
    if journal is not None and journal.exists():
        lines.append(f"  {JOURNAL_FILE:<22} {journal.stat().st_size:,} bytes")
    return lines


def run_info(args: argparse.Namespace) -> int:
    for folder in table_folders(_tables_path(args.path)):
        print(folder)
        print("\n".join(_describe(folder)))
    return 0


def _ranges(check: RowCheck, show_all: bool) -> str:
    """The damaged rows as inclusive ranges: ``rows 17, 40-42``."""
    shown = check.damaged if show_all else check.damaged[:SHOWN_RANGES]
    text = ", ".join(str(start) if stop == start + 1 else f"{start}-{stop - 1}" for start, stop in shown)
    more = len(check.damaged) - len(shown)
    return f"rows {text}" + (f", ... ({more:,} more ranges; --all lists them)" if more else "")


def _verdict(check: RowCheck, show_all: bool) -> str:
    if check.error is not None:
        return f"cannot be checked: {check.error}"
    if check.version < 2:
        return f"no row checksums (format {check.version}): not checked"
    if check.intact:
        return f"{check.rows_checked:,} rows checked: intact"
    return f"{check.rows_checked:,} rows checked: {check.damaged_rows:,} damaged, {_ranges(check, show_all)}"


def run_verify(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if (args.path / SPEC_FILE).is_file():  # a run: not while it trains (a row between its write and its checksum's)
        with FolderLock(args.path, "engram tables verify"):
            checks = verify_tables(_tables_path(args.path))
    else:
        checks = verify_tables(_tables_path(args.path))
    seconds = time.perf_counter() - start
    folder = None
    for check in checks:
        if check.path.parent != folder:
            folder = check.path.parent
            print(folder)
        print(f"  {check.path.name:<22} {_verdict(check, args.all)}")
    rows = sum(check.rows_checked for check in checks)
    gib = sum(check.path.stat().st_size for check in checks if check.rows_checked) / 2**30
    bad = [check for check in checks if not check.intact]
    speed = f"{rows:,} rows in {len(checks)} files ({gib:.2f} GiB) checked in {seconds:.1f} s"
    if not bad:
        print(f"{speed}: intact")
        return 0
    print(
        f"{speed}: damage in {len(bad)} file(s). Their rows cannot be trusted: restore the tables from a copy, "
        "or start the run over in a new folder"
    )
    return 1
