"""``engram experiment``: the research questions as grids of runs, run with seeds and reported with intervals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram._json_config import option_type
from engram.model.accounting import estimate_parameters
from engram.research.experiment import Experiment, bundled_experiments, load_experiment
from engram.research.report import collect, summarize, write_report
from engram.research.runner import (
    data_folder,
    experiment_folder,
    import_results,
    plan_runs,
    prepare_data,
    run_experiment,
)

DEFAULT_OUT = Path("runs/experiments")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "experiment",
        help="run the research experiments (variants x seeds) and report them with intervals",
        description="An experiment is a grid of training runs (model variants x seeds) defined in a JSON file; "
        "`list` shows the bundled ones. `run` trains every run that is not complete yet (resuming interrupted "
        "ones), each in its own process, then writes the report; `report` writes it from the runs finished so far.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="the bundled experiments and their questions").set_defaults(run=_list)

    def experiment_parser(name: str, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help)
        sub.add_argument("experiment", metavar="NAME_OR_FILE", help="a bundled experiment's name or an experiment file")
        sub.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
        sub.add_argument("--quick", action="store_true", help="a few steps of every run (kept in NAME-quick/)")
        return sub

    show = experiment_parser("show", "the experiment's variants with their parameter counts, and its runs' status")
    show.set_defaults(run=_show)
    run = experiment_parser("run", "train the runs that are not complete, then write the report")
    run.add_argument(
        "--jobs", type=option_type(int, ge=1), default=None, help="runs at once (default: cores / threads)"
    )
    run.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    run.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
    run.set_defaults(run=_run)
    experiment_parser("report", "write results.{json,csv,md} and the plot from the runs finished so far").set_defaults(
        run=_report
    )
    imports = experiment_parser(
        "import", "put finished runs back from a results.json (e.g. a committed one), so that run skips them"
    )
    imports.add_argument("results", type=Path, help="a results.json written by `engram experiment report`")
    imports.set_defaults(run=_import)


def _list(args: argparse.Namespace) -> int:
    for name, path in sorted(bundled_experiments().items()):
        experiment = load_experiment(path)
        runs = len(experiment.variants) * len(experiment.seeds)
        print(f"{name:24} {len(experiment.variants):3} variants x {len(experiment.seeds)} seeds = {runs:3} runs")
        print(f"{'':24} {experiment.question}")
    return 0


def _show(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.experiment)
    print(f"{experiment.name}: {experiment.question}")
    print(f"{'variant':28}{'total':>12}{'active':>12}{'tables':>12}  built as")
    for variant in experiment.variants:
        config = experiment.model_config(variant)
        counts = estimate_parameters(config)
        how = f"rho={variant.rho} ({variant.match})" if variant.rho is not None else "baseline backbone"
        if variant.rho is not None and not variant.tables:
            how += ", without tables"
        how += "".join(f", {item}" for item in variant.engram_set + variant.set)
        if variant.memory != "engram":
            how += f", {variant.memory}"
        print(f"{variant.name:28}{counts.total:>12,}{counts.active:>12,}{counts.engram_tables:>12,}  {how}")
    folder = experiment_folder(experiment, args.out, args.quick)
    data = data_folder(experiment, args.out)
    if (data / "manifest.json").is_file():
        statuses = plan_runs(experiment, args.out, data, args.quick)
        done = sum(s.complete for s in statuses)
        print(f"\n{done} of {len(statuses)} runs complete in {folder}")
    return 0


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.experiment)
    variants = args.only.split(",") if args.only else None
    try:
        failed = run_experiment(experiment, args.out, args.jobs, args.quick, variants, _ints(args.seeds))
    except KeyboardInterrupt:
        print("engram experiment: stopped; every run saved a checkpoint: run the same command again to resume")
        return 130
    _write(experiment, args.out, args.quick)
    if failed:
        print(f"{failed} runs failed; their logs are named above. Run the same command again to retry them.")
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    _write(load_experiment(args.experiment), args.out, args.quick)
    return 0


def _import(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.experiment)
    try:
        records = json.loads(args.results.read_text())["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{args.results}: not a results.json of `engram experiment report` (needs a 'runs' list): {error}"
        ) from error
    imported, refused = import_results(experiment, args.out, records, args.quick)
    folder = experiment_folder(experiment, args.out, args.quick)
    print(f"{len(imported)} runs imported into {folder}; {len(records) - len(imported) - len(refused)} were complete")
    if refused:
        print(f"{len(refused)} records left out:")
        for record, reason in refused:
            print(f"  {record.get('variant')} seed {record.get('seed')}: {reason}")
    return 0


def _write(experiment: Experiment, out: Path, quick: bool) -> None:
    statuses = plan_runs(experiment, out, prepare_data(experiment, out), quick)
    records = collect(statuses)
    summary = summarize(experiment, records)
    paths = write_report(summary, records, experiment_folder(experiment, out, quick), experiment)
    print((experiment_folder(experiment, out, quick) / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
