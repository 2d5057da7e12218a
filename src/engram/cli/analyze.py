"""``engram analyze``: why a run's Engram helps, or does not (engram.eval.analysis).

For RUN (and --compare RUN2, on RUN's data): the LogitLens KL per layer, the loss with Engram on and
off per token class and the mean gates per class (runs with Engram layers), and with --compare the
linear CKA between the two models' hidden states. Writes analysis.json and the plots into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engram._json_config import option_type
from engram.eval.analysis import (
    NgramCounts,
    cka_matrix,
    gate_statistics,
    logit_lens_kl,
    sensitivity_by_class,
)
from engram.eval.plots import plot_cka_heatmap, plot_logit_lens, plot_sensitivity
from engram.indexing.compression import CompressedTokenizer
from engram.model.lm import EngramLM
from engram.training.run import load_run


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "analyze",
        help="LogitLens, CKA, Engram-off loss and gates by token class: why a run's Engram helps",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run folder written by `engram train`")
    parser.add_argument(
        "--compare", type=Path, default=None, metavar="RUN2", help="a second run (same tokenizer) to compare with"
    )
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument(
        "--max-positions",
        type=option_type(int, ge=1),
        default=4096,
        help="evaluation positions, in whole windows of the run's seq_len (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=option_type(int, ge=1), default=8, help="windows per forward pass (default: %(default)s)"
    )
    parser.add_argument("--ngram", type=option_type(int, ge=2), default=3, help="n of the n-gram classes (default: 3)")
    parser.add_argument(
        "--min-count",
        type=option_type(int, ge=1),
        default=5,
        help="training occurrences that make an n-gram frequent (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, required=True, help="folder for analysis.json and the plots")
    parser.set_defaults(run=run)


def _analyse_run(
    model: EngramLM,
    tokenizer: CompressedTokenizer,
    counts: NgramCounts,
    tokens: np.ndarray,
    window: dict[str, Any],
    min_count: int,
) -> dict[str, Any]:
    """LogitLens for any model; the Engram-off sensitivity and gate statistics for one with Engram layers."""
    result: dict[str, Any] = {
        "layers": model.config.n_layers,
        "engram_layers": sorted(model.engram_layers()),
        "logit_lens_kl": logit_lens_kl(model, tokens, **window).tolist(),
    }
    if not model.engram_layers():
        note = {"skipped": "the model has no Engram layers"}
        return {**result, "sensitivity": note, "gates": note}
    per_class = dict(n=counts.n, min_count=min_count)
    result["sensitivity"] = sensitivity_by_class(model, counts, tokens, **window, **per_class)
    result["gates"] = gate_statistics(model, counts, tokens, tokenizer, **window, **per_class)
    return result


def _write_json(data: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp, indent=2)
        tmp.write("\n")
    os.replace(tmp.name, path)


def _run_name(run_dir: Path) -> str:
    """The run's folder name, with its parent's for the seed folders of experiments (``engram/seed0``)."""
    run_dir = run_dir.resolve()
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.startswith("seed") else run_dir.name


def _summary(name: str, result: dict[str, Any]) -> list[str]:
    lines = [f"{name}: LogitLens KL per layer (nats) " + " ".join(f"{kl:.3f}" for kl in result["logit_lens_kl"])]
    sensitivity = result["sensitivity"]
    if "skipped" in sensitivity:
        return [*lines, f"  {sensitivity['skipped']}"]
    overall = sensitivity["all"]
    classes = ", ".join(
        f"{cls} {s['positions']} pos. {s['delta']:+.3f}"
        + ("" if s["share_of_increase"] is None else f" ({s['share_of_increase']:.0%})")
        for cls, s in sensitivity["classes"].items()
        if s["positions"]
    )
    lines.append(f"  Engram off: loss {overall['loss_on']:.3f} -> {overall['loss_off']:.3f}; by class: {classes}")
    gates = result["gates"]
    if "skipped" in gates:
        return [*lines, f"  gates: {gates['skipped']}"]
    for layer, stats in gates["layers"].items():
        means = ", ".join(f"{cls} {s['mean_gate']:.3f}" for cls, s in stats.items() if s["mean_gate"] is not None)
        lines.append(f"  mean gate, layer {layer}: {means}")
    return lines


def run(args: argparse.Namespace) -> int:
    model, spec, tokenizer, dataset = load_run(args.run_dir, args.device)
    runs = [(_run_name(args.run_dir), args.run_dir, model)]
    if args.compare is not None:
        other, _, other_tokenizer, _ = load_run(args.compare, args.device)
        if other_tokenizer.fingerprint != tokenizer.fingerprint:
            raise ValueError(
                f"{args.compare} uses another tokenizer than {args.run_dir}: both models must read the same token ids"
            )
        name = _run_name(args.compare) if _run_name(args.compare) != runs[0][0] else str(args.compare)
        runs.append((name, args.compare, other))
    # Both models see the same windows of RUN's data, and the n-gram classes come from RUN's training split.
    seq_len = min(spec.train.seq_len, *(m.config.max_seq_len for _, _, m in runs))
    window = dict(seq_len=seq_len, batch_size=args.batch_size, max_positions=args.max_positions)
    tokens = dataset.tokens(args.split)
    counts = NgramCounts(dataset.tokens("train"), args.ngram)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = [
        {"name": name, "path": str(path), **_analyse_run(m, tokenizer, counts, tokens, window, args.min_count)}
        for name, path, m in runs
    ]
    analysis: dict[str, Any] = {
        "split": args.split,
        "data": spec.data,
        "seq_len": seq_len,
        "max_positions": args.max_positions,
        "runs": results,
    }
    files = [plot_logit_lens({r["name"]: r["logit_lens_kl"] for r in results}, out / "logit_lens.png")]
    for i, r in enumerate(results):
        if "classes" in r["sensitivity"]:
            path = out / ("sensitivity.png" if i == 0 else "sensitivity_compare.png")
            files.append(
                plot_sensitivity(r["sensitivity"]["classes"], path, f"{r['name']}: loss with Engram on and off")
            )
    summary = [line for r in results for line in _summary(r["name"], r)]
    if args.compare is not None:
        (name_a, _, model_a), (name_b, _, model_b) = runs
        matrix = cka_matrix(model_a, model_b, tokens, **window)
        analysis["cka"] = {"rows": name_a, "columns": name_b, "matrix": matrix.tolist()}
        files.append(plot_cka_heatmap(matrix, out / "cka.png", name_a, name_b))
        summary.append(f"CKA {name_a} vs {name_b}, same layer: " + " ".join(f"{v:.3f}" for v in np.diagonal(matrix)))
    _write_json(analysis, out / "analysis.json")
    print("\n".join(summary))
    print(f"wrote {out / 'analysis.json'}, " + ", ".join(str(f) for f in files))
    return 0
