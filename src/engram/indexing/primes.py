"""Prime table sizes for the hash heads.

Every hash head owns a table whose size is a prime, and no two heads of a model share a prime
(docs/definition.md, "Hashing"). Bases reach tens of millions and models have dozens of heads, so the
primality test is a deterministic Miller-Rabin that is exact for all 64-bit integers, not trial
division.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Miller-Rabin with the first twelve primes as bases is exact for every n below this limit (the
# smallest strong pseudoprime to all of them), which covers all 64-bit integers.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_EXACT_BELOW = 318_665_857_834_031_151_167_461


def is_prime(n: int) -> bool:
    """Exact primality test for integers below 3.18e23 (all 64-bit values)."""
    if n >= _EXACT_BELOW:
        raise ValueError(f"is_prime is exact only below {_EXACT_BELOW}, got {n}")
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, exclude: Iterable[int] = ()) -> int:
    """The smallest prime strictly greater than ``start`` that is not in ``exclude``."""
    excluded = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
    candidate = start + 1
    while not is_prime(candidate) or candidate in excluded:
        candidate += 1
    return candidate


def engram_table_sizes(
    layer_ids: Sequence[int],
    max_ngram_size: int,
    n_head_per_ngram: int,
    engram_vocab_size: Sequence[int],
) -> dict[int, list[list[int]]]:
    """Prime table size of every head, per layer and n-gram order.

    Layers are visited in the given order, orders n = 2..N within a layer, heads within an order.
    Each head takes the smallest unused prime above the previous head's prime (the first head of
    an order starts its search at ``engram_vocab_size[n - 2] - 1``, so the base itself qualifies).

    Returns:
        ``{layer_id: [[p_{n=2,k=0}, ..., p_{n=2,k=K-1}], ..., [p_{n=N,k=0}, ...]]}``
    """
    seen: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for n in range(2, max_ngram_size + 1):
            start = engram_vocab_size[n - 2] - 1
            heads = []
            for _ in range(n_head_per_ngram):
                start = next_prime(start, seen)
                seen.add(start)
                heads.append(start)
            per_order.append(heads)
        sizes[layer_id] = per_order
    return sizes
