"""``EngramHFConfig``: a transformers ``PretrainedConfig`` that carries an ``EngramLM``'s ``ModelConfig``.

Everything the hashing needs is in ``config.json``: the ``ModelConfig`` (with its ``EngramConfig``: layer
ids, n-gram size, heads, seed, base table sizes, pad id, the switches), the prime table sizes derived
from it (checked on load, so a change of the derivation cannot pass silently) and a description of the
tokenizer compression (raw and canonical vocabulary sizes, the SHA-256 of the lookup table, which the
weights file holds, and the tokenizer's fingerprint). ``engram_storage`` records the tier the tables
were saved from (``engram.hf.tables``), the default tier of ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from transformers import PretrainedConfig

from engram.indexing.compression import CompressedTokenizer
from engram.indexing.indexer import engram_head_sizes
from engram.model.config import ModelConfig
from engram.storage.config import StorageConfig


def table_sha256(lookup_table: np.ndarray) -> str:
    """SHA-256 of a compression lookup table, as little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(lookup_table, dtype="<i8").tobytes()).hexdigest()


def describe_compression(compressor: CompressedTokenizer) -> dict[str, Any]:
    """What ``config.json`` records of a compressor (its table itself goes into the weights)."""
    return {
        "raw_vocab_size": compressor.raw_vocab_size,
        "num_canonical": len(compressor),
        "table_sha256": table_sha256(compressor.lookup_table),
        "tokenizer_fingerprint": compressor.fingerprint,
    }


class EngramHFConfig(PretrainedConfig):
    """The configuration of an ``EngramForCausalLM`` (``model_type="engram"``).

    Args:
        engram_model: ``ModelConfig.to_dict()`` of the wrapped decoder (validated here).
        compression: ``describe_compression`` of the indexer's tokenizer; ``None`` for models
            without Engram layers.
        engram_table_sizes: ``{layer: [rows of each head's table]}``; derived from ``engram_model``
            when omitted, checked against it when given (a saved config).
        engram_storage: ``StorageConfig.to_dict()`` of the tier the tables were saved from (its
            ``directory`` None: disk tables are saved inside the folder); None: the device tier.
        include_aux_loss: with ``labels``, add ``EngramLM``'s MoE balance loss (already weighted by
            ``moe.aux_loss_weight``; there is none when that is 0) to the loss, as engram's ``Trainer``
            does; the output's ``aux_loss`` holds it either way.
        **kwargs: ``PretrainedConfig``'s own (the standard names below are derived and overwritten).

    The standard names transformers reads (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``max_position_embeddings``, ``tie_word_embeddings``) mirror the
    ``ModelConfig``; ``model_config`` gives the ``ModelConfig`` itself.
    """

    model_type = "engram"

    def __init__(
        self,
        engram_model: dict[str, Any] | None = None,
        compression: dict[str, Any] | None = None,
        engram_table_sizes: dict[str, list[int]] | None = None,
        engram_storage: dict[str, Any] | None = None,
        include_aux_loss: bool = True,
        **kwargs: Any,
    ):
        model = None if engram_model is None else ModelConfig.from_dict(dict(engram_model))
        if model is not None:
            kwargs["tie_word_embeddings"] = model.tie_embeddings
        super().__init__(**kwargs)
        self.engram_model = None if model is None else model.to_dict()
        self.compression = None if compression is None else dict(compression)
        self.engram_table_sizes = None
        self.include_aux_loss = bool(include_aux_loss)
        # validated now, so that a damaged config.json is refused before any weight is read
        self.engram_storage = None
        if engram_storage is not None:
            self.engram_storage = StorageConfig.from_dict(dict(engram_storage)).to_dict()
        if model is None:
            return
        self.vocab_size = model.input_vocab_size or model.vocab_size  # the logits are over tokenizer ids
        self.hidden_size = model.d_model
        self.num_hidden_layers = model.n_layers
        self.num_attention_heads = model.n_heads
        self.max_position_embeddings = model.max_seq_len
        self.tie_word_embeddings = model.tie_embeddings
        if model.engram is None:
            return
        if self.compression is None:
            raise ValueError("a model with Engram layers needs `compression` (describe_compression of its tokenizer)")
        sizes = {str(layer): engram_head_sizes(model.engram, layer) for layer in model.engram.layer_ids}
        if engram_table_sizes is not None and {str(k): list(v) for k, v in engram_table_sizes.items()} != sizes:
            raise ValueError(
                f"engram_table_sizes {engram_table_sizes} differ from the sizes this engram derives from the "
                f"EngramConfig ({sizes}): the weights were written by an engram that hashes differently"
            )
        self.engram_table_sizes = sizes

    @property
    def model_config(self) -> ModelConfig:
        """The wrapped decoder's ``ModelConfig``."""
        if self.engram_model is None:
            raise ValueError("this EngramHFConfig holds no model (engram_model is None)")
        return ModelConfig.from_dict(dict(self.engram_model))

    @property
    def saved_storage(self) -> StorageConfig:
        """The ``StorageConfig`` of the tier the tables were saved from (the device tier if none is recorded)."""
        return StorageConfig() if self.engram_storage is None else StorageConfig.from_dict(dict(self.engram_storage))

    @classmethod
    def from_engram(cls, config: ModelConfig, compressor: CompressedTokenizer | None = None) -> EngramHFConfig:
        """The config of a decoder of ``config`` whose Engram layers hash with ``compressor``'s compression."""
        if config.engram is not None and compressor is None:
            raise ValueError("a model with Engram layers needs the compressor its indexer uses")
        compression = None if config.engram is None else describe_compression(compressor)
        return cls(engram_model=config.to_dict(), compression=compression)
