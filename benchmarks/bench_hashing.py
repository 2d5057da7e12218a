"""CPU throughput of Engram's n-gram hashing and of one Engram layer.

Two measurements, both on one CPU thread by default (``torch.set_num_threads``):

1. Hashing (docs/definition.md, "Hashing"): ``engram.NgramHasher.hash`` (torch, eager and ``compile=True``)
   against the independent NumPy
   implementation of the same algorithm, ``tests.reference.reference_hash``, on a (64, 2048) batch of
   random canonical ids (DeepSeek-V3 compressed vocabulary: 98,627 ids), N=3, K=8, the demo's base
   table sizes [646400, 646400], layer_ids [1, 15], pad id 2, seed 0, hashing layer 1. The outputs
   (and the table sizes and multipliers) are first checked to be identical, else the script stops
   with exit code 1. Then the two run interleaved (alternating, and alternating which goes first)
   so that the noise of a shared machine hits both alike, and the medians are reported.
2. Layer: ``engram.Engram`` forward (under ``torch.no_grad``) and forward+backward (of
   ``out.float().sum()``, gradients reset to ``None`` before each call, as in a training step) with
   precomputed hash ids, for 1 and 4 residual branches. The table gradient's layout (dense or sparse)
   is read off the gradient itself.

Run from the repository root::

    python benchmarks/bench_hashing.py             # plain-text tables
    python benchmarks/bench_hashing.py --markdown  # markdown for docs/benchmarks.md

Exits non-zero if the library's and the reference's table sizes, multipliers or hashes differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram import Engram, EngramConfig, NgramHasher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repository root, for tests.reference
from tests.reference import reference_hash, reference_multipliers, reference_table_sizes

from _report import environment_lines, format_table

COMPRESSED_VOCAB = 98_627  # DeepSeek-V3 tokenizer after compression (docs/definition.md, "Tokenizer compression")
MAX_NGRAM = 3
HEADS_PER_NGRAM = 8
BASE_SIZES = [646_400, 646_400]  # demo default, 129280 * 5
LAYER_IDS = [1, 15]
HASHED_LAYER = 1
PAD_ID = 2
SEED = 0

LAYER_CONFIG = EngramConfig(
    layer_ids=[1], engram_vocab_size=[100_000, 100_000], n_embed_per_ngram=256, n_head_per_ngram=8
)
LAYER_HIDDEN = 512
LAYER_BRANCHES = (1, 4)


@dataclass
class Row:
    """One line of a result table: median seconds per call over ``tokens`` tokens."""

    name: str
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# -- timing ---------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, run alternately; the order flips every round."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else reversed(names):
            elapsed = time_call(fns[name])
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(times) for name, times in samples.items()}


# -- 1. hashing -------------------------------------------------------------------------------------


def build_hasher(compile: bool) -> NgramHasher:
    return NgramHasher(
        LAYER_IDS,
        MAX_NGRAM,
        HEADS_PER_NGRAM,
        BASE_SIZES,
        COMPRESSED_VOCAB,
        pad_id=PAD_ID,
        seed=SEED,
        compile=compile,
    )


def check_hash_constants(hasher: NgramHasher, ref_sizes: dict[int, list[list[int]]]) -> list[str]:
    """Differences between the library's and the reference's table sizes and multipliers."""
    problems = []
    if hasher.table_sizes != ref_sizes:
        problems.append(f"table sizes differ: library {hasher.table_sizes}, reference {ref_sizes}")
    for layer_id in LAYER_IDS:
        ref_mult = reference_multipliers(layer_id, MAX_NGRAM, COMPRESSED_VOCAB, SEED).tolist()
        if hasher.multipliers(layer_id) != ref_mult:
            problems.append(f"layer {layer_id} multipliers differ: {hasher.multipliers(layer_id)} vs {ref_mult}")
    return problems


def bench_hashing(batch: int, seq: int, rounds: int, warmup: int) -> list[Row] | None:
    """Library (eager and compiled) vs NumPy reference hashing; ``None`` (nothing timed) if they disagree."""
    hasher, compiled = build_hasher(compile=False), build_hasher(compile=True)
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, COMPRESSED_VOCAB, (batch, seq), generator=generator, dtype=torch.long)
    ids_np = ids.numpy()
    sizes = reference_table_sizes(LAYER_IDS, MAX_NGRAM, HEADS_PER_NGRAM, BASE_SIZES)
    problems = check_hash_constants(hasher, sizes)
    multipliers = reference_multipliers(HASHED_LAYER, MAX_NGRAM, COMPRESSED_VOCAB, SEED)

    def run_library() -> np.ndarray:
        return hasher.hash(ids, HASHED_LAYER).numpy()

    def run_compiled() -> np.ndarray:
        return compiled.hash(ids, HASHED_LAYER).numpy()

    def run_numpy() -> np.ndarray:
        return reference_hash(ids_np, HASHED_LAYER, MAX_NGRAM, HEADS_PER_NGRAM, sizes, multipliers, PAD_ID)

    expected = run_numpy()
    if not np.array_equal(run_library(), expected):
        problems.append("library (eager) and NumPy reference hashes differ")
    if not np.array_equal(run_compiled(), expected):  # also compiles the kernel before timing
        problems.append("library (compile=True) and NumPy reference hashes differ")
    for problem in problems:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    if problems:
        return None
    medians = interleaved_medians(
        {"library, eager": run_library, "library, compile=True": run_compiled, "numpy reference": run_numpy},
        rounds,
        warmup,
    )
    return [Row(name, seconds, batch * seq) for name, seconds in medians.items()]


# -- 2. layer ---------------------------------------------------------------------------------------


def layer_inputs(layer: Engram, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random hidden states of the layer's shape and precomputed hash ids for its layer."""
    generator = torch.Generator().manual_seed(SEED)
    config = layer.config
    hasher = NgramHasher(
        config.layer_ids,
        config.max_ngram_size,
        config.n_head_per_ngram,
        config.engram_vocab_size,
        COMPRESSED_VOCAB,
        pad_id=PAD_ID,
        seed=config.seed,
    )
    ids = torch.randint(0, COMPRESSED_VOCAB, (batch, seq), generator=generator, dtype=torch.long)
    hidden = torch.randn(batch, seq, layer.n_branches, layer.hidden_size, generator=generator)
    return hidden, hasher.hash(ids, layer.layer_id)


def bench_layer(n_branches: int, batch: int, seq: int, rounds: int, warmup: int) -> tuple[list[Row], str]:
    """Forward and forward+backward of one Engram layer; returns the rows and the table grad layout."""
    torch.manual_seed(SEED)
    layer = Engram(LAYER_CONFIG, layer_id=LAYER_CONFIG.layer_ids[0], hidden_size=LAYER_HIDDEN, n_branches=n_branches)
    hidden, hash_ids = layer_inputs(layer, batch, seq)
    hidden.requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            layer(hidden, hash_ids=hash_ids)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        hidden.grad = None
        layer(hidden, hash_ids=hash_ids).float().sum().backward()

    medians = interleaved_medians({"forward": forward, "forward+backward": forward_backward}, rounds, warmup)
    grad = next(p.grad for name, p in layer.named_parameters() if name.startswith("table."))
    layout = "sparse" if grad.is_sparse else "dense"
    prefix = f"M={n_branches} "
    return [Row(prefix + name, seconds, batch * seq) for name, seconds in medians.items()], layout


# -- report -----------------------------------------------------------------------------------------


def hashing_table(rows: list[Row], markdown: bool) -> list[str]:
    """Rows with a last column: throughput relative to the NumPy reference (the last row)."""
    reference = rows[-1]
    body = [[*row_cells(r), f"{r.tokens_per_s / reference.tokens_per_s:.2f}x"] for r in rows]
    return format_table(["implementation", "median ms/call", "tokens/s", "vs numpy"], body, markdown)


def row_cells(row: Row) -> list[str]:
    return [row.name, f"{row.seconds * 1e3:.2f}", f"{row.tokens_per_s:,.0f}"]


def run_facts(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("rounds", f"{args.rounds} timed after {args.warmup} warmup, interleaved; medians")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per measurement (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="hashing batch size (default 64)")
    parser.add_argument("--seq", type=int, default=2048, help="hashing sequence length (default 2048)")
    parser.add_argument("--layer-batch", type=int, default=8, help="layer batch size (default 8)")
    parser.add_argument("--layer-seq", type=int, default=512, help="layer sequence length (default 512)")
    parser.add_argument("--markdown", action="store_true", help="print markdown for docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    md = args.markdown
    heading = (lambda text: f"### {text}") if md else (lambda text: f"== {text} ==")

    hash_rows = bench_hashing(args.batch, args.seq, args.rounds, args.warmup)
    if hash_rows is None:
        return 1
    layer_rows: list[Row] = []
    layouts = []
    for n_branches in LAYER_BRANCHES:
        rows, layout = bench_layer(n_branches, args.layer_batch, args.layer_seq, args.rounds, args.warmup)
        layer_rows += rows
        layouts.append(f"M={n_branches}: {layout}")

    cfg = LAYER_CONFIG
    out = [heading("Environment"), "", *environment_lines(run_facts(args), md), ""]
    out += [
        heading(f"Hashing, {args.batch} x {args.seq} tokens, layer {HASHED_LAYER}, {args.threads} thread(s)"),
        "",
        f"N={MAX_NGRAM}, K={HEADS_PER_NGRAM}, canonical vocab {COMPRESSED_VOCAB}, base sizes {BASE_SIZES}, "
        f"layer_ids {LAYER_IDS}, pad id {PAD_ID}, seed {SEED}. "
        "Outputs identical (np.array_equal): yes.",
        "",
        *hashing_table(hash_rows, md),
        "",
        heading(f"Engram layer, {args.layer_batch} x {args.layer_seq} tokens, {args.threads} thread(s)"),
        "",
        f"hidden {LAYER_HIDDEN}, engram_vocab_size {cfg.engram_vocab_size}, n_embed_per_ngram "
        f"{cfg.n_embed_per_ngram}, K={cfg.n_head_per_ngram}, N={cfg.max_ngram_size}, float32, "
        f"precomputed hash ids; forward under no_grad; table gradient: {', '.join(layouts)}.",
        "",
        *format_table(["branches / pass", "median ms/call", "tokens/s"], [row_cells(r) for r in layer_rows], md),
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
