"""Throughput and traffic of a row-sharded Engram table on 1, 2 and 4 processes (gloo on loopback, CPU).

One Engram table (N=3, K=4 heads per order: 8 heads, rows of ``--dim`` float32; the heads' prime
tables concatenated as a model's layer holds them, about 3.2M rows with the default base size of
400,000 per order) is split by rows over the processes of a ``torchrun`` job, each shard a
``HostTable`` (host tier) of that process, behind ``engram.storage.ShardedTable``. The global batch
(``--batch`` x ``--seq-len`` tokens, 8 lookups each) is fixed; every process takes ``batch / N``
of its sequences, so more processes means less work each, plus the exchange.

Row ids are real: random windows of Shakespeare's works (the corpus bundled with engram), tokenised
with DeepSeek-V3's tokenizer, compressed and hashed by ``EngramIndexer`` (the works joined by the
end-of-sentence id, at which n-gram windows restart), once in this process for every step; the
processes load them, so hashing is not part of the timed steps.

Three phases per job, each ``--warmup`` untimed then ``--steps`` timed steps, every step started on
all processes together by a barrier (``_sharded_worker.py``):

1. Lookup: ``table(indices)`` in eval mode under ``torch.no_grad()``: dedup, owner exchange of ids
   and rows (all_to_all).
2. Training step: the lookup in train mode, backward of ``(rows * w).sum() / tokens`` (``w`` fixed
   random weights), ``RowAdam.step()``: every row's gradient goes to its owner, which updates its
   shard and the Adam state there.

3. Lookup behind compute: the lookup (eval, no grad) after a fixed dense computation standing for
   the layers in front of the Engram layer (``--front-matmuls`` products of this process's
   (tokens, ``--front-dim``) activations by a square matrix, then tanh), with the rows exchange
   prefetched before the computation (``ShardedTable.prefetch``, as ``EngramLM.forward`` does at
   its start) and exchanged after it in the layer; both on every batch, the order flipping every
   batch, each step from a common barrier. Reported: the step time of each (slowest process,
   median), their paired ratio (median over batches), and the processes' share of step time
   inside the exchange calls or waiting for a prefetched exchange.

Reported per job: the step time (the slowest process's, median over steps), tokens/s of the whole
job (global tokens / step time), and the communication share: the processes' seconds inside the
table's all_to_all calls (``ShardedTable.comm_seconds``: transfer and waiting for the other ranks)
over their step seconds, summed over processes. Bytes per token: ``ShardedTable.bytes_sent``
summed over processes per step, over the global tokens; against the minimum, the distinct rows of
each process's batch that other processes own, times (row bytes + 8 id bytes) for the lookup, plus
their gradient's row bytes for the backward. ``bytes_sent`` counts every all_to_all payload,
including the part a process addresses to itself (its own rows: a local copy, nothing on the wire),
so the column "to others" subtracts that part, computed from the same row counts; the per-step
exchange of counts (8 bytes per rank pair) is not in ``bytes_sent``.

Each process runs one torch thread. On a machine with fewer cores than processes the processes
share cores: the output states the core count; read the 4-process numbers with that in mind.

Run from the repository root::

    python benchmarks/bench_sharded.py             # plain-text tables
    python benchmarks/bench_sharded.py --markdown  # markdown for docs/benchmarks.md
    python benchmarks/bench_sharded.py --small     # a dry run with a tiny table (under a minute)
    python benchmarks/bench_sharded.py --json out.json  # the results as JSON too

About a minute on a 2-core machine with the defaults (most of it starting processes and building the shards).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from _report import environment_lines, format_table
from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.data.batches import RandomWindows
from engram.data.sources import shakespeare
from engram.indexing import default_tokenizer_path, engram_table_sizes
from engram.storage import shard_ranges

WORKER = Path(__file__).resolve().parent / "_sharded_worker.py"
LAYER = 1  # the layer whose hash ids are looked up (each layer hashes with its own multipliers)
MAX_NGRAM = 3
EOS = "<｜end▁of▁sentence｜>"  # DeepSeek-V3's end-of-sentence token, joining the works
ID_BYTES = 8  # row ids travel as int64
PHASES = ("lookup", "training")


# -- row ids ---------------------------------------------------------------------------------------------


def engram_config(args: argparse.Namespace) -> EngramConfig:
    return EngramConfig(
        layer_ids=[LAYER],
        max_ngram_size=MAX_NGRAM,
        n_head_per_ngram=args.heads_per_order,
        n_embed_per_ngram=args.heads_per_order * args.dim,
        engram_vocab_size=[args.base_size] * (MAX_NGRAM - 1),
    )


def head_offsets(config: EngramConfig) -> tuple[torch.Tensor, int]:
    """Each head's first row in the concatenated table (as ``engram.Engram`` adds them), and its rows."""
    sizes = engram_table_sizes(
        config.layer_ids, config.max_ngram_size, config.n_head_per_ngram, config.engram_vocab_size
    )
    flat = [size for order in sizes[LAYER] for size in order]
    offsets = torch.tensor([0, *flat[:-1]], dtype=torch.long).cumsum(0)
    return offsets, sum(flat)


def corpus_tokens(tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """Shakespeare's works as token ids, joined by the end-of-sentence id; and that id."""
    eos = tokenizer.token_to_id(EOS)
    encoded = tokenizer.encode_batch([text for _, text in shakespeare(None)], add_special_tokens=False)
    ids = [token for item in encoded for token in [*item.ids, eos]]
    return np.array(ids, dtype=np.int64), eos


def row_ids(args: argparse.Namespace, config: EngramConfig) -> tuple[torch.Tensor, int]:
    """The table rows of every step's global batch, (steps, B, T, heads), and the table's row count."""
    tokenizer = Tokenizer.from_file(str(default_tokenizer_path()))  # DeepSeek-V3's
    tokens, eos = corpus_tokens(tokenizer)
    indexer = EngramIndexer(config, CompressedTokenizer(tokenizer, cache_dir=False), separator_id=eos)
    offsets, num_rows = head_offsets(config)
    windows = RandomWindows(tokens, args.batch, args.seq_len, seed=args.seed)
    batches = [indexer.hash_layer(windows.batch(step)[0], LAYER) + offsets for step in range(args.warmup + args.steps)]
    return torch.stack(batches), num_rows


# -- the minimum exchange ----------------------------------------------------------------------------------


@dataclass
class RowCounts:
    """Per timed step, summed over processes: distinct rows of each one's batch that others own, and that it owns."""

    remote: list[int]
    own: list[int]


def row_counts(indices: torch.Tensor, num_rows: int, world: int, warmup: int) -> RowCounts:
    """The row counts of the timed steps, for ``world`` processes splitting each batch as the workers do."""
    ranges = shard_ranges(num_rows, world)
    per_rank = indices.shape[1] // world
    counts = RowCounts([], [])
    for batch in indices[warmup:]:
        remote = own = 0
        for rank, (start, end) in enumerate(ranges):
            rows = batch[rank * per_rank : (rank + 1) * per_rank].unique()
            owned = int(((rows >= start) & (rows < end)).sum())
            remote, own = remote + rows.numel() - owned, own + owned
        counts.remote.append(remote)
        counts.own.append(own)
    return counts


# -- running a job ----------------------------------------------------------------------------------------


def log(args: argparse.Namespace, text: str) -> None:
    if args.verbose:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_job(args: argparse.Namespace, run_dir: Path, world: int) -> list[dict]:
    """The worker on ``world`` processes; every rank's measurements."""
    for old in run_dir.glob("rank*.json"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, so that a hang is cleaned up with every worker.
    process = subprocess.Popen(
        [*command, str(WORKER), str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise SystemExit(f"the {world}-process job ran past --timeout {args.timeout} s") from None
    if process.returncode != 0:
        raise SystemExit(f"the {world}-process job failed (exit {process.returncode}):\n{stderr[-3000:]}")
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


@dataclass
class PhaseResult:
    """One phase of one job: medians over the timed steps."""

    step_ms: float
    tokens_per_s: float
    comm_share: float
    bytes_per_token: float  # measured, every all_to_all payload
    to_others_per_token: float  # measured minus what processes addressed to themselves
    minimum_per_token: float


@dataclass
class OverlapResult:
    """Lookup behind compute, prefetch on and off: medians over the timed batches."""

    on_ms: float
    off_ms: float
    on_vs_off: float  # median of per-batch ratios: the two ran back to back
    on_comm_share: float
    off_comm_share: float


@dataclass
class JobResult:
    processes: int
    distinct_rows: float  # per step, summed over processes
    remote_share: float  # of those, the share other processes own
    lookup: PhaseResult
    training: PhaseResult
    overlap: OverlapResult


def overlap_result(ranks: list[dict]) -> OverlapResult:
    """The slowest rank's seconds per batch with prefetch on and off, their paired ratio, the comm shares."""
    per_mode = {}
    for mode in ("on", "off"):
        steps = list(zip(*(rank["overlap"][mode] for rank in ranks), strict=True))
        seconds = [max(r["seconds"] for r in step) for step in steps]
        share = statistics.median(
            sum(r["comm_seconds"] for r in step) / sum(r["seconds"] for r in step) for step in steps
        )
        per_mode[mode] = (seconds, share)
    (on, on_share), (off, off_share) = per_mode["on"], per_mode["off"]
    paired = statistics.median(a / b for a, b in zip(on, off, strict=True))
    return OverlapResult(statistics.median(on) * 1e3, statistics.median(off) * 1e3, paired, on_share, off_share)


def phase_result(
    ranks: list[dict], phase: str, tokens: int, self_bytes: list[float], minimum: list[float]
) -> PhaseResult:
    """Medians over the timed steps of: the slowest rank's seconds, the ranks' comm share, and their
    summed bytes per token (all, and less ``self_bytes``, the step's bytes addressed to the sender)."""
    steps = list(zip(*(rank[phase] for rank in ranks), strict=True))
    seconds = statistics.median(max(r["seconds"] for r in step) for step in steps)
    share = statistics.median(sum(r["comm_seconds"] for r in step) / sum(r["seconds"] for r in step) for step in steps)
    sent = [sum(r["bytes_sent"] for r in step) for step in steps]
    return PhaseResult(
        seconds * 1e3,
        tokens / seconds,
        share,
        statistics.median(sent) / tokens,
        statistics.median(b - s for b, s in zip(sent, self_bytes, strict=True)) / tokens,
        statistics.median(minimum) / tokens,
    )


def job_result(ranks: list[dict], counts: RowCounts, args: argparse.Namespace) -> JobResult:
    tokens = args.batch * args.seq_len
    row = args.dim * 4 + ID_BYTES  # a row and its id
    grad = args.dim * 4
    # A lookup sends each row's id to its owner, which sends the row back; the backward sends the
    # row's id and gradient to the owner again. Only the remote rows' bytes leave the process.
    lookup = phase_result(
        ranks, "lookup", tokens, [own * row for own in counts.own], [remote * row for remote in counts.remote]
    )
    training = phase_result(
        ranks,
        "training",
        tokens,
        [2 * own * row for own in counts.own],
        [remote * (row + grad) for remote in counts.remote],
    )
    remote, own = statistics.median(counts.remote), statistics.median(counts.own)
    return JobResult(len(ranks), remote + own, remote / (remote + own), lookup, training, overlap_result(ranks))


# -- report -------------------------------------------------------------------------------------------------


def throughput_lines(results: list[JobResult], md: bool) -> list[str]:
    base = results[0]
    body = []
    for r in results:
        row = [str(r.processes)]
        for phase, first in ((r.lookup, base.lookup), (r.training, base.training)):
            row += [
                f"{phase.step_ms:.1f}",
                f"{phase.tokens_per_s:,.0f}",
                f"{phase.tokens_per_s / first.tokens_per_s:.2f}x",
                f"{phase.comm_share:.0%}",
            ]
        body.append(row)
    header = ["processes"]
    for name in PHASES:
        header += [f"{name} ms/step", f"{name} tokens/s", f"{name} vs {base.processes} proc", f"{name} comm share"]
    return format_table(header, body, md)


def overlap_lines(results: list[JobResult], md: bool) -> list[str]:
    body = [
        [
            str(r.processes),
            f"{r.overlap.off_ms:.1f}",
            f"{r.overlap.on_ms:.1f}",
            f"{r.overlap.on_vs_off:.3f}x",
            f"{r.overlap.off_comm_share:.0%}",
            f"{r.overlap.on_comm_share:.0%}",
        ]
        for r in results
    ]
    header = ["processes", "in the layer ms/step", "prefetched ms/step", "prefetched / in the layer (paired)",
              "comm share, in the layer", "comm share, prefetched"]  # fmt: skip
    return format_table(header, body, md)


def ratio(measured: float, minimum: float) -> str:
    return f"{measured / minimum:.2f}" if minimum else "-"


def bytes_lines(results: list[JobResult], md: bool) -> list[str]:
    body = []
    for r in results:
        for name, phase in (("lookup", r.lookup), ("training step", r.training)):
            body.append(
                [
                    str(r.processes),
                    name,
                    f"{r.distinct_rows:,.0f}",
                    f"{r.remote_share:.0%}",
                    f"{phase.bytes_per_token:,.0f}",
                    f"{phase.to_others_per_token:,.0f}",
                    f"{phase.minimum_per_token:,.0f}",
                    ratio(phase.bytes_per_token, phase.minimum_per_token),
                    ratio(phase.to_others_per_token, phase.minimum_per_token),
                ]
            )
    header = [
        "processes",
        "workload",
        "distinct rows/step",
        "owned by others",
        "B/token sent",
        "to others",
        "minimum",
        "sent / min",
        "to others / min",
    ]
    return format_table(header, body, md)


def report(args: argparse.Namespace, results: list[JobResult], num_rows: int, elapsed: float) -> str:
    md = args.markdown
    heading = (lambda text: f"### {text}") if md else (lambda text: f"== {text} ==")
    tokens = args.batch * args.seq_len
    heads = (MAX_NGRAM - 1) * args.heads_per_order
    table_mib = num_rows * args.dim * 4 / 2**20
    cores = os.cpu_count() or 1
    facts = [
        ("processes", f"{', '.join(map(str, args.procs))} (torchrun, gloo on loopback, 1 torch thread each)"),
        ("oversubscribed", ", ".join(f"{p} processes on {cores} cores" for p in args.procs if p > cores) or "no"),
        (
            "table",
            f"{num_rows:,} rows x {args.dim} float32 ({table_mib:,.0f} MiB; RowAdam state 2x more), host tier, "
            f"N={MAX_NGRAM}, {heads} heads, base size {args.base_size:,} per order",
        ),
        (
            "batch",
            f"{args.batch} x {args.seq_len} = {tokens:,} tokens x {heads} heads per step (global), "
            f"Shakespeare, DeepSeek-V3 tokenizer, seed {args.seed}",
        ),
        ("steps", f"{args.steps} timed after {args.warmup} warmup per phase; medians"),
        (
            "front computation",
            f"{args.front_matmuls} x (tokens of a process, {args.front_dim}) @ ({args.front_dim}, {args.front_dim}), "
            "tanh, before the lookup behind compute",
        ),
        ("wall time", f"{elapsed:.0f} s"),
    ]
    out = [heading("Environment"), "", *environment_lines(facts, md), ""]
    out += [heading(f"Throughput, {tokens:,} tokens per step over all processes"), ""]
    out += throughput_lines(results, md)
    out += [
        "",
        "Step time: the slowest process's, from a common barrier. Comm share: seconds inside the table's "
        "all_to_all calls (transfer and waiting for the other processes) over step seconds, all processes.",
        "",
    ]
    out += [heading("Bytes sent per token (all processes, per step)"), ""]
    out += bytes_lines(results, md)
    out += [
        "",
        "Distinct rows: of each process's part of the batch, summed over processes (a row that two processes "
        "look up counts twice: each fetches it). Minimum: the distinct rows of each process's part that others "
        "own, x (row bytes + 8 id bytes) for the lookup, + their gradient (row bytes) for the training step. "
        "'B/token sent' is the measured `bytes_sent`, which also counts what a process addresses to itself; "
        "'to others' subtracts that part (computed from the same row counts). The training step also sends each "
        "gradient row's id.",
        "",
    ]
    out += [heading("Lookup behind compute: the rows exchange prefetched or in the layer"), ""]
    out += overlap_lines(results, md)
    out += [
        "",
        "The same batches, both ways, the order flipping every batch. Prefetched: counts and ids exchanged and the "
        "owners' gather done, the rows exchange started (async all_to_all), then the front computation, then the "
        "wait. Comm share: seconds inside the exchange calls, plus the wait for a prefetched exchange, over step "
        "seconds, all processes.",
    ]
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------------------


SMALL = dict(base_size=20_000, dim=16, batch=4, seq_len=64, warmup=1, steps=3)
FULL = dict(base_size=400_000, dim=64, batch=16, seq_len=256, warmup=5, steps=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", action="store_true", help="a tiny table and batch: a dry run")
    parser.add_argument("--procs", default="1,2,4", help="comma-separated process counts (default 1,2,4)")
    parser.add_argument("--base-size", type=int, help="table base size per n-gram order (default 400,000)")
    parser.add_argument("--heads-per-order", type=int, default=4, help="hash heads per order (default 4)")
    parser.add_argument("--dim", type=int, help="floats per row (default 64)")
    parser.add_argument("--batch", type=int, help="sequences per step, all processes (default 16)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 256)")
    parser.add_argument("--warmup", type=int, help="untimed steps per phase (default 5)")
    parser.add_argument("--steps", type=int, help="timed steps per phase (default 100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="RowAdam learning rate (default 1e-3)")
    parser.add_argument("--front-dim", type=int, default=256, help="width of the front computation (default 256)")
    parser.add_argument("--front-matmuls", type=int, default=4, help="its matrix products (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="table and data seed (default 0)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per torchrun job (default 600)")
    parser.add_argument("--markdown", action="store_true", help="print markdown for docs/benchmarks.md")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    for name, value in (SMALL if args.small else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.procs = [int(p) for p in args.procs.split(",") if p.strip()]
    if not args.procs or min(args.procs) < 1:
        parser.error("--procs takes positive process counts")
    if any(args.batch % p for p in args.procs):
        parser.error("--batch must be divisible by every process count (the batch is split evenly)")
    for name in ("base_size", "heads_per_order", "dim", "seq_len", "steps", "front_dim", "front_matmuls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # as every worker process does (the environment lines report this process's)
    config = engram_config(args)
    log(args, "hashing the batches")
    indices, num_rows = row_ids(args, config)
    results = []
    with tempfile.TemporaryDirectory(prefix="engram-bench-sharded-") as folder:
        run_dir = Path(folder)
        spec = {
            "rows": num_rows,
            "dim": args.dim,
            "init_std": config.table_init_std,
            "seed": args.seed,
            "lr": args.lr,
            "warmup": args.warmup,
            "front_dim": args.front_dim,
            "front_matmuls": args.front_matmuls,
        }
        (run_dir / "spec.json").write_text(json.dumps(spec))
        torch.save(indices, run_dir / "indices.pt")
        for world in args.procs:
            log(args, f"{world} process(es)")
            ranks = run_job(args, run_dir, world)
            results.append(job_result(ranks, row_counts(indices, num_rows, world, args.warmup), args))
    print(report(args, results, num_rows, time.perf_counter() - start))
    if args.json:
        payload = {"config": {**vars(args), "rows": num_rows}, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
