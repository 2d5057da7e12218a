"""Shared reporting for the benchmark scripts: the machine facts and plain-text or markdown tables."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

import engram


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    """A table as lines: markdown, or aligned plain text (first column left, the rest right)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(cells) + " |" for cells in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(cells) for cells in body]


def environment_lines(extra: list[tuple[str, str]], markdown: bool) -> list[str]:
    """The command that ran, the versions and the machine, then ``extra`` facts of the run."""
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    items = [
        ("command", f"`{command}`" if markdown else command),
        ("engram", engram.__version__),
        ("torch", torch.__version__),
        ("numpy", np.__version__),
        ("python", platform.python_version()),
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("torch threads", str(torch.get_num_threads())),
        *extra,
    ]
    return [f"- {k}: {v}" if markdown else f"{k + ':':15} {v}" for k, v in items]
