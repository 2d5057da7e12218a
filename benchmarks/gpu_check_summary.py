"""The summary table of ``benchmarks/gpu_check.sh``: the CUDA tests' counts and the host-vs-device tier ratios.

Usage: python benchmarks/gpu_check_summary.py RESULTS_DIR

Reads ``RESULTS_DIR/tests.xml`` (pytest's JUnit XML) and ``RESULTS_DIR/gpu_tiers.json``
(``benchmarks/gpu_tiers.py --out``), prints the table and writes it to ``RESULTS_DIR/summary.txt``.
Exit status: 0 if every test passed or skipped, the benchmark finished and its correctness check
was OK; 1 otherwise (the table says which part failed).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_tiers import format_table  # the benchmark's own plain-text table layout


def test_counts(path: Path) -> dict[str, int] | None:
    """passed/failed/errors/skipped from a JUnit XML file (None if there is none: pytest did not get that far)."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    for suite in suites:
        for name in counts:
            counts[name] += int(suite.get(name, 0))
    failed = counts["failures"] + counts["errors"]
    return {"passed": counts["tests"] - failed - counts["skipped"], "failed": failed, "skipped": counts["skipped"]}


def tier_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per workload: median ms of each configuration, host/device ratios (paired), prefetch gain."""
    body = []
    for workload, configs in results.get("workloads", {}).items():
        device = configs["device"]["median_ms"]
        on, off = configs["host, prefetch on"], configs["host, prefetch off"]
        body.append(
            [
                workload,
                f"{device:.2f}",
                f"{on['median_ms']:.2f}",
                f"{off['median_ms']:.2f}",
                f"{on['vs_device_paired']:.3f}x",
                f"{off['vs_device_paired']:.3f}x",
                f"{off['median_ms'] / on['median_ms']:.3f}x",
            ]
        )
    return body


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python benchmarks/gpu_check_summary.py RESULTS_DIR")
    folder = Path(argv[0])
    ok = True
    lines = ["", "== GPU check summary =="]

    counts = test_counts(folder / "tests.xml")
    if counts is None:
        lines.append("CUDA tests: no results (tests.xml missing: see tests.log)")
        ok = False
    else:
        ok &= counts["failed"] == 0
        lines += [
            "",
            *format_table(
                ["CUDA tests", "passed", "failed", "skipped"], [["tests/test_cuda.py", *map(str, counts.values())]]
            ),
        ]

    bench = folder / "gpu_tiers.json"
    results = json.loads(bench.read_text()) if bench.exists() else {}
    environment = results.get("environment", {})
    if environment:
        lines += ["", f"device: {environment.get('gpu', 'cpu (dry run)')}, torch {environment.get('torch')}, "
                  f"CUDA {environment.get('cuda')}"]  # fmt: skip
    if "model" in results:
        gb = sum(results["model"]["table_bytes"]) / 1e9
        batch = results.get("batch", {})
        lines.append(f"tables: {gb:.3g} GB of float32 rows; batch {batch.get('sequences')} x {batch.get('seq_len')}")
    body = tier_rows(results)
    finished = "wall_seconds" in results
    if body:
        header = ["workload", "device ms", "host+prefetch ms", "host, no prefetch ms", "host+prefetch / device",
                  "host, no prefetch / device", "prefetch gain"]  # fmt: skip
        lines += ["", *format_table(header, body)]
        lines.append(
            "ratios: median of per-round ratios (each host step and the device step of its round ran back to back)"
        )
    if not finished:
        lines.append("GPU tier benchmark: did not finish (see gpu_tiers.log)")
        ok = False
    correctness = results.get("correctness")
    if correctness is not None:
        lines.append(
            f"tier correctness check (float32): {'OK' if correctness['ok'] else 'DIFFERENT'}; logits max |diff| "
            f"{correctness['logits_max_abs_diff']:.3g}, rows max |diff| {correctness['rows_max_abs_diff']:.3g}"
        )
        ok &= bool(correctness["ok"])
    if finished:
        lines.append(f"benchmark wall time: {results['wall_seconds']:.0f} s")
    lines += ["", f"GPU check: {'PASSED' if ok else 'FAILED'}"]
    text = "\n".join(lines)
    print(text)
    (folder / "summary.txt").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
