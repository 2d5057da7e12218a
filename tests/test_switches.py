"""Ablation switches and controls (docs/definition.md, "Ablation switches and controls").

Each switch against an independent computation of what it states, its parameter count against the
built modules, incremental decoding against the full forward pass, and its config's JSON round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from engram import Engram, EngramConfig, EngramIndexer, NgramHasher
from engram._json_config import ConfigError
from engram.indexing.indexer import engram_head_sizes
from engram.indexing.primes import engram_table_sizes
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.model.accounting import count_parameters, estimate_parameters
from tests.test_layer import _hash_ids

SMALL = dict(
    layer_ids=[1, 4], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, engram_vocab_size=[31, 37], pad_id=0
)
SENTENCE = "Thy love and thy love"  # 'Thy' and ' thy' are one canonical id in the sonnets tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny ops: one thread is faster than waking idle ones for each (see test_generate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(n_branches: int = 2, hidden: int = 6, compressor=None, **switches) -> Engram:
    """A float64 layer with a live convolution, every parameter moved away from its init.

    With ``compressor`` it gets an indexer of its config, for ``forward(input_ids=...)``.
    """
    torch.manual_seed(0)
    config = EngramConfig(**{**SMALL, "conv_zero_init": False, **switches})
    indexer = None if compressor is None else EngramIndexer(config, compressor)
    layer = Engram(config, layer_id=4, hidden_size=hidden, n_branches=n_branches, indexer=indexer).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _rows(layer: Engram, hash_ids: torch.Tensor) -> torch.Tensor:
    """e (B, T, d_mem): every head's row, looked up head by head from the table's weight."""
    weight, start, parts = layer.table.weight, 0, []
    for head, size in enumerate(layer.head_sizes):
        parts.append(weight[start + hash_ids[..., head]])
        start += size
    return torch.cat(parts, dim=-1)


def _conv(layer: Engram, x: torch.Tensor) -> torch.Tensor:
    """SiLU(Conv1D(RMSNorm(x))) of x (B, T, M, d), tap by tap (tap j reads lag (taps-1-j)*N)."""
    cfg, conv = layer.config, layer.short_conv
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + cfg.conv_norm_eps) * conv.norm.weight
    taps = conv.conv.weight[:, 0, :].view(x.shape[2], x.shape[3], cfg.kernel_size)  # (M, d, taps)
    out = torch.zeros_like(x)
    for j in range(cfg.kernel_size):
        lag = (cfg.kernel_size - 1 - j) * cfg.max_ngram_size
        if lag < x.shape[1]:
            out[:, lag:] += taps[..., j] * normed[:, : x.shape[1] - lag]
    return out * torch.sigmoid(out)


# -- compress_tokens -------------------------------------------------------------------------------
def test_compression_off_hashes_the_raw_ids(compressor):
    config = EngramConfig(**{**SMALL, "pad_id": 200}, compress_tokens=False)
    raw = torch.tensor([compressor.encode(SENTENCE)])
    canonical = compressor(raw)
    assert raw[0, 0] != raw[0, 3] and canonical[0, 0] == canonical[0, 3]  # 'Thy' ~ ' thy'
    assert compressor.lookup_table[200] != 200  # so that hashing the canonical pad would show
    # The definition's hash over the raw vocabulary: V' = raw ids, pad = the raw pad id.
    reference = NgramHasher(SMALL["layer_ids"], 3, 2, SMALL["engram_vocab_size"], compressor.raw_vocab_size, pad_id=200)
    off, on = (
        EngramIndexer(config, compressor),
        EngramIndexer(dataclasses.replace(config, compress_tokens=True), compressor),
    )
    for layer in SMALL["layer_ids"]:
        assert off.hasher.multipliers(layer) == reference.multipliers(layer)
        assert torch.equal(off(raw)[layer], reference.hash(raw, layer))
        assert torch.equal(off.hash_layer(raw, layer), reference.hash(raw, layer))
        # "Thy love" and "thy love" share their bigram rows (the K = 2 order-2 heads) only with compression.
        assert torch.equal(on(raw)[layer][0, 1, :2], on(raw)[layer][0, 4, :2])
        assert not torch.equal(off(raw)[layer][0, 1, :2], off(raw)[layer][0, 4, :2])
    first, history = off.hash_step(raw[:, :2])
    assert torch.equal(history, raw[:, :2])  # the history holds raw ids too
    second, _ = off.hash_step(raw[:, 2:], history)
    assert torch.equal(torch.cat([first[4], second[4]], dim=1), reference.hash(raw, 4))


def test_compression_off_refuses_ids_outside_the_tokenizer(compressor):
    indexer = EngramIndexer(EngramConfig(**SMALL, compress_tokens=False), compressor)
    for bad in (1024, -1):
        with pytest.raises(ValueError, match=rf"input_ids contains id {bad}, .* of the tokenizer's 1024 raw ids"):
            indexer(torch.tensor([[5, bad]]))
        with pytest.raises(ValueError, match="raw ids"):
            indexer.hash_step(torch.tensor([[bad]]))


# -- use_gate, use_conv ----------------------------------------------------------------------------
def test_gate_off_builds_no_keys_and_adds_the_value_and_its_convolution():
    layer = _layer(n_branches=2, use_gate=False)
    assert layer.key_proj is None and layer.key_norm is None and layer.query_norm is None
    assert not [name for name, _ in layer.named_parameters() if name.startswith(("key", "query"))]
    hash_ids = _hash_ids(layer, 2, 11)  # 11 > (kernel-1)*N = 9: every tap is used
    hidden = torch.randn(2, 11, 2, 6, dtype=torch.float64)
    layer.record_gates = True
    out = layer(hidden, hash_ids=hash_ids)
    assert torch.equal(layer.last_gate, torch.ones(2, 11, 2, dtype=torch.float64))
    value = _rows(layer, hash_ids) @ layer.value_proj.weight.T + layer.value_proj.bias  # (B, T, d)
    gated = value.unsqueeze(2).expand(-1, -1, 2, -1)  # alpha = 1 in both branches
    torch.testing.assert_close(out, gated + _conv(layer, gated), rtol=1e-12, atol=1e-12)
    # Nothing depends on the hidden state any more.
    torch.testing.assert_close(layer(torch.randn_like(hidden), hash_ids=hash_ids), out, rtol=0, atol=0)


def test_the_convolution_reference_matches_a_gated_layer():
    """_conv above against the library's gated layer, so that the gate-off test checks the conv."""
    layer = _layer(n_branches=2)
    hash_ids, hidden = _hash_ids(layer, 2, 11), torch.randn(2, 11, 2, 6, dtype=torch.float64)
    layer.record_gates = True
    out = layer(hidden, hash_ids=hash_ids)
    value = layer.value_proj(_rows(layer, hash_ids))
    gated = layer.last_gate.unsqueeze(-1) * value.unsqueeze(2)
    assert bool(((layer.last_gate > 0) & (layer.last_gate < 1)).all())
    torch.testing.assert_close(out, gated + _conv(layer, gated), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_gate", [True, False])
def test_conv_off_returns_the_gated_value(use_gate):
    layer = _layer(n_branches=3, use_conv=False, use_gate=use_gate)  # conv_zero_init=False: a conv would show
    assert layer.short_conv is None
    assert not [name for name, _ in layer.named_parameters() if name.startswith("short_conv")]
    hash_ids, hidden = _hash_ids(layer, 2, 11), torch.randn(2, 11, 3, 6, dtype=torch.float64)
    layer.record_gates = True
    out = layer(hidden, hash_ids=hash_ids)
    value = _rows(layer, hash_ids) @ layer.value_proj.weight.T + layer.value_proj.bias
    torch.testing.assert_close(out, layer.last_gate.unsqueeze(-1) * value.unsqueeze(2), rtol=1e-12, atol=1e-12)
    update, state = layer.step(hidden[:, :4], hash_ids[:, :4])
    assert state is None
    torch.testing.assert_close(update, out[:, :4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no short convolution"):
        layer.step(hidden[:, 4:5], hash_ids[:, 4:5], torch.zeros(2, 18, 9, dtype=torch.float64))


# -- addressing ------------------------------------------------------------------------------------
def test_token_addressing_hashes_each_token_alone(compressor):
    token = EngramIndexer(EngramConfig(**SMALL, addressing="token"), compressor)
    ngram = EngramIndexer(EngramConfig(**SMALL), compressor)
    raw = torch.tensor([compressor.encode("When I do count the clock that tells the time")])
    canonical = compressor(raw)
    for layer in SMALL["layer_ids"]:
        rows = token(raw)[layer]
        assert torch.equal(token.hash_layer(raw, layer), rows)
        for t in range(raw.shape[1]):  # the n-gram hash of the one-token sequence [x_t]
            assert torch.equal(rows[:, t], ngram.hasher.hash(canonical[:, t : t + 1], layer)[:, 0])
        # The same tables and primes: an n-gram row at the start (pads before it) is a token row.
        assert torch.equal(rows[:, 0], ngram(raw)[layer][:, 0])
        assert not torch.equal(rows[:, 1:], ngram(raw)[layer][:, 1:])
    changed = raw.clone()
    changed[0, 3] = compressor.encode(" love")[0]
    same, moved = token(changed)[4], ngram(changed)[4]
    assert torch.equal(same[:, 4:], token(raw)[4][:, 4:])  # independent of the previous token
    assert not torch.equal(moved[:, 4], ngram(raw)[4][:, 4])  # where the n-gram hash is not
    assert Engram.table_head_sizes(token.config, 4) == ngram.hasher.head_sizes(4)


def test_constant_addressing_has_one_row_per_head(compressor):
    layer = _layer(n_branches=2, compressor=compressor, addressing="constant")
    indexer = layer.indexer
    assert engram_head_sizes(layer.config, 4) == [1, 1, 1, 1] == layer.head_sizes
    assert Engram.table_shape(layer.config, 4) == (4, 4) and layer.table.weight.shape == (4, 4)
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(indexer(ids)[4], torch.zeros(2, 12, 4, dtype=torch.long))
    hidden = torch.randn(2, 12, 2, 6, dtype=torch.float64)
    out = layer(hidden, input_ids=ids)
    # Same hidden state, any ids: the same update (the gate still reads the hidden state).
    other = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer(hidden, input_ids=other), out)
    assert torch.equal(layer(hidden, input_ids=ids.flip(1)), out)
    assert not torch.allclose(layer(hidden + 1.0, input_ids=ids), out)
    with pytest.raises(ValueError, match=r"outside head 0's table \[0, 1\)"):
        layer(hidden, hash_ids=torch.ones(2, 12, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids contains id -1"):
        indexer(torch.tensor([[3, -1]]))
    with pytest.raises(KeyError, match="layer 2 has no Engram module"):
        indexer.hash_layer(ids, 2)


# -- variant="overencoding" ------------------------------------------------------------------------
OVERENCODING = EngramConfig(**{**SMALL, "layer_ids": [0], "n_embed_per_ngram": 16}, variant="overencoding")


@pytest.mark.parametrize("n_branches", [1, 2])
def test_overencoding_averages_the_embedding_and_the_ngram_embeddings(compressor, n_branches):
    indexer = EngramIndexer(OVERENCODING, compressor)
    config = ModelConfig(vocab_size=1024, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, engram=OVERENCODING)
    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(config, n_branches=n_branches), indexer=indexer).double()
    engram = model.blocks[0].engram
    assert [name for name, _ in engram.named_parameters()] == ["table.weight"]
    ids = torch.tensor([compressor.encode(SENTENCE + ", when I do count the clock")])
    hash_ids = indexer(ids)[0]
    embedded = model.embed(ids)  # (B, T, d)
    h = embedded.unsqueeze(2).expand(-1, -1, n_branches, -1)  # block 0's input: a copy per branch
    engram.record_gates = True
    update = engram(h, hash_ids=hash_ids)
    assert engram.last_gate is None  # OverEncoding has no gate
    # The mean of E(x) and the N-1 = 2 n-gram embeddings, each the K = 2 rows of its order side by side.
    e = _rows(engram, hash_ids)
    mean = (embedded + e[..., :16] + e[..., 16:]) / 3
    torch.testing.assert_close(h + update, mean.unsqueeze(2).expand_as(h), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # Engram off is the plain embedding: the model without its module
        off = model(ids, engram_enabled=False).logits
        model.blocks[0].engram = None
        assert torch.equal(model(ids).logits, off)


def test_overencoding_needs_block_zero_and_the_model_width():
    base = dict(vocab_size=1024, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32)
    with pytest.raises(ConfigError) as info:
        ModelConfig(**base, engram=dataclasses.replace(OVERENCODING, layer_ids=[1]))
    assert str(info.value).startswith("engram.layer_ids: OverEncoding averages") and "set layer_ids to [0]" in str(
        info.value
    )
    with pytest.raises(ConfigError, match=r"engram\.n_embed_per_ngram: .* set it to d_model \(16\), got 8"):
        ModelConfig(**base, engram=dataclasses.replace(OVERENCODING, n_embed_per_ngram=8))
    with pytest.raises(ValueError, match=r"hidden_size \(6\) must equal n_embed_per_ngram"):
        Engram(OVERENCODING, layer_id=0, hidden_size=6)
    # The plain Engram variant has neither restriction.
    ModelConfig(**base, engram=dataclasses.replace(OVERENCODING, variant="engram", layer_ids=[1], n_embed_per_ngram=8))


# -- parameter counts ------------------------------------------------------------------------------
ACCOUNTING_ENGRAM = EngramConfig(
    layer_ids=[1, 3], max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=32, engram_vocab_size=[503, 601]
)
SWITCHES = {
    "no_compression": dict(compress_tokens=False),
    "no_gate": dict(use_gate=False),
    "no_conv": dict(use_conv=False),
    "no_gate_no_conv": dict(use_gate=False, use_conv=False),
    "token": dict(addressing="token"),
    "constant": dict(addressing="constant"),
    "overencoding": dict(variant="overencoding", layer_ids=[0]),
    "overencoding_constant": dict(variant="overencoding", layer_ids=[0], addressing="constant"),
}


@pytest.mark.parametrize("n_branches", [1, 3])
@pytest.mark.parametrize("name", list(SWITCHES))
def test_estimate_matches_the_built_modules(name, n_branches):
    engram = dataclasses.replace(ACCOUNTING_ENGRAM, **SWITCHES[name])
    moe = MoEConfig(n_routed_experts=4, top_k=1, expert_hidden=16, n_shared_experts=1)
    config = ModelConfig(
        vocab_size=300, d_model=32, n_layers=4, n_heads=4, moe=moe, engram=engram, n_branches=n_branches
    )
    built = EngramLM(config)
    counted = count_parameters(built)
    assert estimate_parameters(config) == counted
    assert counted.total + counted.embedding == sum(p.numel() for p in built.parameters())
    d, m, d_mem = 32, n_branches, engram.memory_dim
    dense = {  # by hand from docs/definition.md: W_V b_V; W_K^m b_K^m and two norms; conv norm and taps
        "value": (d_mem + 1) * d,
        "keys": (d_mem + 1) * m * d + 2 * m * d if engram.use_gate else 0,
        "conv": m * d + m * d * engram.kernel_size if engram.use_conv else 0,
    }
    per_layer = 0 if engram.variant == "overencoding" else sum(dense.values())
    assert counted.engram_dense == len(engram.layer_ids) * per_layer
    if engram.addressing == "constant":
        rows = engram.n_heads * len(engram.layer_ids)
    else:
        sizes = engram_table_sizes(engram.layer_ids, 3, 4, engram.engram_vocab_size)
        rows = sum(p for layer in sizes.values() for order in layer for p in order)
    assert counted.engram_tables == rows * engram.head_dim


# -- decoding --------------------------------------------------------------------------------------
DECODE_ENGRAM = EngramConfig(
    layer_ids=[0, 1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=48, engram_vocab_size=[401, 409]
)
DECODE = {
    **{name: switch for name, switch in SWITCHES.items() if not name.startswith("overencoding")},
    "token_no_compression": dict(addressing="token", compress_tokens=False),
    "overencoding": dict(variant="overencoding", layer_ids=[0]),
    "overencoding_token": dict(variant="overencoding", layer_ids=[0], addressing="token"),
}


@pytest.mark.parametrize("n_branches", [1, 2])
@pytest.mark.parametrize("name", list(DECODE))
def test_incremental_decoding_equals_the_full_forward(compressor, name, n_branches):
    engram = dataclasses.replace(DECODE_ENGRAM, conv_zero_init=False, pad_id=0, **DECODE[name])
    config = ModelConfig(
        vocab_size=1024, d_model=48, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=32, engram=engram
    )
    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(config, n_branches=n_branches), indexer=EngramIndexer(engram, compressor))
    model = model.double().eval()
    with torch.no_grad():  # tables of std 1 would drown the 0.02 residual stream; make every term count
        for table in model.engram_tables():
            table.weight.mul_(0.05)
    ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(1))
    state, parts, start = model.new_state(2), [], 0
    with torch.no_grad():
        full = model(ids).logits
        for size in [5, 1, 1, 4, 2, 1, 3, 3]:
            parts.append(model(ids[:, start : start + size], state=state).logits)
            start += size
        off = model(ids, engram_enabled=False).logits
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-10)
    assert not torch.allclose(full, off, rtol=0, atol=1e-6)  # the memory takes part
    has_conv = engram.variant == "engram" and engram.use_conv
    assert all((block.conv is not None) == (has_conv and i in engram.layer_ids) for i, block in enumerate(state.blocks))


# -- configs ---------------------------------------------------------------------------------------
def test_configs_with_the_switches_round_trip_through_json(tmp_path):
    engram = EngramConfig(
        **SMALL, compress_tokens=False, use_gate=False, use_conv=False, addressing="constant", variant="engram"
    )
    assert EngramConfig.from_json(engram.to_json()) == engram
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, engram=OVERENCODING)
    path = tmp_path / "model.json"
    path.write_text(model.to_json())
    loaded = ModelConfig.load(path)
    assert loaded == model and loaded.engram.variant == "overencoding"
    for value in ("token", "ngram"):
        assert EngramConfig.from_dict({"addressing": value}).addressing == value


def test_old_config_json_loads_with_the_defaults():
    old = json.loads(Path(__file__).parents[1].joinpath("configs", "engram-layers.json").read_text())
    new_fields = {"compress_tokens", "use_gate", "use_conv", "addressing", "variant"}
    assert not new_fields & set(old)  # written before the switches existed
    config = EngramConfig.from_dict(old)
    assert (config.compress_tokens, config.use_gate, config.use_conv) == (True, True, True)
    assert (config.addressing, config.variant) == ("ngram", "engram")
    assert config == EngramConfig(**old)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(addressing="bigram"), "addressing: expected 'ngram', 'token' or 'constant', got 'bigram'"),
        (dict(variant="overtokenized"), "variant: expected 'engram' or 'overencoding', got 'overtokenized'"),
        (dict(use_gate=0), "use_gate: expected true or false, got 0"),
        (dict(use_conv="no"), "use_conv: expected true or false, got 'no'"),
        (dict(compress_tokens=None), "compress_tokens: expected true or false, got None"),
    ],
)
def test_bad_switch_values_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError) as info:
        EngramConfig(**kwargs)
    assert str(info.value) == message


def test_head_sizes_of_the_n_gram_addressing_are_the_primes():
    config = EngramConfig(**SMALL)
    primes = engram_table_sizes(SMALL["layer_ids"], 3, 2, SMALL["engram_vocab_size"])
    for layer in SMALL["layer_ids"]:
        assert engram_head_sizes(config, layer) == [p for order in primes[layer] for p in order]
        assert Engram.table_shape(config, layer) == (sum(engram_head_sizes(config, layer)), 4)
    assert math.prod(Engram.table_shape(dataclasses.replace(config, addressing="token"), 1)) == math.prod(
        Engram.table_shape(config, 1)
    )
    with pytest.raises(KeyError, match="layer 2 has no Engram module"):
        engram_head_sizes(config, 2)
