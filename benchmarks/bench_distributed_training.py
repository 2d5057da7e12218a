"""Training throughput of a whole Engram+MoE model on 1, 2 and 4 processes: `engram train` under torchrun.

The model is ``configs/moe-small.json`` with the Engram layer of ``configs/engram-layers.json``
(8 heads of about 646K rows x 32 float32: one table of about 5.2M rows, host tier by default), trained on the bundled
Shakespeare corpus with the DeepSeek-V3 tokenizer. The global batch is fixed (``--batch`` x
``--seq-len`` tokens); with N processes each takes 1/N of its sequences, its shard of the table
rows and a full replica of the dense weights (DDP). Each process runs one torch thread.

Reported per job, from the run's ``metrics.jsonl`` (rank 0), medians over the log windows after the
first (which holds start-up): tokens/s of the whole job, and ``table_exchange_share``, the share of
rank 0's wall time spent in the table's all-to-all exchanges (waiting for slower ranks included).
DDP's gradient all-reduce overlaps the backward pass and is not separated out. ``--prefetch both``
runs every process count twice: sharded lookups prefetched at forward start (``storage.prefetch=true``,
the default: the rows exchange overlaps the layers in front of the Engram layer) and exchanged in
the layer (``false``); a single process has no exchange, so it runs once.

Run from the repository root::

    python benchmarks/bench_distributed_training.py --markdown
    python benchmarks/bench_distributed_training.py --small   # a dry run, under a minute
    python benchmarks/bench_distributed_training.py --procs 2 --prefetch both --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _report import environment_lines, format_table
from engram.config import EngramConfig
from engram.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def model_config(small: bool) -> ModelConfig:
    """``moe-small`` with the Engram layer of ``engram-layers`` (both much smaller with ``small``)."""
    config = ModelConfig.load(REPO / "configs" / "moe-small.json")
    engram = EngramConfig.load(REPO / "configs" / "engram-layers.json")
    if small:
        engram = EngramConfig.from_dict({**engram.to_dict(), "engram_vocab_size": [20_000, 20_000]})
        config = ModelConfig.from_dict({**config.to_dict(), "d_model": 64, "n_layers": 2, "ffn_hidden": 128})
    return ModelConfig.from_dict({**config.to_dict(), "engram": engram.to_dict()})


def train(workdir: Path, nproc: int, prefetch: bool, args: argparse.Namespace) -> list[dict]:
    """One `engram train` job on ``nproc`` processes, sharded lookups prefetched or not; its metrics records."""
    run = workdir / f"run{nproc}-{'prefetch' if prefetch else 'in-layer'}"
    sets = {
        "train.steps": args.steps,
        "train.batch_size": args.batch,
        "train.seq_len": args.seq_len,
        "train.log_every": args.log_every,
        "train.eval_every": 0,
        "train.checkpoint_every": 0,
        "train.threads": 1,
        "train.device": "cpu",
        "storage.tier": args.tier,
        "storage.prefetch": str(prefetch).lower(),
    }
    command = ["-m", "engram", "train", "--data", str(workdir / "data"), "--model", str(workdir / "model.json")]
    command += ["--out", str(run), "--no-progress", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += [] if nproc == 1 else ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*launcher, *command], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict]) -> tuple[float, float | None]:
    """Median tokens/s and table exchange share over the log windows after the first."""
    windows = [r for r in records if "tokens_per_s" in r][1:]
    shares = [r["table_exchange_share"] for r in windows if "table_exchange_share" in r]
    return statistics.median(r["tokens_per_s"] for r in windows), statistics.median(shares) if shares else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step, over all processes")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tier", default="host", choices=["device", "host", "disk"])
    parser.add_argument("--prefetch", default="on", choices=["on", "off", "both"], help="storage.prefetch (default on)")
    parser.add_argument("--small", action="store_true", help="a tiny model and few steps (dry run)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as every training process (train.threads=1); this one only reports
    if args.small:
        args.steps, args.log_every, args.seq_len = 8, 2, 64
    procs = [int(p) for p in args.procs.split(",")]
    config = model_config(args.small)

    with tempfile.TemporaryDirectory(prefix="engram-bench-dist-") as tmp:
        workdir = Path(tmp)
        (workdir / "model.json").write_text(config.to_json())
        subprocess.run(
            [sys.executable, "-m", "engram", "data", "shakespeare", "--out", str(workdir / "data"), "--quiet"],
            check=True,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        settings = {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]
        jobs = [(n, prefetch) for n in procs for prefetch in (settings if n > 1 else settings[:1])]
        results = {(n, prefetch): summary(train(workdir, n, prefetch, args)) for n, prefetch in jobs}

    engram = config.engram
    facts = [
        (
            "model",
            f"moe-small + engram-layers{' (shrunk: --small)' if args.small else ''}, tables in the {args.tier} tier",
        ),
        ("batch", f"{args.batch} x {args.seq_len} tokens per step over all processes; {args.steps} steps"),
        ("processes", f"{', '.join(map(str, procs))} (torchrun, gloo on loopback, 1 torch thread each)"),
    ]
    facts.append(
        ("table", f"{engram.n_heads} heads, base sizes {engram.engram_vocab_size}, {engram.head_dim} floats a row")
    )
    print("\n".join(environment_lines(facts, args.markdown)))
    base = next(iter(results.values()))[0]
    header = ["processes", "prefetch", "tokens/s", f"vs {procs[0]} proc", "ms/step", "table exchange share (rank 0)"]
    body = [
        [
            str(n),
            ("on" if prefetch else "off") if n > 1 else "-",
            f"{speed:,.0f}",
            f"{speed / base:.2f}x",
            f"{1000 * args.batch * args.seq_len / speed:,.0f}",
            "-" if share is None else f"{share:.0%}",
        ]
        for (n, prefetch), (speed, share) in results.items()
    ]
    print("\n".join(format_table(header, body, args.markdown)))


if __name__ == "__main__":
    main()
