"""Add Engram to a trained transformers Llama and continue training: measured against continuing without it.

1. Train a small ``LlamaForCausalLM`` from random init (4 layers, d 128, 1.3M parameters) on the bundled Shakespeare
   corpus (engram's data pipeline, document-level train/validation/test splits) with a 2,048-id
   byte-level BPE trained here on the train split, for ``--pretrain-steps`` steps.
2. From that checkpoint, continue for ``--steps`` more steps on the same batches (one batch stream
   per seed, shared by all arms), in four arms:

   - ``continue``: the model unchanged, every parameter trained (AdamW);
   - ``engram-frozen``: ``engram.hf.retrofit`` adds Engram before decoder layer 1, the backbone is
     frozen and only Engram trains (``RetrofitOptimizer``: AdamW for its projections, ``RowAdam`` at
     5x the rate for its tables);
   - ``engram-frozen-lr3x``: the same at 3x the learning rate (is the frozen arm held back by its rate?);
   - ``engram-all``: Engram added and everything trained (the same optimizer over all parameters).

   The checkpoint itself is the fourth row (``start``): a frozen backbone without Engram cannot move.
3. Report validation and test loss (nats per token) and bits per byte, mean and standard deviation
   over the seeds, and the paired difference of each arm to ``continue``.

Every arm uses the same schedule (20 warmup steps, cosine to 10%), learning rate (but the lr3x arm), batches and
gradient clipping (1.0, on the dense parameters); the seed fixes the batch stream and Engram's
initialisation. Results go to ``OUT/results.json``; the run is what docs/retrofit.md reports.

Run: python examples/retrofit_llama.py --out runs/retrofit-llama   (about 8 minutes on one CPU thread)
     python examples/retrofit_llama.py --quick --out /tmp/retrofit  (seconds: a smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engram import CompressedTokenizer
from engram.data.batches import RandomWindows, sequential_windows
from engram.data.prepare import prepare_dataset, split_of
from engram.data.sources import shakespeare
from engram.data.text import clean_text
from engram.eval import token_byte_lengths
from engram.hf.retrofit import RetrofitOptimizer, engram_parameters, retrofit

ARMS = ("continue", "engram-frozen", "engram-frozen-lr3x", "engram-all")


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the train split of the bundled Shakespeare (the split prepare_dataset uses)."""
    texts = (clean_text(text) for doc_id, text in shakespeare() if split_of(doc_id, 0) == "train")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|endoftext|>")


def llama(vocab_size: int, args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.d_model,
        intermediate_size=int(args.d_model * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def schedule(step: int, total: int, warmup: int = 20) -> float:
    """Learning-rate factor: linear warmup, then cosine to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, optimizer, batches: RandomWindows, steps: int) -> list[float]:
    """``steps`` steps of next-token cross-entropy with ``optimizer`` (any torch optimizer); the losses."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, steps))
    model.train()
    losses = []
    for step in range(steps):
        inputs, targets = batches.batch(step)
        logits = model(inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Dense gradients only: RetrofitOptimizer keeps the tables' sparse gradients off the parameters.
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq_len: int, byte_lengths: np.ndarray) -> dict[str, float]:
    """Loss (nats per token) and bits per byte over every non-overlapping window of ``tokens``."""
    model.eval()
    nats, count, n_bytes = 0.0, 0, 0
    for inputs, targets in sequential_windows(tokens, 16, seq_len):
        logits = model(inputs, use_cache=False).logits
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        n_bytes += int(byte_lengths[targets.numpy()].sum())
    return {"loss": nats / count, "bpb": nats / (math.log(2) * n_bytes), "tokens": count}


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/retrofit-llama"))
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, default=250, help="continuation steps of every arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW rate of every arm; Engram's tables get 5x")
    parser.add_argument("--engram-layers", type=int, nargs="+", default=[1])
    parser.add_argument("--table-rows", type=int, default=10_000, help="base table size per order")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.steps, args.seeds = 10, 5, [0]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tokenizer = build_tokenizer(args.vocab)
    tokenizer.save_pretrained(args.out / "tokenizer")
    compressor = CompressedTokenizer(tokenizer, cache_dir=False)
    data = prepare_dataset(
        "shakespeare", args.out / "data", compressor, separator_id=tokenizer.eos_token_id, overwrite=True
    )
    train_tokens, val_tokens, test_tokens = (data.tokens(s) for s in ("train", "val", "test"))
    byte_lengths = token_byte_lengths(compressor)
    print(f"tokens: train {len(train_tokens):,}, val {len(val_tokens):,}, test {len(test_tokens):,}")

    checkpoint = args.out / "pretrained"
    torch.manual_seed(0)
    model = llama(len(tokenizer), args)
    t0 = time.time()
    pretrain = train(
        model,
        torch.optim.AdamW(model.parameters(), lr=3 * args.lr, betas=(0.9, 0.95), weight_decay=0.1),
        RandomWindows(train_tokens, args.batch_size, args.seq_len, seed=0),
        args.pretrain_steps,
    )
    model.save_pretrained(checkpoint)
    start = {"val": evaluate(model, val_tokens, args.seq_len, byte_lengths),
             "test": evaluate(model, test_tokens, args.seq_len, byte_lengths)}  # fmt: skip
    backbone_params = count(model.parameters())
    print(f"pretrained {args.pretrain_steps} steps in {time.time() - t0:.0f} s: train loss {pretrain[-1]:.3f}, "
          f"val {start['val']['loss']:.4f}")  # fmt: skip

    runs = []
    for seed in args.seeds:
        for arm in ARMS:
            t0 = time.time()
            model = LlamaForCausalLM.from_pretrained(checkpoint)
            torch.manual_seed(seed)  # Engram's initialisation
            if arm == "continue":
                optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
            else:
                retrofit(model, tokenizer, layers=args.engram_layers, freeze_backbone=arm.startswith("engram-frozen"),
                         n_embed_per_ngram=128, n_head_per_ngram=4,
                         engram_vocab_size=[args.table_rows, args.table_rows])  # fmt: skip
                lr = 3 * args.lr if arm.endswith("lr3x") else args.lr
                optimizer = RetrofitOptimizer.for_model(model, lr=lr, weight_decay=0.1)
            trainable = count(p for p in model.parameters() if p.requires_grad)
            engram_dense, tables = ([], []) if arm == "continue" else engram_parameters(model)
            table_params = count(t.weight for t in tables)
            # Per token: every non-table parameter, plus the table rows each Engram layer reads ((N-1)*K rows).
            active = count(model.parameters()) - table_params
            if tables:
                active += sum(e.config.memory_dim for e in model.engram.layers.values())
            losses = train(model, optimizer, RandomWindows(train_tokens, args.batch_size, args.seq_len,
                                                           seed=1000 + seed), args.steps)  # fmt: skip
            run = {
                "arm": arm, "seed": seed, "steps": args.steps, "train_loss_last20": float(np.mean(losses[-20:])),
                "val": evaluate(model, val_tokens, args.seq_len, byte_lengths),
                "test": evaluate(model, test_tokens, args.seq_len, byte_lengths),
                "total_params": count(model.parameters()), "trainable_params": trainable,
                "table_params": table_params, "engram_dense_params": count(engram_dense),
                "active_params_per_token": active, "seconds": round(time.time() - t0, 1),
            }  # fmt: skip
            runs.append(run)
            print(f"seed {seed} {arm:14s} val {run['val']['loss']:.4f} ({run['val']['bpb']:.4f} bpb)  "
                  f"test {run['test']['loss']:.4f}  {run['seconds']:.0f} s")  # fmt: skip

    summary = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        entry = {}
        for split in ("val", "test"):
            for metric in ("loss", "bpb"):
                values = np.array([r[split][metric] for r in mine])
                base = np.array([r[split][metric] for r in runs if r["arm"] == "continue"])
                entry[f"{split}_{metric}"] = {"mean": float(values.mean()), "std": float(values.std(ddof=1))
                                              if len(values) > 1 else 0.0, "values": values.tolist()}  # fmt: skip
                diff = values - base
                entry[f"{split}_{metric}_minus_continue"] = {
                    "mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                    "values": diff.tolist(),
                }  # fmt: skip
        summary[arm] = entry
    result = {
        "command": "flock /tmp/engram-heavy.lock python examples/retrofit_llama.py --out runs/retrofit-llama",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "processor": platform.processor(),
        },
        "data": {
            "train_tokens": len(train_tokens),
            "val_tokens": len(val_tokens),
            "test_tokens": len(test_tokens),
            "tokenizer": f"byte-level BPE, {len(tokenizer)} ids, trained on the train split",
        },
        "pretrain": {
            "steps": args.pretrain_steps,
            "train_loss_last20": float(np.mean(pretrain[-20:])),
            "params": backbone_params,
            **start,
        },
        "runs": runs,
        "summary": summary,
        "wall_seconds": round(time.time() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"start          val {start['val']['loss']:.4f} ({start['val']['bpb']:.4f} bpb)")
    for arm, entry in summary.items():
        v, d = entry["val_loss"], entry["val_loss_minus_continue"]
        print(f"{arm:14s} val {v['mean']:.4f} ± {v['std']:.4f}  bpb {entry['val_bpb']['mean']:.4f}  "
              f"vs continue {d['mean']:+.4f} ± {d['std']:.4f}")  # fmt: skip
    print(f"{args.out / 'results.json'} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
