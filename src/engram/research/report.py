"""Aggregate an experiment's finished runs: statistics over seeds, paired differences, tables and plots.

For every variant and metric: the mean over seeds, the sample standard deviation and a 95% interval
of the mean (Student's t). For every variant against the baseline: the paired difference
(variant - baseline, run by run over the seeds both have finished; the two runs of a seed saw the
same batches) with its own standard deviation and 95% interval. A difference is *resolved* when its
interval excludes zero, which needs at least two seeds.

For a sweep (variants that set ``x``): the least-squares slope of each metric against x (against
log10 x when the experiment plots x on a log scale), fitted per seed over that seed's runs and then
described over seeds like any other number, so the interval carries the seed spread of the slope.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from engram._files import write_text_atomic
from engram.eval.plots import plot_seed_summary
from engram.research.experiment import Experiment, Variant
from engram.research.runner import FINAL_FILE, RunStatus

# The metrics compared in the report, lower is better for each.
METRICS = ("val_loss", "test_loss", "val_bpb", "test_bpb", "val_loss_engram_off", "test_loss_engram_off")
PARAMS = ("params_total", "params_active", "params_tables")

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the normal 1.96
# (too narrow by at most 4%).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_95(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` >= 1 degrees of freedom."""
    if dof < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {dof}")
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def describe(values: list[float]) -> dict[str, float | int | None]:
    """n, mean, sample standard deviation and the 95% interval half-width of the mean (None below 2 values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t_quantile_95(n - 1) * std / math.sqrt(n)}


def collect(statuses: list[RunStatus]) -> list[dict[str, Any]]:
    """The ``final.json`` of every complete run, in plan order."""
    return [json.loads((s.folder / FINAL_FILE).read_text()) for s in statuses if s.complete]


def summarize(experiment: Experiment, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant statistics and paired differences against the baseline (see the module docstring)."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], {})[record["seed"]] = record
    baseline = by_variant.get(experiment.baseline, {})
    variants = []
    for variant in experiment.variants:
        runs = by_variant.get(variant.name, {})
        entry: dict[str, Any] = {
            "name": variant.name,
            "label": variant.label,
            "x": variant.x,
            "seeds": sorted(runs),
            "metrics": {},
            "paired": {},
        }
        for key in PARAMS:
            values = {r[key] for r in runs.values()}
            entry[key] = values.pop() if len(values) == 1 else None  # the same model in every seed
        for metric in METRICS:
            values = [r[metric] for r in runs.values() if r.get(metric) is not None]
            if not values:
                continue
            entry["metrics"][metric] = describe(values)
            diff = paired_difference(runs, baseline, metric)
            if variant.name != experiment.baseline and diff is not None:
                entry["paired"][metric] = diff
        variants.append(entry)
    comparisons = []
    for a, b in experiment.comparisons:
        diffs = {m: paired_difference(by_variant.get(a, {}), by_variant.get(b, {}), m) for m in METRICS}
        comparisons.append({"a": a, "b": b, "paired": {m: d for m, d in diffs.items() if d is not None}})
    planned = len(experiment.variants) * len(experiment.seeds)
    swept = [v for v in experiment.variants if v.x is not None]
    trend = {m: slope_over_seeds(swept, by_variant, m, experiment.log_x) for m in METRICS}
    return {
        "experiment": experiment.name,
        "question": experiment.question,
        "baseline": experiment.baseline,
        "seeds": experiment.seeds,
        "runs_complete": len(records),
        "runs_planned": planned,
        "variants": variants,
        "comparisons": comparisons,
        "log_x": experiment.log_x,
        "trend": {m: t for m, t in trend.items() if t is not None},
    }


def paired_difference(
    runs: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], metric: str
) -> dict[str, Any] | None:
    """``describe`` of run - reference over the seeds both have ``metric`` for, with ``resolved``; None if none."""
    shared = [
        s for s in sorted(runs) if runs[s].get(metric) is not None and reference.get(s, {}).get(metric) is not None
    ]
    if not shared:
        return None
    diff = describe([runs[s][metric] - reference[s][metric] for s in shared])
    diff["resolved"] = diff["ci95"] is not None and abs(diff["mean"]) > diff["ci95"]
    return diff


def slope_over_seeds(
    swept: list[Variant], by_variant: dict[str, dict[int, dict[str, Any]]], metric: str, log_x: bool
) -> dict[str, Any] | None:
    """``describe`` of the per-seed least-squares slope of ``metric`` against x (or log10 x), with
    ``resolved``; None unless some seed has ``metric`` at three or more distinct x."""
    slopes = []
    seeds = sorted({s for v in swept for s in by_variant.get(v.name, {})})
    for seed in seeds:
        points = [
            (math.log10(v.x) if log_x else float(v.x), by_variant[v.name][seed][metric])
            for v in swept
            if by_variant.get(v.name, {}).get(seed, {}).get(metric) is not None
        ]
        if len({x for x, _ in points}) < 3:
            continue
        mean_x = math.fsum(x for x, _ in points) / len(points)
        mean_y = math.fsum(y for _, y in points) / len(points)
        sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in points)
        slopes.append(sxy / math.fsum((x - mean_x) ** 2 for x, _ in points))
    if not slopes:
        return None
    slope = describe(slopes)
    slope["resolved"] = slope["ci95"] is not None and abs(slope["mean"]) > slope["ci95"]
    return slope


# -- output ----------------------------------------------------------------------------------------
def write_report(
    summary: dict[str, Any], records: list[dict[str, Any]], folder: Path, experiment: Experiment
) -> list[Path]:
    """results.json, results.csv (one row per run), results.md and the plot; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        write_text_atomic(folder / "results.json", json.dumps({"summary": summary, "runs": records}, indent=2) + "\n"),
        write_text_atomic(folder / "results.csv", runs_csv(records)),
        write_text_atomic(folder / "results.md", markdown(summary)),
    ]
    if any(v["metrics"] for v in summary["variants"]):
        paths.append(plot(summary, folder / "results.png", experiment))
    return paths


def runs_csv(records: list[dict[str, Any]]) -> str:
    columns = ["variant", "seed", "step", *PARAMS, *METRICS, "val_bpb_engram_off", "test_bpb_engram_off"]
    columns += ["tokens_per_s", "seconds_this_attempt"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(record)
    return out.getvalue()


def _pm(stats: dict[str, Any] | None, digits: int = 4) -> str:
    if not stats or stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _diff(stats: dict[str, Any] | None) -> str:
    if not stats or stats["mean"] is None:
        return "-"
    if stats["ci95"] is None:
        return f"{stats['mean']:+.4f}"
    mark = " *" if stats["resolved"] else ""
    return f"{stats['mean']:+.4f} ± {stats['ci95']:.4f}{mark}"


def markdown(summary: dict[str, Any]) -> str:
    """The results table: per variant mean ± std over seeds, and the paired difference ± 95% interval."""
    lines = [
        f"Experiment `{summary['experiment']}`: {summary['question']}",
        "",
        f"{summary['runs_complete']} of {summary['runs_planned']} runs complete; seeds {summary['seeds']}. "
        "Losses in nats per token on the full splits (mean ± standard deviation over seeds); "
        f"Δ = paired difference to `{summary['baseline']}` (mean ± 95% interval, * = interval excludes 0).",
        "",
        "| variant | total params | active params | table params | seeds | val loss | Δ val | test loss | Δ test "
        "| test bpb | test loss, Engram off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in summary["variants"]:
        m, p = v["metrics"], v["paired"]
        cells = [
            f"`{v['name']}`" + (f" ({v['label']})" if v["label"] else ""),
            *(f"{v[k]:,}" if v[k] is not None else "-" for k in PARAMS),
            str(len(v["seeds"])),
            _pm(m.get("val_loss")),
            _diff(p.get("val_loss")),
            _pm(m.get("test_loss")),
            _diff(p.get("test_loss")),
            _pm(m.get("test_bpb")),
            _pm(m.get("test_loss_engram_off")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += [
            "",
            "Paired differences between variants (first minus second, mean ± 95% interval over the seeds both "
            "finished, * = interval excludes 0):",
            "",
            "| comparison | seeds | Δ val loss | Δ test loss | Δ test bpb |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in summary["comparisons"]:
            p = c["paired"]
            seeds = p["test_loss"]["n"] if "test_loss" in p else 0
            cells = [
                f"`{c['a']}` − `{c['b']}`",
                str(seeds),
                *(_diff(p.get(m)) for m in ("val_loss", "test_loss", "test_bpb")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if summary["trend"]:
        per = "per decade of x" if summary["log_x"] else "per unit of x"
        cells = [f"{m.replace('_', ' ')} {_diff(summary['trend'].get(m))}" for m in ("val_loss", "test_loss")]
        n = summary["trend"].get("test_loss", {}).get("n", 0)
        lines += [
            "",
            f"Least-squares slope over the swept variants, {per} (mean ± 95% interval over {n} seeds): "
            + "; ".join(cells)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, experiment: Experiment, metric: str = "test_loss") -> Path:
    """Mean ``metric`` with ±1 standard deviation over seeds: against x where variants set it, else bars."""
    entries = [
        {"name": v["name"], "x": v["x"], "mean": v["metrics"][metric]["mean"], "std": v["metrics"][metric]["std"]}
        for v in summary["variants"]
        if metric in v["metrics"]
    ]
    return plot_seed_summary(
        entries,
        path,
        ylabel=f"{metric.replace('_', ' ')} (nats/token), mean ± std over seeds",
        title=f"{experiment.name}: {summary['runs_complete']} of {summary['runs_planned']} runs",
        x_label=experiment.x_label,
        log_x=experiment.log_x,
    )
