"""Validation loss and bits per byte on held-out tokens, with Engram on or off.

Bits per byte divide the summed next-token loss (in bits) by the UTF-8 bytes of the predicted
tokens, which makes models with different tokenizers comparable. Switching Engram off zeroes every
Engram module's output: the paper's sensitivity analysis (claim C6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain, pairwise

import numpy as np
import torch
from torch.nn import functional as F

from engram.data.batches import sequential_windows
from engram.indexing.compression import CompressedTokenizer
from engram.model.lm import EngramLM


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    bits_per_byte: float | None  # None without byte lengths
    tokens: int


def token_byte_lengths(tokenizer: CompressedTokenizer) -> np.ndarray:
    """UTF-8 bytes that each raw id stands for: (V,) int64; special tokens count 0.

    For byte-level BPE (GPT-2, DeepSeek) every character of a raw token string is one byte;
    otherwise the id is decoded on its own.
    """
    backend = tokenizer.tokenizer
    backend = getattr(backend, "backend_tokenizer", backend)
    byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
    special = {t.content for t in getattr(backend, "get_added_tokens_decoder", dict)().values() if t.special}
    lengths = np.zeros(tokenizer.raw_vocab_size, dtype=np.int64)
    for tid in range(tokenizer.raw_vocab_size):
        raw = tokenizer.raw_token(tid)
        if raw is None or raw in special:
            continue
        lengths[tid] = len(raw) if byte_level else len(tokenizer.decode([tid]).encode("utf-8"))
    return lengths


@torch.no_grad()
def evaluate(
    model: EngramLM,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    engram_enabled: bool = True,
    byte_lengths: np.ndarray | None = None,
) -> EvalResult:
    """Loss over non-overlapping windows of ``tokens`` (at most ``max_batches`` batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, count, n_bytes = 0.0, 0, 0
    reads_ahead = engram_enabled and model.reads_ahead()  # disk tables: the next batch's rows during this one
    try:
        windows = sequential_windows(tokens, batch_size, seq_len, max_batches)
        for (inputs, targets), following in pairwise(chain(windows, [None])):  # each batch with the next
            ahead = following[0].to(device) if reads_ahead and following is not None else None
            logits = model(inputs.to(device), engram_enabled=engram_enabled, read_ahead=ahead).logits
            model_targets = model.to_model_ids(targets.to(device)).flatten()  # trimmed vocabularies
            nats += F.cross_entropy(logits.float().flatten(0, 1), model_targets, reduction="sum").item()
            count += targets.numel()
            if byte_lengths is not None:
                n_bytes += int(byte_lengths[targets.numpy()].sum())
    finally:
        model.train(was_training)
    bpb = nats / (math.log(2) * n_bytes) if byte_lengths is not None and n_bytes else None
    return EvalResult(nats / count, bpb, count)


def evaluate_with_and_without_engram(
    model: EngramLM, tokens: np.ndarray, **kwargs
) -> tuple[EvalResult, EvalResult | None]:
    """``evaluate`` with Engram on and, if the model has Engram layers, with it switched off (else None)."""
    on = evaluate(model, tokens, **kwargs)
    off = evaluate(model, tokens, engram_enabled=False, **kwargs) if model.engram_layers() else None
    return on, off
