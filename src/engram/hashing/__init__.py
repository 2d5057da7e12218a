"""From raw token ids to table rows: tokenizer compression, prime table sizes, n-gram hashing."""

from engram.hashing.compression import CompressedTokenizer, build_normalizer, default_tokenizer_path
from engram.hashing.indexer import EngramIndexer
from engram.hashing.ngram import NgramHasher, layer_multipliers
from engram.hashing.primes import engram_table_sizes, is_prime, next_prime

__all__ = [
    "CompressedTokenizer",
    "EngramIndexer",
    "NgramHasher",
    "build_normalizer",
    "default_tokenizer_path",
    "engram_table_sizes",
    "is_prime",
    "layer_multipliers",
    "next_prime",
]
