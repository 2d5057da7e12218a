"""``engram demo``: an MoE baseline against its iso-parameter Engram model, on real text, in minutes.

On the bundled Shakespeare corpus and the DeepSeek-V3 tokenizer, two models with equal total
parameters are trained with the same seed and the same batches: a pure MoE, and the model that
moves a share of the MoE's sparse parameters into Engram tables (``allocate``). The demo prints
their parameters, speed, validation loss, bits per byte and the loss with Engram switched off, and
writes the loss curves and a heatmap of Engram's gates on phrases whose last token completes a
multi-token name or set phrase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from engram._files import FolderLock
from engram._json_config import option_type
from engram.config import EngramConfig
from engram.data import TokenDataset, prepare_dataset
from engram.eval.plots import plot_gate_heatmap, plot_loss_comparison
from engram.indexing.compression import CompressedTokenizer
from engram.model.accounting import allocate, count_parameters
from engram.model.config import ModelConfig, MoEConfig
from engram.model.lm import EngramLM
from engram.training.config import TrainConfig
from engram.training.metrics import MetricsLog
from engram.training.run import RunSpec, start_run

BASELINE = ModelConfig(
    vocab_size=129_280,  # replaced by the trimmed vocabulary of the data
    d_model=128,
    n_layers=4,
    n_heads=4,
    max_seq_len=128,
    n_dense_layers=1,
    moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=2, expert_hidden=128),
)
# Tables start small (std 0.005, like a residual stream initialised at 0.02) so that the sparse Adam
# steps move looked-up rows within a few visits; the demo's N(0, 1) trains far slower (docs/demo.md).
ENGRAM_LAYERS = EngramConfig(layer_ids=[1], n_embed_per_ngram=64, n_head_per_ngram=4, pad_id=2, table_init_std=0.005)
RHO = 0.8
# About 3 minutes per model on 2 CPU cores (3,000 tokens/s): the whole demo stays under 10 minutes.
TRAIN = TrainConfig(
    steps=300,
    batch_size=16,
    seq_len=128,
    lr=3e-3,
    warmup_steps=30,
    eval_every=75,
    eval_batches=8,
    checkpoint_every=150,
    log_every=10,
)
QUICK = dict(
    steps=12, batch_size=4, seq_len=64, warmup_steps=2, eval_every=6, eval_batches=2, checkpoint_every=6, log_every=2
)
PHRASES = [
    "Only Alexander the Great could tame the horse Bucephalus.",
    "By the way, the Prince of Denmark is in love.",
    "Romeo and Juliet met in fair Verona.",
    "Good night, sweet prince, and flights of angels sing thee to thy rest.",
]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="train an MoE baseline and its iso-parameter Engram model on Shakespeare and compare them",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests and a first look)")
    parser.add_argument("--steps", type=option_type(int, ge=1), default=None, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def _dataset(out: Path, tokenizer: CompressedTokenizer) -> TokenDataset:
    """The bundled corpus prepared for ``tokenizer`` under ``out/data`` (once)."""
    path = out / "data"
    if not (path / "manifest.json").is_file():
        print("preparing the bundled Shakespeare corpus ...", flush=True)
        prepare_dataset("shakespeare", path, tokenizer, splits=(0.9, 0.05, 0.05))
    dataset = TokenDataset(path)
    dataset.check_tokenizer(tokenizer)
    return dataset


def _gate_panels(model: EngramLM, tokenizer: CompressedTokenizer) -> list[tuple[list[str], np.ndarray]]:
    engram = next(iter(model.engram_layers().values()))
    engram.record_gates = True
    panels = []
    with torch.no_grad():
        for text in PHRASES:
            ids = torch.tensor([tokenizer.encode(text)], device=next(model.parameters()).device)
            model(ids)
            panels.append(([tokenizer.decode([t]) for t in ids[0].tolist()], engram.last_gate[0].float().cpu().numpy()))
    engram.record_gates = False
    return panels


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    train = dataclasses.replace(TRAIN, **(QUICK if args.quick else {}))  # validated before any work
    if args.steps is not None:
        train = dataclasses.replace(train, steps=args.steps)
    train = dataclasses.replace(train, seed=args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "engram demo"):  # one demo per folder; each run inside takes its own lock too
        return _run(args, out, train, started)


def _run(args: argparse.Namespace, out: Path, train: TrainConfig, started: float) -> int:
    tokenizer = CompressedTokenizer()
    _dataset(out, tokenizer)
    allocation = allocate(BASELINE, RHO, ENGRAM_LAYERS)
    configs = {"MoE": allocation.moe, "Engram+MoE": allocation.engram}

    results, metrics = {}, {}
    for name, config in configs.items():
        print(f"training {name} ...", flush=True)
        run_dir = out / name.lower().replace("+", "-")
        spec = RunSpec(model=config, train=train, data=str((out / "data").resolve()))
        trainer = start_run(spec, run_dir, progress=not args.no_progress)
        step_start, step0 = time.perf_counter(), trainer.step
        try:
            trainer.train()
        finally:
            trainer.close()
        elapsed = time.perf_counter() - step_start
        evaluation = trainer.evaluate(max_batches=train.eval_batches)
        counts = count_parameters(trainer.model)
        records = MetricsLog(run_dir / "metrics.jsonl").read()
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        results[name] = {
            "total": counts.total,
            "active": counts.active,
            "tables": counts.engram_tables,
            "tokens_per_s": float(np.median(speeds)) if speeds else float("nan"),
            **evaluation,
        }
        metrics[name] = records
        if name == "Engram+MoE":
            panels = _gate_panels(trainer.model, tokenizer)
        print(f"  {trainer.step - step0} steps in {elapsed:.0f} s", flush=True)

    curves = plot_loss_comparison(metrics, out / "loss_curves.png", "Shakespeare, DeepSeek-V3 tokenizer")
    gates = plot_gate_heatmap(panels, out / "gate_heatmap.png", "Engram gate per token and branch (layer 1)")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results, train)
    print(
        f"\nThe two models differ in more than memory ({allocation.moe.moe.n_routed_experts} vs "
        f"{allocation.engram.moe.n_routed_experts} routed experts, {100 * allocation.active_mismatch:+.1f}% active "
        "parameters) and this is one seed: the controlled comparison is `engram experiment run iso-parameter` "
        "(docs/results.md)."
    )
    print(f"\nfiles: {curves}, {gates}, {out / 'results.json'}; runs in {out}/moe and {out}/engram-moe")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _print_table(results: dict[str, dict[str, float]], train: TrainConfig) -> None:
    rows = [
        ("total parameters (excl. embedding, head)", "total", "{:,.0f}"),
        ("active parameters per token", "active", "{:,.0f}"),
        ("Engram table parameters", "tables", "{:,.0f}"),
        ("training tokens/s (median)", "tokens_per_s", "{:,.0f}"),
        ("validation loss (nats/token)", "val_loss", "{:.4f}"),
        ("validation bits per byte", "val_bpb", "{:.4f}"),
        ("validation loss, Engram off", "val_loss_engram_off", "{:.4f}"),
    ]
    names = list(results)
    tokens = train.steps * train.batch_size * train.seq_len
    print(f"\n{train.steps} steps x {train.batch_size} x {train.seq_len} tokens = {tokens:,} training tokens per model")
    print(f"{'':42}" + "".join(f"{n:>16}" for n in names))
    for label, key, fmt in rows:
        cells = [fmt.format(results[n][key]) if key in results[n] else "-" for n in names]
        print(f"{label:42}" + "".join(f"{c:>16}" for c in cells))
