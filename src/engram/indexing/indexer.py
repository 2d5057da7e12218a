"""From raw token ids to every Engram layer's row indices, in one call.

Row indices depend only on the input ids, so a data loader or prefetcher can compute them for all
layers as soon as a batch exists, long before the forward pass reaches an Engram layer.
"""

from __future__ import annotations

from typing import Any

import torch

from engram._checks import as_id_tensor, check_id_range, checks_values
from engram.config import EngramConfig
from engram.indexing.compression import CompressedTokenizer
from engram.indexing.ngram import NgramHasher
from engram.indexing.primes import engram_table_sizes


def engram_head_sizes(config: EngramConfig, layer_id: int) -> list[int]:
    """Rows of each head's table for ``layer_id``, in hash-output order: the one source of table shapes.

    The distinct primes of docs/definition.md ("Hashing"), or one row per head under
    ``addressing="constant"`` (docs/definition.md, "Ablation switches and controls"). The layer,
    the storage built before it and the parameter accounting all take their shapes from here.
    """
    if layer_id not in config.layer_ids:
        raise KeyError(f"layer {layer_id} has no Engram module; configured layer_ids are {config.layer_ids}")
    if config.addressing == "constant":
        return [1] * config.n_heads
    sizes = engram_table_sizes(
        config.layer_ids, config.max_ngram_size, config.n_head_per_ngram, config.engram_vocab_size
    )
    return [p for order in sizes[layer_id] for p in order]


class EngramIndexer:
    """Tokenizer compression followed by n-gram hashing for every configured layer.

    ``config.compress_tokens`` and ``config.addressing`` choose what is hashed and which rows are
    read (docs/definition.md, "Ablation switches and controls"); the defaults are the definition's.

    Args:
        config: the Engram configuration (hash parameters and raw ``pad_id``).
        tokenizer: a ``CompressedTokenizer``, or anything ``CompressedTokenizer`` accepts
            (``None`` = DeepSeek-V3). Without compression it still gives the raw vocabulary size.
        separator_id: optional raw id at which n-gram windows restart in packed sequences.
    """

    def __init__(self, config: EngramConfig, tokenizer: Any = None, separator_id: int | None = None):
        self.config = config
        self.compressor = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
        raw_vocab = self.compressor.raw_vocab_size
        for name, raw in (("pad_id", config.pad_id), ("separator_id", separator_id)):
            if raw is not None and not 0 <= raw < raw_vocab:
                raise ValueError(f"{name} {raw} is not a raw id of the tokenizer (which has {raw_vocab} ids)")
        if config.compress_tokens:
            table = self.compressor.lookup_table
            vocab, pad_id = len(self.compressor), int(table[config.pad_id])
            separator_id = None if separator_id is None else int(table[separator_id])
        else:  # the hash reads raw ids: V' is the raw vocabulary, which bounds the multipliers
            vocab, pad_id = raw_vocab, config.pad_id
        self.hasher = NgramHasher(
            layer_ids=config.layer_ids,
            max_ngram_size=config.max_ngram_size,
            n_head_per_ngram=config.n_head_per_ngram,
            engram_vocab_size=config.engram_vocab_size,
            compressed_vocab_size=vocab,
            pad_id=pad_id,
            seed=config.seed,
            separator_id=separator_id,
        )

    def check_raw_ids(
        self, input_ids: torch.Tensor, name: str = "input_ids", extremes: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Check raw ids for the indexer: integers in ``[0, raw vocabulary)``; return them as int64.

        One host read (none with the ``extremes`` a caller read already). Whatever passes gives
        canonical ids, and so hash ids, in range: nothing after this checks values again.
        """
        ids = as_id_tensor(input_ids, name)
        n_raw = self.compressor.raw_vocab_size
        hint = (
            f" of the tokenizer's {n_raw} raw ids; replace negative padding markers with the pad id"
            if self.config.compress_tokens
            else f" of the tokenizer's {n_raw} raw ids (compress_tokens=False)"
        )
        check_id_range(ids, 0, n_raw, name, hint, extremes)
        return ids

    def canonical(self, input_ids: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
        """The ids the hash reads for raw ids (B, T): canonical ids, or the raw ids without compression.

        ``check_ids=False``: the caller has checked the raw ids (``check_raw_ids``) already.
        """
        ids = self.check_raw_ids(input_ids) if checks_values(check_ids) else as_id_tensor(input_ids, "input_ids")
        return self.compressor(ids, check_ids=False) if self.config.compress_tokens else ids

    def __call__(self, input_ids: torch.Tensor, check_ids: bool = True) -> dict[int, torch.Tensor]:
        """Row indices of every layer for raw ids (B, T): ``{layer_id: (B, T, (N-1)*K) int64}``.

        The raw ids are checked once (a host read; ``check_ids=False`` skips it for callers that
        checked them), the canonical ids and hashes that follow from them are in range by construction.
        """
        canonical = self.canonical(input_ids, check_ids)
        return {lid: self._rows(canonical, lid) for lid in self.hasher.layer_ids}

    def hash_layer(self, input_ids: torch.Tensor, layer_id: int, check_ids: bool = True) -> torch.Tensor:
        """Row indices of one layer for raw ids (B, T)."""
        self._check_layer(layer_id)
        return self._rows(self.canonical(input_ids, check_ids), layer_id)

    def hash_step(
        self, input_ids: torch.Tensor, history: torch.Tensor | None = None, check_ids: bool = True
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Row indices of every layer for positions that continue a sequence (decoding).

        Args:
            input_ids: (B, t) raw ids of the new positions.
            history: (B, N-1) canonical ids of the positions before them, as returned by the previous
                call; ``None`` at the start of a sequence (pad id).
            check_ids: check the ids and the history (host reads); ``False`` for callers that have
                (``EngramLM`` decoding, whose history is its own).

        Returns:
            ``(hash_ids, history)``: ``{layer_id: (B, t, (N-1)*K)}`` equal to the last t positions of
            indexing the whole sequence, and the (B, N-1) history after the new positions.
        """
        canonical = self.canonical(input_ids, check_ids)
        if history is None:
            history = self.hasher.initial_history(canonical.shape[0], canonical.device)
        elif checks_values(check_ids):  # a caller's history (the hash checks its shape)
            history = self.hasher.check_ids(history, "history")
        hash_ids = {lid: self._rows(canonical, lid, history) for lid in self.hasher.layer_ids}
        return hash_ids, self.hasher.update_history(history, canonical, check_ids=False)

    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self.hasher.layer_ids:
            raise KeyError(f"layer {layer_id} has no Engram module; configured layer_ids are {self.hasher.layer_ids}")

    def _rows(self, canonical: torch.Tensor, layer_id: int, history: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) row of every head for canonical ids (B, T), by ``config.addressing``.

        ``history`` (B, N-1) precedes the ids when decoding; only n-gram addressing looks back. The
        ids were checked where they came in (``canonical``): nothing here reads their values.
        """
        addressing = self.config.addressing
        if addressing == "ngram":
            return self.hasher.hash(canonical, layer_id, history=history, check_ids=False)
        if addressing == "token":
            # Every token hashed as a sequence of its own, pads before it (docs/definition.md,
            # "Ablation switches and controls"): the same tables and primes, read by the unigram.
            batch, length = canonical.shape
            return self.hasher.hash(canonical.reshape(batch * length, 1), layer_id, check_ids=False).view(
                batch, length, -1
            )
        # Constant addressing: row 0 of every head's one-row table.
        self._check_layer(layer_id)
        canonical = as_id_tensor(canonical, "input_ids", ndim=2)
        return canonical.new_zeros(*canonical.shape, self.hasher.n_heads)
