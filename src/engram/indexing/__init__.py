"""From raw token ids to table rows: tokenizer compression, prime table sizes, n-gram hashing."""

from engram.indexing.compression import CompressedTokenizer, build_normalizer, default_tokenizer_path
from engram.indexing.indexer import EngramIndexer
from engram.indexing.ngram import NgramHasher, layer_multipliers
from engram.indexing.primes import engram_table_sizes, is_prime, next_prime

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
