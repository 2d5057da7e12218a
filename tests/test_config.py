"""EngramConfig: defaults, derived sizes, JSON round trip, and validation errors that name the key."""

from __future__ import annotations

import numpy as np
import pytest

from engram import EngramConfig
from engram._json_config import ConfigError
from engram.model import ModelConfig


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
        (dict(layer_ids=[]), "layer_ids is empty: give at least one layer index, e.g. layer_ids=[1, 15]"),
        (dict(layer_ids=[1, -1]), "layer_ids must be non-negative integers, got -1"),
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size must be an integer >= 2"),
        (dict(engram_vocab_size=[10]), "engram_vocab_size needs one base size per n-gram order 2..3"),
        (dict(engram_vocab_size=[10, 1]), "engram_vocab_size entries must be integers >= 2, got 1"),
        (
            dict(n_embed_per_ngram=100, n_head_per_ngram=8),
            "n_embed_per_ngram: must be a positive multiple of n_head_per_ngram (8) so that every head gets the "
            "same width, got 100",
        ),
        (dict(gate_activation="tanh"), "gate_activation: expected 'signed_sqrt' or 'plain', got 'tanh'"),
        (dict(kernel_size=0), "kernel_size: must be >= 1, got 0"),
        (dict(pad_id=-1), "pad_id: must be >= 0, got -1"),
        (dict(seed=-3), "seed: must be >= 0, got -3"),
        (dict(table_init_std=-1), "table_init_std: must be >= 0, got -1.0"),
        (dict(gate_norm_eps=0.0), "gate_norm_eps: must be > 0, got 0.0"),
        (dict(conv_norm_eps=float("nan")), "conv_norm_eps: expected a finite number, got nan"),
        (dict(layer_ids=[1.0, 2.0]), "layer_ids: expected a list of integers, got [1.0, 2.0]"),
        (dict(engram_vocab_size=(100, "100")), "engram_vocab_size: expected a list of integers, got (100, '100')"),
        (dict(max_ngram_size=3.0), "max_ngram_size: expected an integer, got 3.0"),
        (dict(conv_zero_init="yes"), "conv_zero_init: expected true or false, got 'yes'"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError) as info:
        EngramConfig(**kwargs)
    assert str(info.value).startswith(message)


def test_values_are_converted_to_their_declared_types():
    cfg = EngramConfig(layer_ids=(np.int64(2),), engram_vocab_size=np.array([10, 20]).tolist(), table_init_std=1)
    assert cfg.layer_ids == [2] and type(cfg.layer_ids[0]) is int and type(cfg.table_init_std) is float
    assert EngramConfig.from_json(cfg.to_json()) == cfg


def test_errors_in_a_model_name_the_engram_section():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"vocab_size": 10, "engram": {"layer_ids": [1, 1]}})
    assert str(info.value) == "engram: layer_ids must be distinct, got [1, 1]"
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"vocab_size": 10, "engram": {"kernel_size": 0}})
    assert str(info.value) == "engram.kernel_size: must be >= 1, got 0"


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError) as info:
        EngramConfig.from_dict({"n_heads_per_ngram": 4})
    assert str(info.value).startswith(
        "unknown EngramConfig keys ['n_heads_per_ngram']; valid keys are "
        "['addressing', 'compress_tokens', 'conv_norm_eps', "
    )
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"vocab_size": 10, "engram": {"n_heads": 4}})
    assert str(info.value).startswith("engram: unknown EngramConfig keys ['n_heads']; valid keys are [")


def test_load_names_the_file(tmp_path):
    path = tmp_path / "engram.json"
    path.write_text('{"layer_ids": [1], "kernel_size": 0}')
    with pytest.raises(ConfigError) as info:
        EngramConfig.load(path)
    assert str(info.value) == f"{path}: kernel_size: must be >= 1, got 0"
    path.write_text('{"layer_ids": [1],')
    with pytest.raises(ConfigError) as info:
        EngramConfig.load(path)
    assert (
        str(info.value)
        == f"{path}: not valid JSON (line 1, column 19: Expecting property name enclosed in double quotes)"
    )
    with pytest.raises(FileNotFoundError, match=r"config file .*missing\.json does not exist"):
        EngramConfig.load(tmp_path / "missing.json")
