"""Independent reference implementations of docs/definition.md, written for the tests and benchmarks.

They follow the text of the definition as literally as possible (NumPy, Python loops, trial
division, ``unicodedata``) and share no code with the library.
"""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np

# -- 2.1 tokenizer compression ------------------------------------------------------------------

# Unicode White_Space characters: what the Rust ``char::is_whitespace`` behind ``Strip`` removes.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000"
)


def reference_normalize(text: str) -> str:
    """NFKC, NFD, strip accents, lowercase, collapse whitespace, protect a lone space, strip."""
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Mn", "Mc", "Me"))
    text = text.lower()
    text = re.sub(r"[ \t\r\n]+", " ", text)
    if text == " ":
        text = "\ue000"
    text = text.strip(_WHITE_SPACE)
    return text.replace("\ue000", " ")


def reference_compression(decoded: list[str], raw_tokens: list[str]) -> np.ndarray:
    """Canonical id of every raw id, given each id's ``decode([id])`` and raw token string."""
    key_to_id: dict[str, int] = {}
    table = []
    for text, raw in zip(decoded, raw_tokens, strict=True):
        if "\ufffd" in text:
            key = raw
        else:
            norm = reference_normalize(text)
            key = norm if norm else text
        if key not in key_to_id:
            key_to_id[key] = len(key_to_id)
        table.append(key_to_id[key])
    return np.array(table, dtype=np.int64)


# -- 2.2 multipliers, primes, hashing -------------------------------------------------------------


def reference_is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def reference_table_sizes(layer_ids, max_ngram_size, n_head_per_ngram, engram_vocab_size):
    seen = set()
    sizes = {}
    for layer_id in layer_ids:
        orders = []
        for n in range(2, max_ngram_size + 1):
            start = engram_vocab_size[n - 2] - 1
            heads = []
            for _ in range(n_head_per_ngram):
                candidate = start + 1
                while not reference_is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                heads.append(candidate)
                start = candidate
            orders.append(heads)
        sizes[layer_id] = orders
    return sizes


def reference_multipliers(layer_id, max_ngram_size, compressed_vocab_size, seed):
    max_long = np.iinfo(np.int64).max
    half = max(1, (max_long // compressed_vocab_size) // 2)
    rng = np.random.default_rng(seed + 10007 * layer_id)
    r = rng.integers(low=0, high=half, size=(max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


def reference_hash(ids, layer_id, max_ngram_size, n_head_per_ngram, table_sizes, multipliers, pad_id):
    """(B, T) canonical ids -> (B, T, (N-1)*K) per-head indices, as the definition states it."""
    x = np.asarray(ids, dtype=np.int64)
    _, length = x.shape
    shifts = [x] + [
        np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :length]
        for k in range(1, max_ngram_size)
    ]
    heads = []
    for n in range(2, max_ngram_size + 1):
        mix = shifts[0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
        for prime in table_sizes[layer_id][n - 2]:
            heads.append(mix % prime)
    return np.stack(heads, axis=2)
