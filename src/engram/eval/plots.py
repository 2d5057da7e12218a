"""Pictures of a comparison: loss curves of several runs, and Engram gate values per token."""

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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


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
