"""CPU training throughput of an Engram model against its iso-parameter MoE baseline, and the cost of
the sparse table optimizer as the table grows.

Everything trains on real text: Shakespeare's sonnets with the 1,024-id BPE tokenizer of
``tests/corpus.py``, through ``engram.training.Trainer`` (``out_dir=None``, no progress bar), on one
CPU thread by default (``--threads``). Timed calls of different models alternate step by step (and
which model goes first flips every round), so the noise of a shared machine hits all alike; the
first ``--warmup`` steps of each model are not timed (they include the optimizers' lazy state
allocation); medians are reported.

1. Engram vs MoE at equal total parameters. The baseline is a DeepSeek-style MoE decoder (vocab
   1024, d_model 128, 4 layers, 4 heads, 1 shared + 16 routed experts, top-2, expert hidden 128, the
   first layer dense, max_seq_len 256). ``engram.model.accounting.allocate(base, rho=0.8, engram=...)``
   moves a share 1 - rho of its sparse budget from routed experts to an Engram module at layer 1
   (n_embed_per_ngram 64, 4 heads per order, N=3, pad id = the tokenizer's ``<pad>``, 0). Both
   configs' total and active parameters (``estimate_parameters``, embedding and LM head excluded)
   and the allocation's mismatches are printed. Both models train from the same seed on the same
   batches (``--batch`` x ``--seq-len``) with the default ``TrainConfig`` recipe (but a 10-step
   learning-rate warmup, the run being short), and the whole ``trainer.train_step()`` is timed:
   forward, backward, clipping, every optimizer, router biases.
   The Engram model gets an ``EngramIndexer`` (``EngramLM(..., indexer=...)``), so tokenizer
   compression and n-gram hashing run inside each step and are part of its cost (the indexer call
   alone is timed too). The final training losses are printed for context only: a few dozen steps
   say nothing about quality.
2. Table optimizer vs table size. The same Engram model twice, the second with 10x the tables' base
   sizes (``--table-scale``), everything else equal. ``optimizers["tables"].step()`` (the
   ``RowAdam``) is timed on its own, through a timing wrapper put in place of the optimizer
   instance's ``step`` method, inside the same timed ``train_step()`` calls; the two models
   alternate step by step.

Run from the repository root::

    python benchmarks/bench_training.py             # plain-text tables
    python benchmarks/bench_training.py --markdown  # markdown for docs/benchmarks.md
    python benchmarks/bench_training.py --profile 5 # also torch.profiler's top ops of both models

Takes about a minute on a 2-core machine with the defaults (more with --profile). Exits 0 whether
or not the targets are met; the output says which are.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.indexing.primes import engram_table_sizes
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.model.accounting import ParamCounts, allocate, count_parameters, estimate_parameters
from engram.training import TrainConfig, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root, for tests.corpus
from tests.corpus import sonnets_tokenizer, sonnets_tokens

from _report import environment_lines, format_table

BASE = ModelConfig(
    vocab_size=1024,
    d_model=128,
    n_layers=4,
    n_heads=4,
    moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=2, expert_hidden=128),
    n_dense_layers=1,
    max_seq_len=256,
)
ENGRAM_LAYERS = [1]
N_EMBED_PER_NGRAM = 64
N_HEAD_PER_NGRAM = 4
THROUGHPUT_TARGET = 0.9  # Engram tokens/s at least 0.9x the MoE baseline's
TABLE_STEP_TARGET = 0.10  # a 10x larger table changes the table optimizer's step time by less than 10%


# -- running ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One model under training: its trainer and what each of its steps measured."""

    name: str
    trainer: Trainer
    step_times: list[float] = field(default_factory=list)
    table_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        tables = self.trainer.optimizers.get("tables")
        if tables is not None:  # time RowAdam.step() alone, inside train_step()
            tables.step = self._timed(tables.step)

    def _timed(self, step: Callable[[], None]) -> Callable[[], None]:
        """``step`` (a bound method), recording its duration in ``table_times`` at every call."""

        def timed_step() -> None:
            start = time.perf_counter()
            step()
            self.table_times.append(time.perf_counter() - start)

        return timed_step

    def step(self) -> None:
        start = time.perf_counter()
        loss = self.trainer.train_step()
        self.step_times.append(time.perf_counter() - start)
        self.losses.append(loss)


def interleave(runs: list[Run], warmup: int, steps: int) -> None:
    """``warmup + steps`` training steps of every run, alternating; the order flips every round."""
    for i in range(warmup + steps):
        for run in runs if i % 2 == 0 else reversed(runs):
            run.step()


def median_after(samples: list[float], warmup: int) -> float:
    return statistics.median(samples[warmup:])


# -- models -----------------------------------------------------------------------------------------


def train_config(args: argparse.Namespace, steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        warmup_steps=min(10, steps),
        seed=args.seed,
        device="cpu",
        threads=args.threads,
        log_every=0,
        eval_every=0,
        checkpoint_every=0,
    )


def make_run(
    name: str,
    config: ModelConfig,
    tokenizer: CompressedTokenizer,
    tokens: np.ndarray,
    train: TrainConfig,
) -> Run:
    seed_everything(train.seed)
    indexer = EngramIndexer(config.engram, tokenizer) if config.engram is not None else None
    model = EngramLM(config, indexer=indexer)
    return Run(name, Trainer(model, train, tokens, out_dir=None, progress=False))


def table_rows(config: ModelConfig) -> int:
    """Rows of all Engram tables of ``config`` (0 without Engram)."""
    e = config.engram
    if e is None:
        return 0
    sizes = engram_table_sizes(e.layer_ids, e.max_ngram_size, e.n_head_per_ngram, e.engram_vocab_size)
    return sum(p for layer in sizes.values() for order in layer for p in order)


def table_mb(config: ModelConfig, with_adam: bool = False) -> float:
    """Float32 table size in MiB; with RowAdam's state (two moments and an int64 row step count)."""
    rows = table_rows(config)
    width = config.engram.head_dim if config.engram is not None else 0
    table = rows * width * 4
    return (3 * table + 8 * rows if with_adam else table) / 2**20


# -- 1. Engram vs MoE ---------------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    moe: Run
    engram: Run
    moe_counts: ParamCounts
    engram_counts: ParamCounts
    moe_config: ModelConfig
    engram_config: ModelConfig
    total_mismatch: float
    active_mismatch: float
    indexer_seconds: float
    counts_agree: bool


def bench_throughput(args: argparse.Namespace, tokenizer: CompressedTokenizer, tokens: np.ndarray) -> ThroughputResult:
    engram_cfg = EngramConfig(
        layer_ids=ENGRAM_LAYERS,
        n_embed_per_ngram=N_EMBED_PER_NGRAM,
        n_head_per_ngram=N_HEAD_PER_NGRAM,
        pad_id=sonnets_tokenizer().token_to_id("<pad>"),
    )
    allocation = allocate(BASE, rho=args.rho, engram=engram_cfg)
    train = train_config(args, args.warmup + args.steps)
    moe = make_run("MoE (baseline)", allocation.moe, tokenizer, tokens, train)
    eng = make_run("Engram + MoE", allocation.engram, tokenizer, tokens, train)
    interleave([moe, eng], args.warmup, args.steps)

    # The hashing share of an Engram step: the indexer call alone, on the same batches.
    indexer = eng.trainer.model.indexer
    times = []
    for step in range(args.warmup + args.steps):
        inputs, _ = eng.trainer.batches.batch(step)
        start = time.perf_counter()
        indexer(inputs)
        times.append(time.perf_counter() - start)
    moe_counts, engram_counts = estimate_parameters(allocation.moe), estimate_parameters(allocation.engram)
    # Cross-check: the built models' parameters, counted module by module, give the same totals.
    agree = all(
        (count_parameters(run.trainer.model).total, count_parameters(run.trainer.model).active)
        == (counts.total, counts.active)
        for run, counts in ((moe, moe_counts), (eng, engram_counts))
    )
    return ThroughputResult(
        moe,
        eng,
        moe_counts,
        engram_counts,
        allocation.moe,
        allocation.engram,
        allocation.total_mismatch,
        allocation.active_mismatch,
        median_after(times, args.warmup),
        agree,
    )


def profile_runs(runs: list[Run], steps: int, rows: int = 15) -> list[tuple[str, str]]:
    """torch.profiler's top ops (self CPU time) over ``steps`` training steps of each run."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for run in runs:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run.trainer.train_step()
        tables.append((run.name, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)))
    return tables


# -- 2. table optimizer vs table size -------------------------------------------------------------------


def bench_table_scale(
    args: argparse.Namespace, engram_config: ModelConfig, tokenizer: CompressedTokenizer, tokens: np.ndarray
) -> tuple[Run, Run, ModelConfig]:
    e = engram_config.engram
    larger = dataclasses.replace(
        engram_config,
        engram=dataclasses.replace(e, engram_vocab_size=[s * args.table_scale for s in e.engram_vocab_size]),
    )
    train = train_config(args, args.warmup + args.table_steps)
    small = make_run("1x table", engram_config, tokenizer, tokens, train)
    large = make_run(f"{args.table_scale}x table", larger, tokenizer, tokens, train)
    interleave([small, large], args.warmup, args.table_steps)
    return small, large, larger


def unique_rows(run: Run, steps: range) -> float:
    """Median number of distinct table rows a batch touches (the rows RowAdam updates), over ``steps``."""
    model = run.trainer.model
    counts = []
    for step in steps:
        inputs, _ = run.trainer.batches.batch(step)
        hash_ids = model.indexer(inputs)
        counts.append(
            sum(torch.unique(hash_ids[lid] + layer.offsets).numel() for lid, layer in model.engram_layers().items())
        )
    return statistics.median(counts)


# -- report -------------------------------------------------------------------------------------------


def run_facts(args: argparse.Namespace, elapsed: float) -> list[tuple[str, str]]:
    return [
        (
            "steps",
            f"{args.steps} (part 1) and {args.table_steps} (part 2) timed per model after {args.warmup} warmup, "
            "interleaved step by step; medians",
        ),
        ("batch", f"{args.batch} x {args.seq_len} tokens, seed {args.seed}"),
        ("wall time", f"{elapsed:.0f} s (setup, both parts{', profile' if args.profile else ''})"),
    ]


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def throughput_lines(r: ThroughputResult, args: argparse.Namespace, md: bool) -> list[str]:
    tokens = args.batch * args.seq_len
    configs = []
    for name, config, counts in (
        (r.moe.name, r.moe_config, r.moe_counts),
        (r.engram.name, r.engram_config, r.engram_counts),
    ):
        e = config.engram
        configs.append(
            [
                name,
                str(config.moe.n_routed_experts),
                str(e.engram_vocab_size) if e else "-",
                f"{table_rows(config):,}" if e else "-",
                f"{counts.total:,}",
                f"{counts.active:,}",
                f"{counts.engram_tables:,}",
            ]
        )
    moe_s = median_after(r.moe.step_times, args.warmup)
    eng_s = median_after(r.engram.step_times, args.warmup)
    ratio = moe_s / eng_s
    last = min(10, args.steps)
    body = []
    for run, seconds in ((r.moe, moe_s), (r.engram, eng_s)):
        body.append(
            [
                run.name,
                f"{seconds * 1e3:.1f}",
                f"{tokens / seconds:,.0f}",
                f"{moe_s / seconds:.3f}x",
                f"{run.losses[-1]:.3f}",
                f"{statistics.fmean(run.losses[-last:]):.3f}",
            ]
        )
    e = r.engram_config.engram
    return [
        f"Base: vocab {BASE.vocab_size}, d_model {BASE.d_model}, {BASE.n_layers} layers ({BASE.n_dense_layers} dense), "
        f"{BASE.n_heads} heads, MoE 1 shared + routed experts, top_k {BASE.moe.top_k}, expert_hidden "
        f"{BASE.moe.expert_hidden}. Engram at layers {e.layer_ids}: N={e.max_ngram_size}, K={e.n_head_per_ngram}, "
        f"n_embed_per_ngram {e.n_embed_per_ngram} (rows of {e.head_dim} floats), pad id {e.pad_id}; "
        f"`allocate(base, rho={args.rho})`. Parameters from `estimate_parameters` (embedding and LM head excluded).",
        "",
        *format_table(
            ["model", "routed experts", "table base sizes", "table rows", "total params", "active params", "table"],
            configs,
            md,
        ),
        "",
        f"Allocation mismatch (Engram vs MoE): total {r.total_mismatch:+.4%}, active {r.active_mismatch:+.2%}. "
        f"Counted on the built models (`count_parameters`): {'the same' if r.counts_agree else 'DIFFERENT'}.",
        "",
        *format_table(
            ["model", "median ms/step", "tokens/s", "vs MoE", "final loss", f"mean loss, last {last}"], body, md
        ),
        "",
        f"**Target (Engram >= {THROUGHPUT_TARGET}x the baseline's tokens/s): {met(ratio >= THROUGHPUT_TARGET)} "
        f"({ratio:.3f}x).** The Engram step includes hashing: the model holds an `EngramIndexer` and compresses and "
        f"hashes each batch inside its forward pass; the indexer call alone takes {r.indexer_seconds * 1e3:.2f} ms "
        f"per batch ({r.indexer_seconds / eng_s:.1%} of the Engram step). Losses are training losses of the same "
        f"batches after {args.warmup + args.steps} steps, context only, not a quality comparison.",
    ]


def table_scale_lines(small: Run, large: Run, larger: ModelConfig, args: argparse.Namespace, md: bool) -> list[str]:
    tokens = args.batch * args.seq_len
    smaller = small.trainer.model.config
    table_med = {run.name: median_after(run.table_times, args.warmup) for run in (small, large)}
    step_med = {run.name: median_after(run.step_times, args.warmup) for run in (small, large)}
    timed = range(args.warmup, args.warmup + args.table_steps)
    touched = {run.name: unique_rows(run, timed) for run in (small, large)}
    body = []
    for run, config in ((small, smaller), (large, larger)):
        body.append(
            [
                run.name,
                str(config.engram.engram_vocab_size),
                f"{table_rows(config):,}",
                f"{touched[run.name]:,.0f}",
                f"{table_mb(config):.1f}",
                f"{table_mb(config, with_adam=True):.1f}",
                f"{table_med[run.name] * 1e3:.3f}",
                f"{step_med[run.name] * 1e3:.1f}",
                f"{tokens / step_med[run.name]:,.0f}",
            ]
        )
    table_ratio = table_med[large.name] / table_med[small.name]
    step_ratio = step_med[large.name] / step_med[small.name]
    per_row = {name: table_med[name] / touched[name] * 1e9 for name in table_med}
    lookups = tokens * smaller.engram.n_heads * len(smaller.engram.layer_ids)
    return [
        f"The Engram model of part 1 and the same model with {args.table_scale}x the table base sizes; "
        f"`optimizers['tables'].step()` (RowAdam) timed alone inside each train_step. A batch reads "
        f"{lookups:,} table rows with repeats; 'rows touched' counts the distinct ones (median over the timed "
        "batches), the rows the optimizer updates: a larger table has fewer hash collisions. MiB are float32; "
        "'with Adam' adds both moments and the int64 per-row step count.",
        "",
        *format_table(
            [
                "table",
                "base sizes",
                "rows",
                "rows touched/batch",
                "table MiB",
                "with Adam MiB",
                "median ms/table step",
                "median ms/train_step",
                "tokens/s",
            ],
            body,
            md,
        ),
        "",
        f"Ratio {args.table_scale}x / 1x: table optimizer step {table_ratio:.3f}x, whole train_step {step_ratio:.3f}x; "
        f"rows touched {touched[large.name] / touched[small.name]:.3f}x; table optimizer time per touched row "
        f"{per_row[small.name]:.0f} ns vs {per_row[large.name]:.0f} ns "
        f"({per_row[large.name] / per_row[small.name]:.3f}x).",
        "",
        f"**Target (a {args.table_scale}x larger table changes the table optimizer's step time by less than "
        f"{TABLE_STEP_TARGET:.0%}): {met(abs(table_ratio - 1) < TABLE_STEP_TARGET)} ({table_ratio - 1:+.1%}; "
        f"whole step {step_ratio - 1:+.1%}).**",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=80, help="timed steps per model, part 1 (default 80)")
    parser.add_argument("--table-steps", type=int, default=60, help="timed steps per model, part 2 (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--rho", type=float, default=0.8, help="share of the sparse budget left to experts (0.8)")
    parser.add_argument("--table-scale", type=int, default=10, help="table base size factor, part 2 (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed (default 0)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps per model (default 0: no)")
    parser.add_argument("--markdown", action="store_true", help="print markdown for docs/benchmarks.md")
    args = parser.parse_args(argv)
    for name in ("threads", "steps", "table_steps", "batch", "seq_len", "table_scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.profile < 0:
        parser.error("--warmup and --profile must be >= 0")
    if args.seq_len > BASE.max_seq_len:
        parser.error(f"--seq-len must be <= the model's max_seq_len, {BASE.max_seq_len}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    md = args.markdown
    heading = (lambda text: f"### {text}") if md else (lambda text: f"== {text} ==")

    tokens, _ = sonnets_tokens()
    tokenizer = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
    part1 = bench_throughput(args, tokenizer, tokens)
    profiles = profile_runs([part1.moe, part1.engram], args.profile) if args.profile else []
    small, large, larger = bench_table_scale(args, part1.engram_config, tokenizer, tokens)
    elapsed = time.perf_counter() - start

    where = f"{args.batch} x {args.seq_len} tokens/step, {args.threads} thread(s)"
    out = [heading("Environment"), "", *environment_lines(run_facts(args, elapsed), md), ""]
    out += [heading(f"Training throughput, Engram vs iso-parameter MoE, {where}"), ""]
    out += [*throughput_lines(part1, args, md), ""]
    for name, table in profiles:
        out += [heading(f"Profile: {name}, {args.profile} train_step calls, top ops by self CPU time"), ""]
        out += ["```", table.rstrip(), "```", ""] if md else [table.rstrip(), ""]
    out += [heading(f"Table optimizer step, 1x vs {args.table_scale}x table, {where}"), ""]
    out += table_scale_lines(small, large, larger, args, md)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
