"""EngramConfig: defaults, derived sizes, JSON round trip and validation."""

from __future__ import annotations

import pytest

from engram import EngramConfig


def test_defaults_follow_the_published_demo():
    cfg = EngramConfig()
    assert (cfg.layer_ids, cfg.max_ngram_size, cfg.n_head_per_ngram) == ([1, 15], 3, 8)
    assert cfg.engram_vocab_size == [646_400, 646_400] and cfg.pad_id == 2 and cfg.seed == 0
    assert (cfg.head_dim, cfg.n_heads, cfg.memory_dim) == (64, 16, 1024)
    assert cfg.gate_activation == "signed_sqrt" and cfg.conv_zero_init


def test_json_round_trip():
    cfg = EngramConfig(
        layer_ids=[2, 6],
        max_ngram_size=4,
        engram_vocab_size=[10, 20, 30],
        gate_activation="plain",
        gate_norm_eps=1e-6,
    )
    assert EngramConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layer_ids=[]), "layer_ids is empty"),
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size"),
        (dict(engram_vocab_size=[10]), "one base size per n-gram order"),
        (dict(n_embed_per_ngram=100, n_head_per_ngram=8), "positive multiple of n_head_per_ngram"),
        (dict(gate_activation="tanh"), "gate_activation"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(pad_id=-1), "pad_id"),
    ],
)
def test_invalid_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngramConfig(**kwargs)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown EngramConfig keys \['n_heads_per_ngram'\]"):
        EngramConfig.from_dict({"n_heads_per_ngram": 4})
