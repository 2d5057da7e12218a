"""Prime table sizes: the primality test, the distinct-prime search and the published example."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engram.indexing.primes import engram_table_sizes, is_prime, next_prime
from tests.reference import reference_table_sizes


def _sieve(limit: int) -> np.ndarray:
    flags = np.ones(limit, dtype=bool)
    flags[:2] = False
    for p in range(2, int(limit**0.5) + 1):
        if flags[p]:
            flags[p * p :: p] = False
    return flags


def test_is_prime_matches_sieve_below_200k():
    flags = _sieve(200_000)
    assert [n for n in range(200_000) if is_prime(n)] == np.flatnonzero(flags).tolist()


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (2**61 - 1, True),  # Mersenne prime
        (2**64 - 59, True),  # largest 64-bit prime
        (2**63 - 25, True),  # largest prime below 2^63
        (2**64 - 1, False),
        (561, False),  # Carmichael number
        (3_215_031_751, False),  # strong pseudoprime to bases 2, 3, 5, 7
        (3_825_123_056_546_413_051, False),  # strong pseudoprime to bases 2..23
        (1_000_000_007, True),
        (1_000_000_007 * 998_244_353, False),
    ],
)
def test_is_prime_on_hard_64_bit_cases(n, expected):
    assert is_prime(n) is expected


def test_is_prime_refuses_numbers_beyond_its_exact_range():
    # The smallest strong pseudoprime to every base 2..37: a fixed-base test would call it prime.
    with pytest.raises(ValueError, match="exact only below"):
        is_prime(318_665_857_834_031_151_167_461)


def test_next_prime_is_strictly_greater_and_skips_excluded():
    assert next_prime(646399) == 646403
    assert next_prime(646403) == 646411  # strictly greater
    assert next_prime(646399, exclude={646403}) == 646411
    assert next_prime(1) == 2


def test_published_worked_example():
    """docs/definition.md ("Hashing"): demo defaults (base 646,400, layers [1, 15], N=3, K=8)."""
    sizes = engram_table_sizes([1, 15], 3, 8, [646400, 646400])
    assert sizes[1] == [
        [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523],
        [646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619],
    ]
    # Layer 15 continues the search above the primes that layer 1 took.
    assert min(sizes[15][0]) > 646619


@pytest.mark.parametrize("seed", range(6))
def test_table_sizes_match_reference_and_are_distinct(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(1, 4))
    layer_ids = [int(v) for v in rng.choice(40, size=n_layers, replace=False)]
    max_ngram = int(rng.integers(2, 5))
    heads = int(rng.integers(1, 6))
    bases = [int(v) for v in rng.integers(2, 30_000, size=max_ngram - 1)]
    sizes = engram_table_sizes(layer_ids, max_ngram, heads, bases)
    assert sizes == reference_table_sizes(layer_ids, max_ngram, heads, bases)
    flat = [p for orders in sizes.values() for heads_ in orders for p in heads_]
    assert len(flat) == len(set(flat)) == n_layers * (max_ngram - 1) * heads


def test_large_bases_and_many_heads_stay_exact():
    """Bases in the tens of millions with dozens of heads: each head's prime is the next prime."""
    sizes = engram_table_sizes([0, 1], 4, 12, [50_000_000, 60_000_000, 50_000_000])
    flat = [p for orders in sizes.values() for heads in orders for p in heads]
    assert len(set(flat)) == len(flat) == 72
    assert all(is_prime(p) for p in flat)
    # Order 4 of layer 0 (base 50M) and order 2 of layer 1 (same base) must not collide:
    # layer 1 order 2 continues above every prime layer 0 took near 50M.
    assert min(sizes[1][0]) > max(sizes[0][0])
    # Consecutive heads of one order are consecutive primes (no prime skipped between them).
    heads = sizes[0][1]
    for lo, hi in itertools.pairwise(heads):
        assert not any(is_prime(c) for c in range(lo + 1, hi))
