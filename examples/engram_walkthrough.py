"""The toy Engram walkthrough that introductory articles use, set side by side with the real definition.

Introductory articles about Engram walk through a toy version of its lookup:

    V = 1000 token ids, "compressed" by id % (V // 2) = id % 500
    an n-gram (g_0, ..., g_{n-1}) is hashed by head h of 4 heads as
        (g_0*1 XOR g_1*3 XOR ... XOR g_i*(2i+1) ... XOR h*10007) mod 5003
    every (order, head) owns a table of 5003 rows of 32 dims
    the lookup over orders 2 and 3 concatenates 2 x 4 rows of 32 dims into one (256,) vector

Exactly what the toy computes here (the facts it must reproduce: for the ids (42, 108, 256, 512) the
2-gram hashes to 292 for head 0, and the lookup returns a (256,) vector):

- compression first: (42, 108, 256, 512) -> (42, 108, 256, 12);
- the n-grams are the suffix n-grams of the last position: the 2-gram is (256, 12), the 3-gram
  (108, 256, 12), written oldest token first;
- term i of the n-gram (counted from 0, oldest first) is multiplied by 2i+1, the terms are XORed,
  the head term h*10007 is XORed into that mix, and only then is the result taken modulo 5003:
      head 0: (256*1 XOR 12*3 XOR 0) mod 5003 = (256 XOR 36) mod 5003 = 292.
  The head term of head 0 is 0, so 292 alone does not say where it goes; it must go before the
  modulo, since XORed in after it (10007 > 5003) it would send heads 1-3 outside their tables.
  The other readings of the description (another 2-gram of the four ids, the newest token first,
  multipliers counted from i = 1, no compression) all miss 292; section 1 prints them.

Then the real thing, as this library implements it (docs/definition.md), runs on the same four ids
and on a real sentence with DeepSeek-V3's tokenizer, and a side-by-side list shows what the toy
leaves out. Everything printed is computed when the script runs; it takes a few seconds on a CPU.

Run: python examples/engram_walkthrough.py [--text "your sentence"]
"""

from __future__ import annotations

import argparse
from functools import reduce

import numpy as np
import torch

from engram import CompressedTokenizer, Engram, EngramConfig, EngramIndexer

# --- the toy, exactly as described above -------------------------------------------------------
TOY_VOCAB = 1000
TOY_IDS = (42, 108, 256, 512)
TOY_TABLE_ROWS = 5003
TOY_HEAD_SEED = 10007
TOY_HEADS = 4
TOY_HEAD_DIM = 32
TOY_ORDERS = (2, 3)


def toy_compress(token_id: int) -> int:
    """The toy's "tokenizer compression": fold the vocabulary in half by a modulo."""
    return token_id % (TOY_VOCAB // 2)


def toy_mix(ngram: tuple[int, ...]) -> int:
    """XOR of g_i * (2i+1) over the n-gram, oldest token first (i from 0): multipliers 1, 3, 5, ..."""
    return reduce(lambda acc, term: acc ^ term, (g * (2 * i + 1) for i, g in enumerate(ngram)), 0)


def toy_hash(ngram: tuple[int, ...], head: int) -> int:
    """Row of ``head`` for ``ngram``: the head term is XORed into the mix, then the modulo."""
    return (toy_mix(ngram) ^ (head * TOY_HEAD_SEED)) % TOY_TABLE_ROWS


def toy_lookup(ids: tuple[int, ...], tables: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """The toy memory vector of the last position: rows of every (order, head), concatenated."""
    compressed = tuple(toy_compress(i) for i in ids)
    rows = [tables[n, h][toy_hash(compressed[-n:], h)] for n in TOY_ORDERS for h in range(TOY_HEADS)]
    return np.concatenate(rows)


def show_toy() -> None:
    print("== 1. The toy walkthrough ==")
    compressed = tuple(toy_compress(i) for i in TOY_IDS)
    print(f"vocabulary V = {TOY_VOCAB}; compression: id % (V // 2) = id % {TOY_VOCAB // 2}")
    print(f"ids          {TOY_IDS}")
    print(f"compressed   {compressed}")
    bigram = compressed[-2:]
    print(
        f"hash(ngram, head) = (g_0*1 XOR g_1*3 XOR g_2*5 ... XOR head*{TOY_HEAD_SEED}) mod {TOY_TABLE_ROWS}, "
        "oldest token first"
    )
    print(
        f"2-gram {bigram}, head 0: ({bigram[0]}*1 XOR {bigram[1]}*3 XOR 0*{TOY_HEAD_SEED}) mod {TOY_TABLE_ROWS} "
        f"= ({bigram[0]} XOR {bigram[1] * 3}) mod {TOY_TABLE_ROWS} = {toy_hash(bigram, 0)}"
    )
    for n in TOY_ORDERS:
        gram = compressed[-n:]
        print(
            f"  {n}-gram {gram!s:<16} rows of heads 0-{TOY_HEADS - 1}: {[toy_hash(gram, h) for h in range(TOY_HEADS)]}"
        )

    rng = np.random.default_rng(0)
    tables = {
        (n, h): rng.standard_normal((TOY_TABLE_ROWS, TOY_HEAD_DIM)).astype(np.float32)
        for n in TOY_ORDERS
        for h in range(TOY_HEADS)
    }
    vector = toy_lookup(TOY_IDS, tables)
    print(
        f"lookup over orders {TOY_ORDERS[0]}-{TOY_ORDERS[-1]}: {len(TOY_ORDERS)} orders x {TOY_HEADS} heads x "
        f"{TOY_HEAD_DIM} dims (tables of {TOY_TABLE_ROWS} x {TOY_HEAD_DIM}) -> vector of shape {vector.shape}"
    )

    # How 292 pins the toy down: the other readings of the description give other rows.
    print("other readings of the description, head 0 (only the one above gives 292):")
    readings = {
        "2-gram at positions 0-1, (42, 108)": toy_mix(compressed[0:2]),
        "2-gram at positions 1-2, (108, 256)": toy_mix(compressed[1:3]),
        "newest token first, 12*1 XOR 256*3": toy_mix(bigram[::-1]),
        "multipliers 2i+1 from i = 1, 256*3 XOR 12*5": bigram[0] * 3 ^ bigram[1] * 5,
        "no compression, (256, 512)": toy_mix(TOY_IDS[-2:]),
    }
    for what, mix in readings.items():
        print(f"  {what:<46} -> {mix % TOY_TABLE_ROWS}")
    after = (toy_mix(bigram) % TOY_TABLE_ROWS) ^ (1 * TOY_HEAD_SEED)
    print(f"  head term after the modulo, head 1             -> {after} (outside a {TOY_TABLE_ROWS}-row table)")
    print()


# --- the real definition -----------------------------------------------------------------------
def show_real_on_toy_ids(ct: CompressedTokenizer, indexer: EngramIndexer, layer_id: int) -> None:
    hasher = indexer.hasher
    print("== 2. The real definition on the same ids (DeepSeek-V3, the demo configuration) ==")
    print(f"as DeepSeek-V3 ids, {TOY_IDS} are the tokens {[ct.decode([i]) for i in TOY_IDS]}")
    print("  (U+FFFD marks partial UTF-8 byte tokens: the toy ids are numbers, not text)")
    canonical = ct(list(TOY_IDS)).tolist()
    print(f"canonical ids  {tuple(canonical)}   (the compression table, not a modulo)")
    m = hasher.multipliers(layer_id)
    primes = hasher.table_sizes[layer_id]
    rows = indexer.hash_layer(torch.tensor([TOY_IDS]), layer_id)
    # The 2-gram at the last position, by hand: m_0 multiplies the current token x[t], m_1 x[t-1].
    mix = canonical[-1] * m[0] ^ canonical[-2] * m[1]
    assert mix % primes[0][0] == rows[0, -1, 0].item()
    print(f"layer {layer_id} multipliers m = {m}")
    print(
        f"2-gram, head 0: (x[t]*m_0 XOR x[t-1]*m_1) mod p = ({canonical[-1]}*{m[0]} XOR {canonical[-2]}*{m[1]}) "
        f"mod {primes[0][0]} = {mix % primes[0][0]}"
    )
    print(f"rows of the last position, 2-grams: {rows[0, -1, : hasher.n_head_per_ngram].tolist()}")
    print(f"                           3-grams: {rows[0, -1, hasher.n_head_per_ngram :].tolist()}")
    print(f"hash ids of the 4 positions: {tuple(rows.shape)}   (B, T, (N-1)*K)")
    print()


def show_real_pipeline(ct: CompressedTokenizer, config: EngramConfig, indexer: EngramIndexer, text: str) -> None:
    hasher = indexer.hasher
    layer_id = config.layer_ids[0]
    raw = ct.encode(text)
    if not raw:
        raise SystemExit("--text produced no tokens; give a non-empty sentence")
    canonical = ct(raw).tolist()
    print(f"== 3. The real pipeline on real text: {text!r} ==")
    print(
        f"compression: {ct.raw_vocab_size:,} raw ids -> {len(ct):,} canonical ids "
        f"({100 * (1 - len(ct) / ct.raw_vocab_size):.1f}% fewer); e.g. "
        + ", ".join(f"{w!r} -> {ct(ct.encode(w)).tolist()}" for w in ("Great", " great", " GREAT"))
    )
    print(f"{'pos':>3}  {'token':<14} {'raw id':>7} {'canonical':>9}")
    for pos, (tid, cid) in enumerate(zip(raw, canonical, strict=True)):
        print(f"{pos:>3}  {ct.decode([tid])!r:<14} {tid:>7} {cid:>9}")
    print(
        f"NgramHasher (demo defaults): layer_ids {config.layer_ids}, N = {config.max_ngram_size}, "
        f"K = {config.n_head_per_ngram}, base sizes {config.engram_vocab_size}, seed {config.seed}, "
        f"pad id {config.pad_id} (raw) -> {hasher.pad_id} (canonical)"
    )
    for lid in config.layer_ids:
        print(f"layer {lid} multipliers: {hasher.multipliers(lid)}")
        for n, primes in enumerate(hasher.table_sizes[lid], start=2):
            print(f"layer {lid} {n}-gram primes: {primes}")
    input_ids = torch.tensor([raw])
    hash_ids = indexer(input_ids)
    print(f"hash ids: {{layer: shape}} = { {lid: tuple(h.shape) for lid, h in hash_ids.items()} }")
    print(
        f"position 0 has rows too (its 2-gram reads the pad id before the start): "
        f"{hash_ids[layer_id][0, 0, : config.n_head_per_ngram].tolist()}"
    )

    # The demo-size layer holds a 662M-parameter table; on the meta device it has shapes and no memory.
    hidden_size, branches = 1024, 4
    with torch.device("meta"):
        layer = Engram(config, layer_id, hidden_size=hidden_size, n_branches=branches)
    hidden = torch.empty(1, len(raw), branches, hidden_size, device="meta")
    out = layer(hidden, hash_ids=hash_ids[layer_id].to("meta"))
    print(
        f"Engram layer {layer_id} (hidden {hidden_size}, {branches} branches, table {layer.table.num_rows:,} x "
        f"{layer.table.dim}): memory e per position {config.n_heads} heads x {config.head_dim} = "
        f"{config.memory_dim} dims; output {tuple(out.shape)} (B, T, M, d), added before attention"
    )
    print()


SIDE_BY_SIDE = [
    (
        "compression",
        "id % (V // 2): unrelated ids collide (12 and 512), case variants do not",
        "normalise each token's text (NFKC, NFD, accents, lowercase, whitespace); first-seen canonical ids",
    ),
    (
        "multipliers",
        "2i+1 = 1, 3, 5, the same in every layer",
        "seeded random odd 2r+1 per layer (seed + 10007*layer), r < (2^63-1)//V'//2 so x*m is exact int64",
    ),
    (
        "term order",
        "multiplier 1 on the oldest token of the n-gram",
        "m_0 on the current token x[t], m_k on x[t-k]",
    ),
    (
        "table sizes",
        "one size, 5003, for every order and head",
        "a distinct prime per (layer, order, head), the next primes above the base size",
    ),
    (
        "heads",
        "head*10007 XORed into the mix",
        "one mix per order shared by its heads; head k takes it modulo its own prime",
    ),
    (
        "sequence start",
        "hashes one complete n-gram",
        "every position gets every order: positions before the start read the canonical pad id",
    ),
    (
        "tables",
        "a separate array per (order, head)",
        "one table per layer, heads at offsets (cumulative sums of the primes), behind TableStorage",
    ),
    (
        "gating",
        "none: the looked-up vector is the output",
        "alpha = sigmoid(signed sqrt(s)) (the paper: sigmoid(s)), s = <RMSNorm(h), RMSNorm(W_K e)> / sqrt(d); "
        "output alpha * W_V e: the hidden state decides how much memory enters",
    ),
    (
        "short conv",
        "none",
        "Y = v~ + SiLU(Conv1D(RMSNorm(v~))): depthwise, causal, kernel 4, dilation N, zero-initialised",
    ),
    (
        "multi-branch",
        "one vector",
        "M residual branches (hyper-connections): a key projection and a gate per branch, one table and W_V",
    ),
    (
        "placement",
        "one lookup",
        "modules at layer_ids (demo [1, 15], taken literally: they seed the multipliers), before attention",
    ),
]


def show_side_by_side() -> None:
    print("== 4. What the toy leaves out ==")
    for aspect, toy, real in SIDE_BY_SIDE:
        print(aspect)
        print(f"  toy   {toy}")
        print(f"  real  {real}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--text", default="Only Alexander the Great could tame the horse Bucephalus.", help="sentence for section 3"
    )
    args = parser.parse_args()

    show_toy()
    ct = CompressedTokenizer()  # DeepSeek-V3, offline; the table is cached in ~/.cache/engram
    config = EngramConfig()  # the demo's configuration: layers [1, 15], N = 3, K = 8, base 646,400
    indexer = EngramIndexer(config, ct)
    show_real_on_toy_ids(ct, indexer, config.layer_ids[0])
    show_real_pipeline(ct, config, indexer, args.text)
    show_side_by_side()


if __name__ == "__main__":
    main()
