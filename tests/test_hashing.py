"""N-gram hashing: value for value against the NumPy reference of docs/definition.md ("Hashing")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engram import EngramConfig, EngramIndexer, NgramHasher
from engram.indexing.ngram import layer_multipliers
from tests.reference import reference_hash, reference_multipliers, reference_table_sizes


def _random_config(rng: np.random.Generator) -> dict:
    n_layers = int(rng.integers(1, 4))
    max_ngram = int(rng.integers(2, 6))
    # Small bases (tiny primes, many wrap-arounds) and large ones (tens of millions).
    large = bool(rng.integers(0, 2))
    high = 40_000_000 if large else 5_000
    bases = [int(v) for v in rng.integers(2, high, size=max_ngram - 1)]
    return dict(
        layer_ids=[int(v) for v in rng.choice(64, size=n_layers, replace=False)],
        max_ngram_size=max_ngram,
        n_head_per_ngram=int(rng.integers(1, 7)),
        engram_vocab_size=bases,
        compressed_vocab_size=int(rng.choice([1, 2, 97, 50_257, 98_627, 2**20 + 3])),
        seed=int(rng.integers(0, 2**31)),
    )


def _reference_for(cfg: dict, ids: np.ndarray, layer_id: int, pad_id: int) -> np.ndarray:
    sizes = (
        reference_table_sizes(
            cfg["layer_ids"], cfg["max_ngram_size"], cfg["n_head_per_ngram"], cfg["engram_vocab_size"]
        )
        if max(cfg["engram_vocab_size"]) < 10**6
        else None
    )
    hasher_sizes = NgramHasher(pad_id=pad_id, **cfg).table_sizes
    if sizes is not None:  # trial division is too slow for the large bases; they are checked in test_primes
        assert sizes == hasher_sizes
    mult = reference_multipliers(layer_id, cfg["max_ngram_size"], cfg["compressed_vocab_size"], cfg["seed"])
    return reference_hash(ids, layer_id, cfg["max_ngram_size"], cfg["n_head_per_ngram"], hasher_sizes, mult, pad_id)


@pytest.mark.parametrize("seed", range(24))
def test_hash_equals_reference_on_random_configurations(seed):
    rng = np.random.default_rng(1000 + seed)
    cfg = _random_config(rng)
    vocab = cfg["compressed_vocab_size"]
    pad_id = int(rng.integers(0, vocab))
    hasher = NgramHasher(pad_id=pad_id, **cfg)
    batch, length = int(rng.integers(1, 5)), int(rng.integers(1, 70))
    ids = rng.integers(0, vocab, size=(batch, length))
    if seed % 4 == 0:
        ids[:, : length // 2] = vocab - 1  # the largest products the multiplier bound allows
    for layer_id in cfg["layer_ids"]:
        got = hasher.hash(torch.from_numpy(ids), layer_id)
        assert got.dtype == torch.int64
        assert got.shape == (batch, length, hasher.n_heads)
        np.testing.assert_array_equal(got.numpy(), _reference_for(cfg, ids, layer_id, pad_id))


def test_multipliers_are_the_reference_draw_and_keep_products_in_int64():
    for layer_id, vocab, seed in [(1, 98_627, 0), (15, 98_627, 0), (0, 1, 7), (3, 2**31, 123)]:
        mult = layer_multipliers(layer_id, 4, vocab, seed)
        assert mult == reference_multipliers(layer_id, 4, vocab, seed).tolist()
        assert all(m % 2 == 1 for m in mult)
        assert all((vocab - 1) * m <= np.iinfo(np.int64).max for m in mult)


def test_deepseek_sentence_matches_reference(deepseek):
    """The demo configuration on the real tokenizer, raw ids through compression."""
    cfg = EngramConfig()
    indexer = EngramIndexer(cfg, deepseek)
    raw = torch.tensor([deepseek.encode("Only Alexander the Great could tame the horse Bucephalus.")])
    canonical = deepseek(raw).numpy()
    pad = int(deepseek.lookup_table[cfg.pad_id])
    hashes = indexer(raw)
    sizes = reference_table_sizes(cfg.layer_ids, 3, 8, cfg.engram_vocab_size)
    for layer_id in cfg.layer_ids:
        mult = reference_multipliers(layer_id, 3, len(deepseek), 0)
        expected = reference_hash(canonical, layer_id, 3, 8, sizes, mult, pad)
        np.testing.assert_array_equal(hashes[layer_id].numpy(), expected)
    assert indexer.hasher.multipliers(1) == reference_multipliers(1, 3, 98_627, 0).tolist()


def test_int32_ids_give_the_same_hashes():
    hasher = NgramHasher([2], 3, 4, [1000, 2000], 5000, pad_id=0)
    ids = torch.randint(0, 5000, (3, 40))
    assert torch.equal(hasher.hash(ids.int(), 2), hasher.hash(ids, 2))


@pytest.mark.parametrize("max_ngram", [2, 3, 5])
def test_incremental_hashing_equals_full_hashing(max_ngram):
    gen = torch.Generator().manual_seed(max_ngram)
    hasher = NgramHasher([0, 7], max_ngram, 3, [3001] * (max_ngram - 1), 1234, pad_id=5, seed=9)
    ids = torch.randint(0, 1234, (4, 37), generator=gen)
    cuts = [0, 1, 2, 5, 6, 20, 37]  # steps of 1, 1, 3, 1, 14, 17 tokens
    for layer_id in hasher.layer_ids:
        full = hasher.hash(ids, layer_id)
        history = hasher.initial_history(4)
        pieces = []
        for start, stop in itertools.pairwise(cuts):
            step, history = hasher.hash_incremental(ids[:, start:stop], history, layer_id)
            pieces.append(step)
            assert torch.equal(history, torch.cat([hasher.initial_history(4), ids[:, :stop]], 1)[:, -(max_ngram - 1) :])
        assert torch.equal(torch.cat(pieces, dim=1), full)


def test_separator_restarts_ngram_windows():
    """A packed sequence hashes like its documents hashed one by one (each starting at its separator)."""
    sep, pad = 3, 0
    hasher = NgramHasher([1], 4, 2, [500, 600, 700], 50, pad_id=pad, separator_id=sep)
    plain = NgramHasher([1], 4, 2, [500, 600, 700], 50, pad_id=pad)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(3):
        docs = [torch.randint(4, 50, (int(n),), generator=gen) for n in torch.randint(1, 6, (5,), generator=gen)]
        packed = torch.cat([torch.cat([torch.tensor([sep]), d]) for d in docs])
        expected = torch.cat([plain.hash(torch.cat([torch.tensor([sep]), d])[None], 1)[0] for d in docs])
        rows.append((packed, expected))
    length = min(len(p) for p, _ in rows)
    packed = torch.stack([p[:length] for p, _ in rows])
    expected = torch.stack([e[:length] for _, e in rows])
    assert torch.equal(hasher.hash(packed, 1), expected)
    # Without the reset, windows reach across documents.
    assert not torch.equal(plain.hash(packed, 1), expected)
    # Incremental decoding respects the reset too.
    history, pieces = hasher.initial_history(3), []
    for start in range(0, length, 4):
        step, history = hasher.hash_incremental(packed[:, start : start + 4], history, 1)
        pieces.append(step)
    assert torch.equal(torch.cat(pieces, 1), expected)


def test_short_sequences_read_pad_everywhere_before_the_start():
    hasher = NgramHasher([0], 5, 2, [101, 103, 107, 109], 40, pad_id=7)
    ids = torch.tensor([[11, 12]])
    assert torch.equal(hasher.hash(ids, 0), hasher.hash(torch.tensor([[7, 7, 7, 7, 11, 12]]), 0)[:, 4:])


def test_hash_ranges_and_order_major_layout():
    hasher = NgramHasher([4], 3, 5, [1000, 3000], 777, pad_id=1)
    out = hasher.hash(torch.randint(0, 777, (2, 300)), 4)
    sizes = torch.tensor(hasher.head_sizes(4))
    assert hasher.head_sizes(4) == hasher.table_sizes[4][0] + hasher.table_sizes[4][1]
    assert bool((out >= 0).all()) and bool((out < sizes).all())
    assert int(out[..., :5].max()) < 1100 < int(out[..., 5:].max())  # order 2 primes ~1000, order 3 ~3000


# -- errors ---------------------------------------------------------------------------------------

_OK = dict(
    layer_ids=[1],
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=[100, 100],
    compressed_vocab_size=50,
    pad_id=0,
)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(layer_ids=[]), "layer_ids is empty"),
        (dict(layer_ids=[1, 1]), "distinct"),
        (dict(layer_ids=[-1]), "non-negative"),
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size must be an integer >= 2"),
        (dict(n_head_per_ngram=0), "n_head_per_ngram"),
        (dict(engram_vocab_size=[100]), "one base size per n-gram order"),
        (dict(engram_vocab_size=[100, 1]), "integers >= 2"),
        (dict(pad_id=50), "pad_id must be a canonical id"),
        (dict(compressed_vocab_size=0), "compressed_vocab_size"),
    ],
)
def test_bad_configuration_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        NgramHasher(**{**_OK, **override})


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.tensor([[1, 2, 50]]), ValueError, "id 50, outside the valid range \\[0, 50\\)"),
        (torch.tensor([[1, -1, 2]]), ValueError, "id -1, outside"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer ids"),
        (torch.tensor([1, 2, 3]), ValueError, "2 dimensions"),
        ([[1, 2]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_ids_are_refused(ids, error, message):
    with pytest.raises(error, match=message):
        NgramHasher(**_OK).hash(ids, 1)


def test_unknown_layer_and_bad_history_are_refused():
    hasher = NgramHasher(**_OK)
    with pytest.raises(KeyError, match="layer 2 has no Engram module"):
        hasher.hash(torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="history must have shape"):
        hasher.hash_incremental(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 1)


def test_compiled_kernel_equals_eager_and_reference():
    """compile=True bakes the primes into a fused kernel; the result must not change by one bit."""
    args = ([3, 9], 3, 4, [70_001, 90_001], 98_627)
    eager = NgramHasher(*args, pad_id=2, seed=5)
    compiled = NgramHasher(*args, pad_id=2, seed=5, compile=True)
    packed_eager = NgramHasher(*args, pad_id=2, seed=5, separator_id=0)
    packed_compiled = NgramHasher(*args, pad_id=2, seed=5, separator_id=0, compile=True)
    gen = torch.Generator().manual_seed(3)
    for shape in [(4, 64), (1, 5)]:
        ids = torch.randint(0, 98_627, shape, generator=gen)
        ids[:, ::7] = 0  # separators
        ids[0, -2:] = 98_626
        for layer_id in (3, 9):
            assert torch.equal(compiled.hash(ids, layer_id), eager.hash(ids, layer_id))
            assert torch.equal(packed_compiled.hash(ids, layer_id), packed_eager.hash(ids, layer_id))
    mult = reference_multipliers(9, 3, 98_627, 5)
    expected = reference_hash(ids.numpy(), 9, 3, 4, eager.table_sizes, mult, 2)
    np.testing.assert_array_equal(compiled.hash(ids, 9).numpy(), expected)


def test_compiled_kernel_names_a_missing_compiler_and_only_then():
    import torch._inductor.config as inductor_config

    from engram.indexing.ngram import _compiler_missing

    hasher = NgramHasher([3], 3, 4, [70_001, 90_001], 98_627, pad_id=2, seed=5, compile=True)
    no_compiler = inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True})
    with no_compiler, pytest.raises(RuntimeError, match=r"needs a working C\+\+ compiler\); use compile=False"):
        hasher.hash(torch.zeros(1, 4, dtype=torch.long), 3)
    # Any other failure is not blamed on the compiler.
    try:
        raise RuntimeError("out of memory") from ValueError("shape")
    except RuntimeError as error:
        assert not _compiler_missing(error)
