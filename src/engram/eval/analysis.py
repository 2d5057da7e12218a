"""Why Engram helps, or does not: representation similarity, LogitLens, Engram-off loss and gates by token class.

- ``linear_cka`` / ``cka_matrix``: linear centred kernel alignment (Kornblith et al. 2019) between
  the hidden states of two models on the same token windows. A layer of an Engram model that is
  most similar to a deeper layer of the baseline is "ahead" of it.
- ``logit_lens_kl``: each hidden state read out with the model's own final norm and LM head, and
  its KL divergence to the final distribution. The paper reports that Engram models get close to
  their final prediction in earlier layers.
- ``sensitivity_by_class``: the loss with Engram on and off (every Engram module zeroed) per target
  position, split into classes defined from the data alone: the n-gram ending at the target is
  frequent in training, the target is predictable only by copying from the context, or neither.
- ``gate_statistics``: the mean Engram gate per layer, overall and at positions that end a
  frequent training n-gram or a multi-token word.

Everything runs under ``torch.no_grad`` in eval mode (the training mode is restored afterwards) on
non-overlapping windows of an evaluation split (``sequential_windows``), the same windows for every
model. Tokens are raw tokenizer ids, as datasets store them; each model maps them to its own ids.
Shapes: B windows, T positions, d width, L layers, V vocabulary, M residual branches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.nn import functional as F

from engram.data.batches import sequential_windows
from engram.indexing.compression import CompressedTokenizer
from engram.model.lm import EngramLM

SENSITIVITY_CLASSES = ("frequent_ngram", "in_context", "other")
GATE_CLASSES = ("frequent_ngram", "word_end", "rest")

# Logits of at most this many (position, vocabulary) entries at a time in the LogitLens, so that
# a ~100k-id output vocabulary never needs a (B*T, V) tensor per layer.
_LOGIT_CHUNK = 1 << 22


# -- linear CKA -----------------------------------------------------------------------------------
def _centred(features: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(n, d) features as float64 with every column's mean removed."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be an (n, d) feature matrix with n >= 2, got shape {features.shape}")
    return features - features.mean(axis=0)


def _self_similarity(centred: np.ndarray, name: str) -> float:
    """||X^T X||_F of centred features; zero means constant features, for which CKA is undefined."""
    norm = float(np.linalg.norm(centred.T @ centred))
    if norm == 0.0:
        raise ValueError(f"{name} is constant over the positions: CKA is undefined")
    return norm


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA of features x (n, d1) and y (n, d2) of the same n examples, in [0, 1].

    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred features, in float64. It is 1 for
    x and y related by an orthogonal transform and an isotropic scaling, and near 0 for
    independent features when n is much larger than d1 and d2.
    """
    xc, yc = _centred(x, "x"), _centred(y, "y")
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"x and y must describe the same examples, got {xc.shape[0]} and {yc.shape[0]} rows")
    cross = float(np.linalg.norm(yc.T @ xc)) ** 2
    return cross / (_self_similarity(xc, "x") * _self_similarity(yc, "y"))


# -- evaluation windows ---------------------------------------------------------------------------
def _windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_positions: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches, each (B, T) int64, of the first whole windows of ``tokens``.

    ``max_positions`` bounds the positions: ``max_positions // seq_len`` windows (at least one);
    None takes every window.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1 or None, got {max_positions}")
    limit = None if max_positions is None else max(1, max_positions // seq_len)
    max_batches = None if limit is None else -(-limit // batch_size)
    batches, seen = [], 0
    for inputs, targets in sequential_windows(tokens, batch_size, seq_len, max_batches):
        if limit is not None:
            inputs, targets = inputs[: limit - seen], targets[: limit - seen]
        seen += len(inputs)
        batches.append((inputs, targets))
    return batches


@contextmanager
def _analysing(*models: EngramLM) -> Iterator[None]:
    """Eval mode and no gradients for the block; each model's training mode is restored afterwards."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def _device(model: EngramLM) -> torch.device:
    return next(model.parameters()).device


def _hidden_features(model: EngramLM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[np.ndarray]:
    """Per hidden state (embedding, then each block): centred float64 features (positions, d)."""
    layers: list[list[torch.Tensor]] = [[] for _ in range(model.config.n_layers + 1)]
    for inputs, _ in batches:
        hidden = model(inputs.to(_device(model)), output_hidden_states=True).hidden_states
        for store, h in zip(layers, hidden, strict=True):
            store.append(h.flatten(0, 1).float().cpu())
    return [_centred(torch.cat(store), f"hidden state {i}") for i, store in enumerate(layers)]


def cka_matrix(
    model_a: EngramLM,
    model_b: EngramLM,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    max_positions: int | None = 4096,
) -> np.ndarray:
    """Linear CKA between every hidden state of ``model_a`` and of ``model_b``: (L_a + 1, L_b + 1).

    Row i is ``model_a``'s hidden state i (0 the embedding, i the output of block i), column j
    ``model_b``'s; both models see the same windows of ``tokens`` (tokenizer ids, so the two models
    must share the tokenizer). Every position of ``max_positions // seq_len`` windows is one
    example; the features of all layers of both models are held in float64, about
    (L_a + L_b + 2) * positions * d * 8 bytes.
    """
    batches = _windows(tokens, seq_len, batch_size, max_positions)
    with _analysing(model_a, model_b):
        features_a = _hidden_features(model_a, batches)
        features_b = _hidden_features(model_b, batches)
    norms_a = [_self_similarity(x, f"model_a hidden state {i}") for i, x in enumerate(features_a)]
    norms_b = [_self_similarity(y, f"model_b hidden state {j}") for j, y in enumerate(features_b)]
    matrix = np.empty((len(features_a), len(features_b)))
    for i, (x, norm_x) in enumerate(zip(features_a, norms_a, strict=True)):
        for j, (y, norm_y) in enumerate(zip(features_b, norms_b, strict=True)):
            matrix[i, j] = float(np.linalg.norm(y.T @ x)) ** 2 / (norm_x * norm_y)
    return matrix


# -- LogitLens ------------------------------------------------------------------------------------
def _log_probs(model: EngramLM, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (n, V), float32, that the model's final norm and head give hidden states (n, d)."""
    return F.log_softmax(model.head(model.norm(hidden)).float(), dim=-1)


def logit_lens_kl(
    model: EngramLM, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_positions: int | None = 4096
) -> np.ndarray:
    """Mean KL(p_layer || p_final) in nats per hidden state: (L + 1,) float64.

    p_layer = softmax(head(norm(hidden_states[layer]))) (entry 0 the embedding, entry i block i's
    output) and p_final the model's output distribution, averaged over every position of
    ``max_positions // seq_len`` windows of ``tokens``. The last entry is 0 exactly.
    """
    batches = _windows(tokens, seq_len, batch_size, max_positions)
    total = np.zeros(model.config.n_layers + 1)
    positions = 0
    chunk = max(1, _LOGIT_CHUNK // model.config.vocab_size)
    with _analysing(model):
        for inputs, _ in batches:
            output = model(inputs.to(_device(model)), output_hidden_states=True)
            hidden = [h.flatten(0, 1) for h in output.hidden_states]  # (B*T, d) each
            for start in range(0, len(hidden[0]), chunk):
                final = _log_probs(model, hidden[-1][start : start + chunk])
                # The final layer against itself is 0 by definition: left at 0 instead of recomputed.
                for layer, h in enumerate(hidden[:-1]):
                    log_p = _log_probs(model, h[start : start + chunk])
                    total[layer] += (log_p.exp() * (log_p - final)).sum(-1).double().sum().item()
            positions += len(hidden[0])
    return total / positions


# -- n-gram counts and token classes --------------------------------------------------------------
class NgramCounts:
    """How often each n-gram of ``n`` consecutive ids occurs in ``tokens`` (1-D raw tokenizer ids).

    The ids that occur are renumbered 0..U-1 and each n-gram is packed into one int64 key (base U),
    so counting is one ``np.unique`` and a lookup one ``np.searchsorted``: about a second for
    millions of tokens. N-grams across document separators are counted like any other. The ids are
    the tokenizer's raw ids, not Engram's canonical ones: the classes describe the data itself.
    """

    def __init__(self, tokens: np.ndarray, n: int = 3):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise TypeError("tokens must be a 1-D array of integer token ids")
        if n < 2:
            raise ValueError(f"n must be >= 2 (an n-gram ending at a token includes its context), got {n}")
        if len(tokens) < n:
            raise ValueError(f"need at least n = {n} tokens to count n-grams, got {len(tokens)}")
        self.n = n
        self.vocabulary = np.unique(tokens.astype(np.int64))  # sorted ids that occur
        if len(self.vocabulary) ** n >= 2**63:
            raise ValueError(f"{len(self.vocabulary)} distinct ids do not pack {n}-grams into int64 keys")
        dense = np.searchsorted(self.vocabulary, tokens.astype(np.int64))
        self.keys, self.counts = np.unique(self._pack(sliding_window_view(dense, n)), return_counts=True)

    def _pack(self, dense: np.ndarray) -> np.ndarray:
        """(..., n) renumbered ids -> (...) int64 keys."""
        keys = np.zeros(dense.shape[:-1], dtype=np.int64)
        for k in range(self.n):
            keys = keys * len(self.vocabulary) + dense[..., k]
        return keys

    def count(self, ngrams: np.ndarray) -> np.ndarray:
        """Occurrences of each n-gram: (..., n) raw ids -> (...) int64 (0 for n-grams never seen)."""
        ngrams = np.asarray(ngrams, dtype=np.int64)
        if ngrams.shape[-1:] != (self.n,):
            raise ValueError(f"ngrams must have shape (..., {self.n}), got {ngrams.shape}")
        dense = np.searchsorted(self.vocabulary, ngrams).clip(max=len(self.vocabulary) - 1)
        known = (self.vocabulary[dense] == ngrams).all(-1)
        keys = self._pack(dense)
        index = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return np.where(known & (self.keys[index] == keys), self.counts[index], 0)


def _ngram_counts_ending_at(windows: np.ndarray, counts: NgramCounts, first: int) -> np.ndarray:
    """Training counts of the n-grams of ``windows`` (B, W) ending at columns first.., (B, W - first).

    Columns whose n-gram would start before the window count 0.
    """
    n = counts.n
    out = np.zeros((windows.shape[0], windows.shape[1] - first), dtype=np.int64)
    start = max(first, n - 1)  # first column with a whole n-gram inside the window
    if start < windows.shape[1]:
        out[:, start - first :] = counts.count(sliding_window_view(windows[:, start - n + 1 :], n, axis=1))
    return out


def target_classes(inputs: np.ndarray, targets: np.ndarray, counts: NgramCounts, min_count: int) -> np.ndarray:
    """Class of each target position, an index into ``SENSITIVITY_CLASSES``: (B, T) int64.

    With the window w = (x_0, ..., x_{T-1}, y_{T-1}) (inputs (B, T), targets (B, T) = inputs shifted
    by one), the target of position t is y_t = x_{t+1}, and the first class that applies is its class:

    0. ``frequent_ngram``: the n-gram ending at the target, (x_{t-n+2}, ..., x_t, y_t), lies inside
       the window and occurs at least ``min_count`` times in the training tokens (``counts``).
    1. ``in_context``: not 0, and the bigram (x_t, y_t) occurred earlier in the same window, as
       (x_s, y_s) with s < t: the target is predictable by copying from the context, not from
       training n-gram statistics.
    2. ``other``: everything else.
    """
    inputs, targets = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    windows = np.concatenate([inputs, targets[:, -1:]], axis=1)  # (B, T + 1)
    frequent = _ngram_counts_ending_at(windows, counts, first=1) >= min_count
    rows = np.repeat(np.arange(len(inputs)), inputs.shape[1])
    bigrams = np.stack([rows, inputs.ravel(), targets.ravel()], axis=1)
    # np.unique's first index of a (window, bigram) is its earliest position, windows being row-major.
    _, first, inverse = np.unique(bigrams, axis=0, return_index=True, return_inverse=True)
    seen_before = (first[inverse.reshape(-1)] < np.arange(len(bigrams))).reshape(inputs.shape)
    return np.where(frequent, 0, np.where(seen_before, 1, 2))


def _word_flags(tokenizer: CompressedTokenizer, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether the text of each id in ``ids`` (any shape) starts, and whether it ends, with a letter or digit."""
    unique, inverse = np.unique(ids, return_inverse=True)
    texts = [tokenizer.decode([int(tid)]) for tid in unique]  # only the ids present: fast for any vocabulary
    starts = np.array([bool(text) and text[0].isalnum() for text in texts])
    ends = np.array([bool(text) and text[-1].isalnum() for text in texts])
    return starts[inverse].reshape(ids.shape), ends[inverse].reshape(ids.shape)


def gate_classes(
    inputs: np.ndarray, targets: np.ndarray, counts: NgramCounts, min_count: int, tokenizer: CompressedTokenizer
) -> dict[str, np.ndarray]:
    """Position classes for gate statistics, keyed by ``GATE_CLASSES``: each a (B, T) bool mask.

    Position t reads the memory with input token x_t (targets: y_t = x_{t+1}).

    - ``frequent_ngram``: the n-gram ending at the input, (x_{t-n+1}, ..., x_t), the one Engram looks
      up, lies inside the window and occurs at least ``min_count`` times in the training tokens.
    - ``word_end``: x_t ends a multi-token word. With s(i) the tokenizer's text of id i alone
      (``tokenizer.decode([i])``): x_t continues a word (s(x_t) starts with a letter or digit, so
      not with a space or punctuation), the previous token was inside the word (t >= 1 and
      s(x_{t-1}) ends with a letter or digit), and the next token does not continue it (s(y_t)
      does not start with a letter or digit). Byte pieces of a multi-byte character decode to
      U+FFFD and never count as letters.
    - ``rest``: neither of the two (which may overlap).
    """
    inputs, targets = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    frequent = _ngram_counts_ending_at(inputs, counts, first=0) >= min_count
    starts, ends = _word_flags(tokenizer, np.concatenate([inputs, targets[:, -1:]], axis=1))  # (B, T + 1)
    prev_inside = np.zeros(inputs.shape, dtype=bool)
    prev_inside[:, 1:] = ends[:, :-2]
    word_end = starts[:, :-1] & prev_inside & ~starts[:, 1:]
    return {"frequent_ngram": frequent, "word_end": word_end, "rest": ~(frequent | word_end)}


def _as_counts(train_tokens: np.ndarray | NgramCounts, n: int) -> NgramCounts:
    if isinstance(train_tokens, NgramCounts):
        if train_tokens.n != n:
            raise ValueError(f"the n-gram counts are of order {train_tokens.n}, not n = {n}")
        return train_tokens
    return NgramCounts(train_tokens, n)


def _require_engram(model: EngramLM) -> None:
    if not model.engram_layers():
        raise ValueError("the model has no Engram layers: there is nothing to switch off or gate")


# -- Engram-off sensitivity -----------------------------------------------------------------------
def _position_losses(model: EngramLM, inputs: torch.Tensor, targets: torch.Tensor, engram_enabled: bool) -> np.ndarray:
    """Next-token cross-entropy (B, T) in nats, float64."""
    device = _device(model)
    logits = model(inputs.to(device), engram_enabled=engram_enabled).logits
    model_targets = model.to_model_ids(targets.to(device))  # trimmed vocabularies: unknown ids -> 0
    loss = F.cross_entropy(logits.float().flatten(0, 1), model_targets.flatten(), reduction="none")
    return loss.view(targets.shape).double().cpu().numpy()


def _loss_summary(on: np.ndarray, off: np.ndarray, total_increase: float) -> dict[str, float | int | None]:
    if on.size == 0:
        return {"positions": 0, "loss_on": None, "loss_off": None, "delta": None, "share_of_increase": None}
    increase = float((off - on).sum())
    return {
        "positions": int(on.size),
        "loss_on": float(on.mean()),
        "loss_off": float(off.mean()),
        "delta": increase / on.size,
        "share_of_increase": increase / total_increase if total_increase != 0 else None,
    }


def sensitivity_by_class(
    model: EngramLM,
    train_tokens: np.ndarray | NgramCounts,
    eval_tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    max_positions: int | None = 4096,
    n: int = 3,
    min_count: int = 5,
) -> dict:
    """Loss with Engram on and off per class of target position (``target_classes``).

    Args:
        model: a model with Engram layers; off zeroes every Engram module (``engram_enabled=False``).
        train_tokens: the training token ids the n-grams are counted in, or their ``NgramCounts``.
        eval_tokens: the evaluation token ids; ``max_positions // seq_len`` windows are used.
        n, min_count: an n-gram ending at the target is frequent if it occurs ``min_count`` times.

    Returns:
        ``{"n", "min_count", "all": summary, "classes": {name: summary}}`` with, per summary,
        ``positions``, mean ``loss_on`` and ``loss_off`` (nats), ``delta`` (mean off - on) and
        ``share_of_increase``: the class's part of the summed loss increase over all positions
        (None if that sum is 0). Means are None for an empty class.
    """
    _require_engram(model)
    counts = _as_counts(train_tokens, n)
    on, off, classes = [], [], []
    with _analysing(model):
        for inputs, targets in _windows(eval_tokens, seq_len, batch_size, max_positions):
            on.append(_position_losses(model, inputs, targets, engram_enabled=True).ravel())
            off.append(_position_losses(model, inputs, targets, engram_enabled=False).ravel())
            classes.append(target_classes(inputs.numpy(), targets.numpy(), counts, min_count).ravel())
    on, off, classes = np.concatenate(on), np.concatenate(off), np.concatenate(classes)
    total = float((off - on).sum())
    return {
        "n": n,
        "min_count": min_count,
        "all": _loss_summary(on, off, total),
        "classes": {
            name: _loss_summary(on[classes == k], off[classes == k], total)
            for k, name in enumerate(SENSITIVITY_CLASSES)
        },
    }


# -- gate statistics ------------------------------------------------------------------------------
def gate_statistics(
    model: EngramLM,
    train_tokens: np.ndarray | NgramCounts,
    eval_tokens: np.ndarray,
    tokenizer: CompressedTokenizer,
    seq_len: int,
    batch_size: int = 8,
    max_positions: int | None = 4096,
    n: int = 3,
    min_count: int = 5,
) -> dict:
    """Mean Engram gate per layer, over all positions and per class of ``gate_classes``.

    Args:
        model: a model with Engram layers (each records its gates (B, T, M) through
            ``record_gates`` / ``last_gate`` during the analysis, then goes back to what it did).
        train_tokens: the training token ids the n-grams are counted in, or their ``NgramCounts``.
        eval_tokens: the evaluation token ids; ``max_positions // seq_len`` windows are used.
        tokenizer: the tokenizer of the ids, whose decoded strings define word ends.
        n, min_count: an n-gram ending at the input is frequent if it occurs ``min_count`` times.

    Returns:
        ``{"n", "min_count", "layers": {layer: {"all": s, "frequent_ngram": s, "word_end": s,
        "rest": s}}}`` with s = ``{"positions", "mean_gate", "branch_means"}``: the gate averaged
        over the class's positions and the M branches (None for an empty class), and per branch.
        A model whose layers have no gate (``use_gate=False``, or modules that record none) gives
        ``{"skipped": reason}`` instead.
    """
    _require_engram(model)
    if not model.config.engram.use_gate:  # its modules record a gate of 1 everywhere
        return {"skipped": "the model's Engram layers are built without a gate (use_gate=False)"}
    counts = _as_counts(train_tokens, n)
    engrams = model.engram_layers()
    previous = {i: (engram.record_gates, engram.last_gate) for i, engram in engrams.items()}
    sums = {i: {name: np.zeros(engram.n_branches) for name in ("all", *GATE_CLASSES)} for i, engram in engrams.items()}
    positions = dict.fromkeys(("all", *GATE_CLASSES), 0)
    try:
        for engram in engrams.values():
            engram.record_gates, engram.last_gate = True, None
        with _analysing(model):
            for inputs, targets in _windows(eval_tokens, seq_len, batch_size, max_positions):
                model(inputs.to(_device(model)))
                masks = gate_classes(inputs.numpy(), targets.numpy(), counts, min_count, tokenizer)
                masks["all"] = np.ones(inputs.shape, dtype=bool)
                for name, mask in masks.items():
                    positions[name] += int(mask.sum())
                for i, engram in engrams.items():
                    if engram.last_gate is None:
                        return {"skipped": f"the Engram module of layer {i} records no gate values"}
                    gate = engram.last_gate.double().cpu().numpy()  # (B, T, M)
                    for name, mask in masks.items():
                        sums[i][name] += gate[mask].sum(axis=0)  # (M,)
    finally:
        for i, engram in engrams.items():
            engram.record_gates, engram.last_gate = previous[i]

    def summary(branch_sums: np.ndarray, count: int) -> dict:
        if count == 0:
            return {"positions": 0, "mean_gate": None, "branch_means": None}
        means = branch_sums / count
        return {"positions": count, "mean_gate": float(means.mean()), "branch_means": means.tolist()}

    layers = {i: {name: summary(sums[i][name], positions[name]) for name in sums[i]} for i in engrams}
    return {"n": n, "min_count": min_count, "layers": layers}
