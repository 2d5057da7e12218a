"""Train a pure-MoE model and its iso-parameter Engram twin on your own text files, and compare them.

Give it a training and a validation text file (plain UTF-8; JSON lines or a folder of files work too). It

1. prepares each file with ``engram.data.prepare_dataset``: cleaned, tokenized with DeepSeek-V3
   (offline) into a folder of memory-mapped token ids (``TokenDataset``), a separator after each
   document. (Given one corpus instead, ``prepare_dataset`` splits it into train, validation and test
   by document; here each file is its own dataset, all of it in the ``"train"`` split);
2. trims the model's vocabulary to the ids that occur in the training text (the training dataset's
   ``vocabulary``), so that the embedding and the LM head are small:
   ``ModelConfig(vocab_size=len(kept) + 1, input_vocab_size=tokenizer.raw_vocab_size)`` and
   ``model.set_vocabulary(kept)``; model id 0 stands for every other id. Engram still hashes the
   tokenizer's raw ids;
3. builds a small pure-MoE baseline and, with ``engram.model.accounting.allocate``, the Engram model
   that moves a share 1 - rho of the baseline's sparse (inactive expert) parameters into Engram
   tables: the same total parameters, fewer routed experts;
4. trains both with ``engram.training.Trainer`` from the same seed on the same batches;
5. prints their validation losses (and bits per byte) and the Engram model's loss with its memory
   switched off.

Without ``--train``/``--val`` it writes two files itself from the sonnets bundled with the tests
(sonnets 1-140 to train, 141-154 to validate). The defaults are sized to finish in about 20 s on
2 CPU cores, far too short and too small for the comparison to mean much: raise ``--steps``,
``--d-model`` and the text size for a real run.

Run: python examples/train_on_your_text.py [--train my_train.txt --val my_val.txt] [--steps 400]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.data import TokenDataset, prepare_dataset, sequential_windows
from engram.eval import token_byte_lengths
from engram.model import EngramLM, ModelConfig
from engram.model.accounting import allocate
from engram.model.config import MoEConfig
from engram.training import TrainConfig, Trainer, seed_everything

SONNETS = Path(__file__).resolve().parent.parent / "tests" / "data" / "sonnets.txt"


def write_default_files(folder: Path) -> tuple[Path, Path]:
    """train.txt (sonnets 1-140) and val.txt (sonnets 141-154) in ``folder``: split by document."""
    text = SONNETS.read_text(encoding="utf-8")
    cut = text.index("\nCXLI\n")
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    return train, val


def prepare(tokenizer: CompressedTokenizer, path: Path, folder: Path) -> TokenDataset:
    """``path`` (a file or folder of documents) as a dataset folder, every document in its ``"train"`` split."""
    return prepare_dataset(path, folder, tokenizer, splits=(1.0, 0.0, 0.0))


@torch.no_grad()
def validate(
    model: EngramLM, tokens: np.ndarray, seq_len: int, batch_size: int, byte_lengths: np.ndarray, engram: bool = True
) -> tuple[float, float]:
    """(nats per token, bits per byte) over consecutive windows of ``tokens``; ``engram=False`` switches it off.

    The loss comes from the model's own ``forward(..., targets=...)``, which maps the tokenizer's ids
    into the trimmed vocabulary (ids outside it count as the unknown id 0).
    """
    model.eval()
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for inputs, targets in sequential_windows(tokens, batch_size, seq_len):
        loss = model(inputs, targets=targets, engram_enabled=engram).loss  # mean over the batch's targets
        nats += loss.item() * targets.numel()
        n_tokens += targets.numel()
        n_bytes += int(byte_lengths[targets.numpy()].sum())
    model.train()
    return nats / n_tokens, nats / (math.log(2) * n_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, help="training text (file or folder; default: sonnets 1-140)")
    parser.add_argument("--val", type=Path, help="validation text (file or folder; default: sonnets 141-154)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per model (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=64, help="hidden size (default: %(default)s)")
    parser.add_argument("--rho", type=float, default=0.8, help="share of the sparse budget left to experts")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate; tables get 5x")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads; models this small gain little from more (default: 1)"
    )
    args = parser.parse_args()
    if (args.train is None) != (args.val is None):
        parser.error("give both --train and --val, or neither")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:  # the prepared datasets live here while the script runs
        run(args, Path(tmp))


def run(args: argparse.Namespace, workdir: Path) -> None:
    train_path, val_path = (args.train, args.val) if args.train else write_default_files(workdir)
    tokenizer = CompressedTokenizer()  # DeepSeek-V3, offline; compression table cached in ~/.cache/engram
    train_data = prepare(tokenizer, train_path, workdir / "train-data")
    val_data = prepare(tokenizer, val_path, workdir / "val-data")
    train, val = train_data.tokens("train"), val_data.tokens("train")  # flat uint32 memory maps of raw ids
    print(f"train {train_path.name}: {len(train):,} tokens; val {val_path.name}: {len(val):,} tokens")

    # The model predicts only the ids seen in training (+ id 0 for "anything else").
    kept = train_data.vocabulary  # ascending tokenizer ids
    unknown = np.mean(~np.isin(val, kept))
    print(f"vocabulary trimmed to {len(kept):,} of {tokenizer.raw_vocab_size:,} ids ({unknown:.1%} of val unseen)")

    # The pure-MoE baseline (rho = 1) and the Engram layers the allocation fills.
    baseline = ModelConfig(
        vocab_size=train_data.model_vocab_size,  # len(kept) + 1
        input_vocab_size=tokenizer.raw_vocab_size,
        d_model=args.d_model,
        n_layers=3,
        n_heads=2,
        ffn_hidden=4 * args.d_model,
        moe=MoEConfig(n_routed_experts=32, n_shared_experts=1, top_k=2, expert_hidden=args.d_model),
        n_dense_layers=1,  # the first block keeps a dense FFN, as DeepSeek's models do
        max_seq_len=args.seq_len,
    )
    engram_layers = EngramConfig(layer_ids=[1], max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=64)
    allocation = allocate(baseline, rho=args.rho, engram=engram_layers)
    engram_config = allocation.engram
    print(
        f"allocation rho={args.rho}: routed experts {baseline.moe.n_routed_experts} -> "
        f"{engram_config.moe.n_routed_experts}, Engram base table size {engram_config.engram.engram_vocab_size[0]:,} "
        f"per head at layer(s) {engram_config.engram.layer_ids}"
    )
    for name, counts in (("MoE", allocation.moe_counts), ("Engram", allocation.engram_counts)):
        print(
            f"  {name:<7} total {counts.total:,}  active {counts.active:,}  "
            f"(experts {counts.routed_experts:,}, tables {counts.engram_tables:,}; embedding and head excluded)"
        )

    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 10),
        eval_every=0,  # evaluated once, at the end, below
        checkpoint_every=0,
        log_every=0,
        device="cpu",
        threads=args.threads,
        seed=0,  # the same seed: same data order for both models
    )
    byte_lengths = token_byte_lengths(tokenizer)  # for bits per byte
    results = {}
    for name, config in (("MoE", baseline), ("Engram", engram_config)):
        seed_everything(0)
        indexer = EngramIndexer(config.engram, tokenizer) if config.engram is not None else None
        model = EngramLM(config, indexer=indexer)  # Engram tables get sparse gradients by default
        model.set_vocabulary(torch.tensor(kept))
        trainer = Trainer(model, train_config, train, progress=False)
        losses = trainer.train()
        print(f"{name:<7} trained {args.steps} steps: train loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
        results[name] = validate(model, val, args.seq_len, args.batch_size, byte_lengths)
        if config.engram is not None:
            results["Engram off"] = validate(model, val, args.seq_len, args.batch_size, byte_lengths, engram=False)

    print("validation (nats per token, bits per byte):")
    labels = {"MoE": "MoE baseline", "Engram": f"Engram, rho={args.rho}", "Engram off": "Engram switched off"}
    for name, (loss, bpb) in results.items():
        print(f"  {labels[name]:<20} val loss {loss:.4f}  bpb {bpb:.4f}")
    print(f"  Engram - MoE: {results['Engram'][0] - results['MoE'][0]:+.4f} nats per token")


if __name__ == "__main__":
    main()
