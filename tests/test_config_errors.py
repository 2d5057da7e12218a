"""Every config error names the file, the key path and the expected type or range (and the value found)."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from engram import EngramConfig
from engram._json_config import ConfigError
from engram.cli.main import main
from engram.model import ModelConfig, MoEConfig
from engram.storage.config import StorageConfig
from engram.training.config import TrainConfig
from engram.training.run import RunSpec
from tests.cli_runs import make_workspace, run_engram

MOE = {"n_routed_experts": 4, "top_k": 2, "expert_hidden": 32}


def _message(build) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    return str(info.value)


def _spec(**sections) -> dict:
    """A run.json document: a small model, default training, with ``sections`` merged in."""
    return {"model": {"vocab_size": 10, **sections.get("model", {})}, "train": sections.get("train", {}), "data": "d"}


# -- types, from the annotations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        # int refuses floats (even integral ones), bools and strings
        (lambda: TrainConfig(steps=1.5), "steps: expected an integer, got 1.5"),
        (lambda: TrainConfig(steps=2.0), "steps: expected an integer, got 2.0"),
        (lambda: TrainConfig(steps=True), "steps: expected an integer, got True"),
        (lambda: TrainConfig.from_dict({"steps": "3"}), "steps: expected an integer, got '3'"),
        # float refuses bools, strings and non-finite values
        (lambda: TrainConfig(lr=True), "lr: expected a finite number, got True"),
        (lambda: TrainConfig(lr="0.1"), "lr: expected a finite number, got '0.1'"),
        (lambda: TrainConfig(lr=math.inf), "lr: expected a finite number, got inf"),
        (
            lambda: ModelConfig.from_json('{"vocab_size": 10, "norm_eps": NaN}'),
            "norm_eps: expected a finite number, got nan",
        ),
        (lambda: ModelConfig(vocab_size=10, tie_embeddings=1), "tie_embeddings: expected true or false, got 1"),
        (
            lambda: RunSpec(model=ModelConfig(vocab_size=10), train=TrainConfig(), data=5),
            "data: expected a string, got 5",
        ),
        # Literal, X | None, lists and fixed-length tuples
        (lambda: TrainConfig(optimizer="sgd"), "optimizer: expected 'adamw' or 'muon', got 'sgd'"),
        (lambda: TrainConfig(device="tpu"), "device: expected 'auto', 'cpu' or 'cuda', got 'tpu'"),
        (lambda: TrainConfig(nonfinite="ignore"), "nonfinite: expected 'stop' or 'skip', got 'ignore'"),
        (lambda: StorageConfig(tier="ssd"), "tier: expected 'device', 'host' or 'disk', got 'ssd'"),
        (
            lambda: ModelConfig(vocab_size=10, input_vocab_size=2.0),
            "input_vocab_size: expected an integer or null, got 2.0",
        ),
        (lambda: StorageConfig(directory=5), "directory: expected a string or null, got 5"),
        (lambda: EngramConfig(gate_norm_eps="small"), "gate_norm_eps: expected a finite number or null, got 'small'"),
        (lambda: EngramConfig(layer_ids=5), "layer_ids: expected a list of integers, got 5"),
        (lambda: EngramConfig(layer_ids=[1, 2.5]), "layer_ids: expected a list of integers, got [1, 2.5]"),
        (lambda: TrainConfig(betas=[0.9]), "betas: expected a list of 2 finite numbers, got [0.9]"),
        (
            lambda: TrainConfig(table_betas=(0.9, math.nan)),
            "table_betas: expected a list of 2 finite numbers, got (0.9, nan)",
        ),
        # nested configs: a dict becomes the config, an error inside keeps its key path
        (lambda: ModelConfig(vocab_size=10, moe=5), "moe: expected a MoEConfig object or null, got 5"),
        (
            lambda: ModelConfig(vocab_size=10, moe={**MOE, "top_k": 9}),
            "moe.top_k: must be between 1 and n_routed_experts (4), got 9",
        ),
        (lambda: RunSpec.from_dict(_spec(train={"steps": "abc"})), "train.steps: expected an integer, got 'abc'"),
        (
            lambda: RunSpec.from_dict(_spec(model={"engram": {"layer_ids": 5}})),
            "model.engram.layer_ids: expected a list of integers, got 5",
        ),
        (
            lambda: RunSpec.from_dict(_spec(model={"moe": {**MOE, "top_k": 9}})),
            "model.moe.top_k: must be between 1 and n_routed_experts (4), got 9",
        ),
        (
            lambda: RunSpec.from_dict({**_spec(), "storage": {"cache_mb": -1}}),
            "storage.cache_mb: must be >= 0, got -1.0",
        ),
        (lambda: RunSpec.from_dict({**_spec(), "storage": []}), "storage: expected a StorageConfig object, got []"),
        (lambda: RunSpec.from_dict({"train": {}, "data": "d"}), "model: missing; expected a ModelConfig object"),
        (
            lambda: RunSpec.from_dict(_spec(model={"vocab_size": None})),
            "model.vocab_size: expected an integer, got None",
        ),
    ],
)
def test_values_are_checked_as_their_declared_type(build, message):
    assert _message(build) == message


def test_accepted_values_are_converted_to_the_declared_type():
    train = TrainConfig.from_json('{"lr": 1, "betas": [0.8, 0.9], "grad_clip": 0}')
    assert (train.lr, train.betas, train.grad_clip) == (1.0, (0.8, 0.9), 0.0)
    assert type(train.lr) is float and type(train.grad_clip) is float
    model = ModelConfig(vocab_size=np.int64(10), rope_theta=np.float32(500.0), moe=MOE, engram={"layer_ids": (1,)})
    assert type(model.vocab_size) is int and type(model.rope_theta) is float
    assert model.moe == MoEConfig(**MOE) and model.engram.layer_ids == [1]
    assert ModelConfig.from_json(model.to_json()) == model
    spec = RunSpec.from_dict(_spec(model={"moe": MOE}))
    assert isinstance(spec.model.moe, MoEConfig) and spec.storage == StorageConfig()


# -- ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (EngramConfig, dict(pad_id=-1), "pad_id: must be >= 0, got -1"),
        (EngramConfig, dict(seed=-1), "seed: must be >= 0, got -1"),
        (EngramConfig, dict(kernel_size=0), "kernel_size: must be >= 1, got 0"),
        (EngramConfig, dict(table_init_std=-0.5), "table_init_std: must be >= 0, got -0.5"),
        (EngramConfig, dict(gate_norm_eps=0), "gate_norm_eps: must be > 0, got 0.0"),
        (EngramConfig, dict(conv_norm_eps=-1e-5), "conv_norm_eps: must be > 0, got -1e-05"),
        (MoEConfig, dict(n_routed_experts=0), "n_routed_experts: must be >= 1, got 0"),
        (MoEConfig, dict(top_k=0), "top_k: must be between 1 and n_routed_experts (8), got 0"),
        (MoEConfig, dict(n_shared_experts=-1), "n_shared_experts: must be >= 0, got -1"),
        (MoEConfig, dict(expert_hidden=0), "expert_hidden: must be >= 1, got 0"),
        (MoEConfig, dict(bias_update_rate=-1e-3), "bias_update_rate: must be >= 0, got -0.001"),
        (MoEConfig, dict(aux_loss_weight=-1), "aux_loss_weight: must be >= 0, got -1.0"),
        (MoEConfig, dict(route_scale=0), "route_scale: must be > 0, got 0.0"),
        (ModelConfig, dict(vocab_size=0), "vocab_size: must be >= 1, got 0"),
        (ModelConfig, dict(vocab_size=10, d_model=0), "d_model: must be >= 1, got 0"),
        (ModelConfig, dict(vocab_size=10, n_layers=0), "n_layers: must be >= 1, got 0"),
        (ModelConfig, dict(vocab_size=10, n_heads=0), "n_heads: must be >= 1, got 0"),
        (ModelConfig, dict(vocab_size=10, ffn_hidden=0), "ffn_hidden: must be >= 1, got 0"),
        (ModelConfig, dict(vocab_size=10, n_branches=0), "n_branches: must be >= 1, got 0"),
        (ModelConfig, dict(vocab_size=10, max_seq_len=0), "max_seq_len: must be >= 1, got 0"),
        (
            ModelConfig,
            dict(vocab_size=10, n_dense_layers=5),
            "n_dense_layers: must be between 0 and n_layers (4), got 5",
        ),
        (ModelConfig, dict(vocab_size=10, rope_theta=0), "rope_theta: must be > 0, got 0.0"),
        (ModelConfig, dict(vocab_size=10, norm_eps=0), "norm_eps: must be > 0, got 0.0"),
        (ModelConfig, dict(vocab_size=10, init_std=-1), "init_std: must be >= 0, got -1.0"),
        (
            ModelConfig,
            dict(vocab_size=10, n_heads=5),
            "d_model: must split into n_heads (5) heads of even size for RoPE, got 256",
        ),
        (
            ModelConfig,
            dict(vocab_size=10, n_layers=2, engram={"layer_ids": [1, 2]}),
            "engram.layer_ids: layers [2] do not exist in a 2-layer model (ids are 0-based)",
        ),
        (
            ModelConfig,
            dict(vocab_size=10, engram={"layer_ids": [1, 1]}),
            "engram: layer_ids must be distinct, got [1, 1]",
        ),
        (TrainConfig, dict(steps=0), "steps: must be >= 1, got 0"),
        (TrainConfig, dict(batch_size=0), "batch_size: must be >= 1, got 0"),
        (TrainConfig, dict(seq_len=0), "seq_len: must be >= 1, got 0"),
        (TrainConfig, dict(max_skipped_steps=0), "max_skipped_steps: must be >= 1, got 0"),
        (TrainConfig, dict(warmup_steps=-1), "warmup_steps: must be >= 0, got -1"),
        (TrainConfig, dict(checkpoint_every=-1), "checkpoint_every: must be >= 0, got -1"),
        (TrainConfig, dict(threads=-1), "threads: must be >= 0, got -1"),
        (TrainConfig, dict(lr=0), "lr: must be > 0, got 0.0"),
        (TrainConfig, dict(table_lr_mult=-5), "table_lr_mult: must be > 0, got -5.0"),
        (TrainConfig, dict(betas=(0.9, 1)), "betas: every item must be >= 0 and < 1, got (0.9, 1.0)"),
        (TrainConfig, dict(table_betas=(-0.1, 0.9)), "table_betas: every item must be >= 0 and < 1, got (-0.1, 0.9)"),
        (TrainConfig, dict(weight_decay=-0.1), "weight_decay: must be >= 0, got -0.1"),
        (TrainConfig, dict(table_weight_decay=-1), "table_weight_decay: must be >= 0, got -1.0"),
        (TrainConfig, dict(grad_clip=-1), "grad_clip: must be >= 0, got -1.0"),
        (TrainConfig, dict(min_lr_ratio=1.5), "min_lr_ratio: must be between 0 and 1, got 1.5"),
        (TrainConfig, dict(seed=2**32), "seed: must be between 0 and 4294967295, got 4294967296"),
        (TrainConfig, dict(dist_timeout_s=0), "dist_timeout_s: must be > 0, got 0.0"),
        (StorageConfig, dict(cache_mb=-1), "cache_mb: must be >= 0, got -1.0"),
        (StorageConfig, dict(write_buffer_mb=-0.5), "write_buffer_mb: must be >= 0, got -0.5"),
        (
            StorageConfig,
            dict(dtype="int8"),
            "dtype: expected a storage dtype, one of ['bfloat16', 'float16', 'float32'], got 'int8'",
        ),
    ],
)
def test_values_are_checked_against_their_range(cls, kwargs, message):
    assert _message(lambda: cls(**kwargs)) == message


def test_bounds_are_inclusive_where_the_range_says_so():
    assert (
        TrainConfig(warmup_steps=2000, steps=1000, min_lr_ratio=1, grad_clip=0, betas=(0, 0.999)).warmup_steps == 2000
    )
    assert MoEConfig(top_k=8).top_k == 8 and ModelConfig(vocab_size=10, n_dense_layers=4).n_dense_layers == 4


# -- documents and files --------------------------------------------------------------------------


def test_unknown_keys_are_named_with_their_path_and_the_valid_keys():
    message = _message(lambda: RunSpec.from_dict(_spec(model={"moe": {"experts": 3}})))
    assert message.startswith("model.moe: unknown MoEConfig keys ['experts']; valid keys are ['aux_loss_weight', ")
    assert _message(lambda: TrainConfig.from_dict({"learning_rate": 1})).startswith(
        "unknown TrainConfig keys ['learning_rate']; valid keys are ['batch_size', "
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON (line 1, column 1: Expecting value)"),
        ('{"vocab_size": 10,\n "d_model": ', "not valid JSON (line 2, column 13: Expecting value)"),
        ("[1, 2]", "the top level must be a JSON object of ModelConfig keys, got list"),
        ('{"vocab_size": 10, "d_model": "wide"}', "d_model: expected an integer, got 'wide'"),
        ('{"vocab_size": 10, "engram": {"layer_ids": 5}}', "engram.layer_ids: expected a list of integers, got 5"),
    ],
)
def test_load_names_the_file(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_text(text)
    assert _message(lambda: ModelConfig.load(path)) == f"{path}: {message}"


def test_load_names_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{"vocab_size": \xff}')
    assert _message(lambda: ModelConfig.load(path)) == f"{path}: not UTF-8 text (byte 15)"


def test_run_spec_load_names_run_json(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_spec(train={"steps": 1.5})))
    assert _message(lambda: RunSpec.load(path)) == f"{path}: train.steps: expected an integer, got 1.5"


def test_config_error_is_a_value_error_that_survives_pickling():
    error = ConfigError("train.steps", "expected an integer, got 1.5", "run.json")
    assert isinstance(error, ValueError)
    assert str(pickle.loads(pickle.dumps(error))) == "run.json: train.steps: expected an integer, got 1.5"


# -- command-line options, refused by argparse before any work --------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "run", "--prompt", "x", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be >= 1, got 0",
        ),
        (["generate", "run", "--prompt", "x", "--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
        (
            ["generate", "run", "--prompt", "x", "--temperature", "nan"],
            "argument --temperature: expected a finite number, got 'nan'",
        ),
        (["generate", "run", "--prompt", "x", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        (["generate", "run", "--prompt", "x", "--top-k", "2.5"], "argument --top-k: expected an integer, got '2.5'"),
        (["generate", "run", "--prompt", "x", "--top-p", "0"], "argument --top-p: must be > 0 and <= 1, got 0"),
        (["generate", "run", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: must be > 0 and <= 1, got 1.5"),
        (["eval", "run", "--batches", "0"], "argument --batches: must be >= 1, got 0"),
        (["data", "x.txt", "--out", "o", "--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        (["data", "x.txt", "--out", "o", "--min-count", "0"], "argument --min-count: must be >= 1, got 0"),
        (["data", "x.txt", "--out", "o", "--max-vocab", "-5"], "argument --max-vocab: must be >= 1, got -5"),
        (["data", "x.txt", "--out", "o", "--max-doc-chars", "0"], "argument --max-doc-chars: must be >= 1, got 0"),
        (["params", "--config", "m.json", "--rho", "0"], "argument --rho: must be > 0 and <= 1, got 0"),
        (["params", "--config", "m.json", "--rho", "1.5"], "argument --rho: must be > 0 and <= 1, got 1.5"),
        (["params", "--config", "m.json", "--seq-len", "0"], "argument --seq-len: must be >= 1, got 0"),
        (["demo", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ],
)
def test_numeric_options_are_refused_naming_the_option(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert f"engram {args[0]}: error: {message}\n" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (
            "0.5,0.5,0.5",
            "splits must be three fractions >= 0 (train, val, test) summing to 1, got ['0.5', '0.5', '0.5']",
        ),
        ("1.5,-0.5,0", "splits must be three fractions >= 0 (train, val, test) summing to 1, got ['1.5', '-0.5', '0']"),
        ("0.9,0.1", "splits must be three fractions >= 0 (train, val, test) summing to 1, got ['0.9', '0.1']"),
        ("a,b,c", "splits must be three numbers (train, val, test), got ['a', 'b', 'c']"),
    ],
)
def test_data_split_is_refused_before_the_tokenizer_loads(capsys, tmp_path, split, message):
    args = ["data", "x.txt", "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "none.json"), "--split", split]
    assert main(args) == 2  # the tokenizer file does not exist: the split is checked first
    assert f"engram data: error: --split: {message}" in capsys.readouterr().err


def test_demo_refuses_a_bad_seed_before_any_work(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--seed", "-1"]) == 2
    assert "engram demo: error: seed: must be between 0 and 4294967295, got -1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


# -- `engram train` as a user runs it -------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("config-errors"))


def _train(ws: dict[str, Path], model: Path, *overrides: str):
    sets = [a for item in overrides for a in ("--set", item)]
    args = [
        "train",
        "--data",
        ws["data"],
        "--model",
        model,
        "--out",
        ws["root"] / "run",
        "--tokenizer",
        ws["tokenizer"],
    ]
    return run_engram(*args, "--no-progress", *sets, cache=ws["root"])


def _refused(result, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"engram train: error: {message}\n" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON (line 1, column 1: Expecting value)"),
        ('{"vocab_size": 2, "d_model": 3', "not valid JSON (line 1, column 31: Expecting ',' delimiter)"),
        ('{"vocab_size": 2, "norm_eps": NaN}', "norm_eps: expected a finite number, got nan"),
        (
            '{"vocab_size": 2, "engram": {"layer_ids": 5, "pad_id": 0}}',
            "engram.layer_ids: expected a list of integers, got 5",
        ),
    ],
)
def test_train_names_the_model_file_and_key(workspace, text, message):
    model = workspace["root"] / "bad-model.json"
    model.write_text(text)
    _refused(_train(workspace, model), f"{model}: {message}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
        ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
        ("model.init_std=-1", "model.init_std: must be >= 0, got -1.0"),
        ("train.grad_clip=-1", "train.grad_clip: must be >= 0, got -1.0"),
    ],
)
def test_train_overrides_name_the_key(workspace, override, message):
    _refused(_train(workspace, workspace["model"], override), message)
    assert not (workspace["root"] / "run").exists()  # refused before the run folder was made
