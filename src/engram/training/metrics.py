"""Training metrics as JSON lines, and the loss-curve plot drawn from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed at once, so a crash loses nothing logged)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record; a last line cut short by a crash is left out, damage elsewhere raises ``ValueError``."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError as e:
                if number == len(lines):
                    break
                raise ValueError(f"{self.path}, line {number}: not a JSON record ({e})") from e
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them), atomically."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Train and validation loss against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.2, alpha=0.8)
    for key, label in (("val_loss", "validation"), ("val_loss_engram_off", "validation, Engram off")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
