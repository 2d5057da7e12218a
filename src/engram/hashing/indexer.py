"""From raw token ids to every Engram layer's row indices, in one call.

Row indices depend only on the input ids, so a data loader or prefetcher can compute them for all
layers as soon as a batch exists, long before the forward pass reaches an Engram layer.
"""

from __future__ import annotations

from typing import Any

import torch

from engram.config import EngramConfig
from engram.hashing.compression import CompressedTokenizer
from engram.hashing.ngram import NgramHasher


class EngramIndexer:
    """Tokenizer compression followed by n-gram hashing for every configured layer.

    Args:
        config: the Engram configuration (hash parameters and raw ``pad_id``).
        tokenizer: a ``CompressedTokenizer``, or anything ``CompressedTokenizer`` accepts
            (``None`` = DeepSeek-V3).
        separator_id: optional raw id at which n-gram windows restart in packed sequences.
    """

    def __init__(self, config: EngramConfig, tokenizer: Any = None, separator_id: int | None = None):
        self.config = config
        self.compressor = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
        raw_vocab = self.compressor.raw_vocab_size
        for name, raw in (("pad_id", config.pad_id), ("separator_id", separator_id)):
            if raw is not None and not 0 <= raw < raw_vocab:
                raise ValueError(f"{name} {raw} is not a raw id of the tokenizer (which has {raw_vocab} ids)")
        self.hasher = NgramHasher(
            layer_ids=config.layer_ids,
            max_ngram_size=config.max_ngram_size,
            n_head_per_ngram=config.n_head_per_ngram,
            engram_vocab_size=config.engram_vocab_size,
            compressed_vocab_size=len(self.compressor),
            pad_id=int(self.compressor.lookup_table[config.pad_id]),
            seed=config.seed,
            separator_id=None if separator_id is None else int(self.compressor.lookup_table[separator_id]),
        )

    def __call__(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Row indices of every layer for raw ids (B, T): ``{layer_id: (B, T, (N-1)*K) int64}``."""
        canonical = self.compressor(input_ids)
        return {lid: self.hasher.hash(canonical, lid) for lid in self.hasher.layer_ids}

    def hash_layer(self, input_ids: torch.Tensor, layer_id: int) -> torch.Tensor:
        """Row indices of one layer for raw ids (B, T)."""
        return self.hasher.hash(self.compressor(input_ids), layer_id)

    def hash_step(
        self, input_ids: torch.Tensor, history: torch.Tensor | None = None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Row indices of every layer for positions that continue a sequence (decoding).

        Args:
            input_ids: (B, t) raw ids of the new positions.
            history: (B, N-1) canonical ids of the positions before them, as returned by the previous
                call; ``None`` at the start of a sequence (pad id).

        Returns:
            ``(hash_ids, history)``: ``{layer_id: (B, t, (N-1)*K)}`` equal to the last t positions of
            indexing the whole sequence, and the (B, N-1) history after the new positions.
        """
        canonical = self.compressor(input_ids)
        if history is None:
            history = self.hasher.initial_history(canonical.shape[0], canonical.device)
        hash_ids = {lid: self.hasher.hash(canonical, lid, history=history) for lid in self.hasher.layer_ids}
        return hash_ids, self.hasher.update_history(history, canonical)
