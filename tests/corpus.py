"""Real text for training tests: Shakespeare's sonnets (public domain) and a BPE tokenizer trained on them.

A 1,024-id byte-level BPE keeps the LM head small enough for fast CPU tests while every component
(tokenizer, compression, hashing) runs for real.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"


@lru_cache(maxsize=1)
def sonnets_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([SONNETS.read_text()], trainer)
    return tokenizer


@lru_cache(maxsize=1)
def sonnets_tokens() -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token ids: sonnets 1-140 and 141-154 (split by document, not inside one)."""
    text = SONNETS.read_text()
    cut = text.index("\nCXLI\n")
    encode = sonnets_tokenizer().encode
    return (np.array(encode(text[:cut]).ids, dtype=np.int32), np.array(encode(text[cut:]).ids, dtype=np.int32))
