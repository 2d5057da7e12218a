"""Pictures of a comparison: loss curves of several runs, Engram gate values per token, and the analyses of
engram.eval.analysis (CKA between two models, LogitLens KL per layer, Engram-off loss by token class)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, ax: Any, title: str, path: str | Path, grid: str | None = "both", legend: bool = True) -> Path:
    """Title, grid and legend of a one-axes figure; save it to ``path`` and free it."""
    ax.set_title(title)
    if grid is not None:
        ax.grid(alpha=0.3, axis=grid)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_loss_comparison(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Training loss (thin) and validation loss (markers) of each run against step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.45, linewidth=1.0, label=f"{name}, train")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", linewidth=1.8, label=f"{name}, validation")
        off = [(r["step"], r["val_loss_engram_off"]) for r in records if "val_loss_engram_off" in r]
        if off:
            ax.plot(*zip(*off, strict=True), color=color, marker="x", linestyle=":", label=f"{name}, Engram off")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    return _finish(fig, ax, title, path)


def plot_gate_heatmap(
    sentences: Sequence[tuple[Sequence[str], np.ndarray]], path: str | Path, title: str = "Engram gate"
) -> Path:
    """One panel per sentence: gate value (0..1) per token (columns) and residual branch (rows).

    Args:
        sentences: ``(tokens, gates)`` pairs; ``gates`` has shape (T, M) for T tokens.
    """
    plt = _pyplot()
    height = sum(1.3 + 0.25 * np.asarray(gates).shape[1] for _, gates in sentences)
    fig, axes = plt.subplots(
        len(sentences), 1, figsize=(10, 0.6 + height), dpi=120, squeeze=False, layout="constrained"
    )
    image = None
    for ax, (tokens, gates) in zip(axes[:, 0], sentences, strict=True):
        gates = np.asarray(gates)
        image = ax.imshow(gates.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(tokens)))
        ax.set_xticklabels(
            [repr(t.strip()) if t.strip() else repr(t) for t in tokens], rotation=40, ha="right", fontsize=8
        )
        ax.set_yticks(range(gates.shape[1]))
        ax.set_yticklabels([f"branch {m}" for m in range(gates.shape[1])], fontsize=7)
        for t in range(gates.shape[0]):  # the value itself, so the picture reads without the colour bar
            for m in range(gates.shape[1]):
                ax.text(
                    t,
                    m,
                    f"{gates[t, m]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if gates[t, m] < 0.6 else "black",
                )
    fig.suptitle(title)
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01, label="gate")
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_cka_heatmap(
    matrix: np.ndarray, path: str | Path, row_name: str = "model A", column_name: str = "model B", title: str = ""
) -> Path:
    """Linear CKA (0..1) between the hidden states of two models: ``matrix`` (L_a + 1, L_b + 1).

    Row i is hidden state i of ``row_name`` (0 the embedding, i block i's output), column j that of
    ``column_name``; drawn with layer 0 at the bottom left.
    """
    plt = _pyplot()
    matrix = np.asarray(matrix)
    size = (max(4.5, 1.8 + 0.5 * matrix.shape[1]), max(3.5, 1.2 + 0.5 * matrix.shape[0]))
    fig, ax = plt.subplots(figsize=size, dpi=120)
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0.0, vmax=1.0)
    for i in range(matrix.shape[0]):  # the value itself, so the picture reads without the colour bar
        for j in range(matrix.shape[1]):
            color = "white" if matrix[i, j] < 0.6 else "black"
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_xlabel(f"{column_name}: layer (0 = embedding)")
    ax.set_ylabel(f"{row_name}: layer (0 = embedding)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="CKA")
    return _finish(fig, ax, title or f"linear CKA, {row_name} vs {column_name}", path, grid=None, legend=False)


def plot_logit_lens(
    curves: dict[str, Sequence[float]], path: str | Path, title: str = "LogitLens: KL to the final distribution"
) -> Path:
    """Mean KL(p_layer || p_final) in nats against layer (0 = embedding), one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, kl in curves.items():
        ax.plot(range(len(kl)), kl, marker="o", linewidth=1.8, label=name)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = embedding)")
    ax.set_ylabel("KL(layer || final) (nats)")
    return _finish(fig, ax, title, path)


def plot_sensitivity(
    classes: dict[str, dict[str, Any]], path: str | Path, title: str = "Loss with Engram on and off by token class"
) -> Path:
    """Mean loss with Engram on and off per token class, each pair labelled with the class's positions
    and its share of the loss increase.

    Args:
        classes: ``sensitivity_by_class(...)["classes"]``: per class ``positions``, ``loss_on``,
            ``loss_off`` and ``share_of_increase`` (empty classes, with None means, are drawn empty).
    """
    plt = _pyplot()
    names = list(classes)
    on = [classes[name]["loss_on"] or 0.0 for name in names]
    off = [classes[name]["loss_off"] or 0.0 for name in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.bar(x - 0.2, on, width=0.4, label="Engram on", color="C0")
    bars = ax.bar(x + 0.2, off, width=0.4, label="Engram off", color="C3")
    # The difference is often small next to the losses themselves: print it over each pair.
    deltas = [classes[name]["delta"] for name in names]
    ax.bar_label(bars, ["" if d is None else f"{d:+.3f}" for d in deltas], fontsize=8, padding=2)
    labels = []
    for name in names:
        share = classes[name]["share_of_increase"]
        share = "" if share is None else f", {100 * share:.0f}% of the increase"
        labels.append(f"{name}\n{classes[name]['positions']:,} positions{share}")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("mean loss (nats / token)")
    return _finish(fig, ax, title, path, grid="y")


def plot_seed_summary(
    entries: Sequence[dict[str, Any]],
    path: str | Path,
    ylabel: str,
    title: str = "",
    x_label: str = "",
    log_x: bool = False,
) -> Path:
    """Mean and ±1 standard deviation over seeds of one metric per model variant.

    Args:
        entries: per variant ``name``, ``mean``, ``std`` (None for one seed) and ``x`` (None or a
            number). Variants with ``x`` are drawn as a line against it, the others as dashed
            reference levels with their band; without any ``x``, every variant is a bar.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(entries) + 2), 4.2), dpi=120)
    positioned = sorted((e for e in entries if e["x"] is not None), key=lambda e: e["x"])
    if positioned:
        ax.errorbar(
            [e["x"] for e in positioned],
            [e["mean"] for e in positioned],
            yerr=[e["std"] or 0.0 for e in positioned],
            marker="o",
            capsize=4,
            color="C0",
            label="variants",
        )
        references = [e for e in entries if e["x"] is None]
        for color, entry in enumerate(references, start=1):
            ax.axhline(entry["mean"], linestyle="--", linewidth=1, color=f"C{color}", label=entry["name"])
            if entry["std"]:
                low, high = entry["mean"] - entry["std"], entry["mean"] + entry["std"]
                ax.axhspan(low, high, alpha=0.12, color=f"C{color}")
        ax.set_xlabel(x_label or "x")
        if log_x:
            ax.set_xscale("log")
    else:
        means, stds = [e["mean"] for e in entries], [e["std"] or 0.0 for e in entries]
        ax.bar(range(len(entries)), means, yerr=stds, capsize=4, color="C0", alpha=0.8)
        ax.set_xticks(range(len(entries)), [e["name"] for e in entries], rotation=30, ha="right", fontsize=8)
        low = min(m - s for m, s in zip(means, stds, strict=True))
        high = max(m + s for m, s in zip(means, stds, strict=True))
        margin = 0.1 * (high - low) + 1e-3  # differences are small next to the losses: zoom in on them
        ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title, path, legend=bool(positioned))
