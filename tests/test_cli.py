"""The ``engram`` command as a user runs it: a real subprocess, real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engram import EngramConfig, NgramHasher

REPO = Path(__file__).resolve().parents[1]


def _engram(*args: str, cache=None) -> subprocess.CompletedProcess:
    env = None
    if cache is not None:
        import os

        env = {**os.environ, "ENGRAM_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "engram.cli.main", *args], capture_output=True, text=True, env=env, timeout=120, cwd=REPO
    )


def test_inspect_reports_the_computed_walkthrough(deepseek, tmp_path):
    result = _engram("inspect", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "raw ids        128,815" in out and "canonical ids  98,627  (23.435% fewer)" in out
    assert "163 ids" in out  # the " " group
    raw = deepseek.encode("Only Alexander the Great could tame the horse Bucephalus.")
    assert f"{raw[1]:>7}" in out and "'alexander'" in out
    # The hash rows printed for the bigram (only, alexander) at layer 1 are the library's.
    hasher = NgramHasher([1, 15], 3, 8, [646400, 646400], len(deepseek), pad_id=int(deepseek.lookup_table[2]))
    import torch

    rows = hasher.hash(deepseek(torch.tensor([raw])), 1)[0, 1, :8].tolist()
    assert f"2-gram ['only' | 'alexander'] -> rows {rows}" in out
    assert "646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523" in out
    assert "output Y            (1, 13, 4, 1024)" in out
    assert "table 10,344,164 rows x 64" in out


def test_inspect_with_a_config_file_and_custom_text(tmp_path):
    config = EngramConfig(
        layer_ids=[2], max_ngram_size=2, n_head_per_ngram=2, n_embed_per_ngram=16, engram_vocab_size=[1000]
    )
    path = tmp_path / "engram.json"
    path.write_text(config.to_json())
    result = _engram(
        "inspect",
        "--config",
        str(path),
        "--text",
        "By the way",
        "--hidden-size",
        "32",
        "--branches",
        "1",
        cache=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "2-gram table sizes (primes): [1009, 1013]" in result.stdout
    assert "output Y            (1, 3, 1, 32)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "--tokenizer", "/nonexistent/tokenizer.json"], "no tokenizer file at /nonexistent"),
        (["inspect", "--config", "/nonexistent.json"], "config file /nonexistent.json does not exist"),
        (["inspect", "--text", ""], "--text produced no tokens"),
    ],
)
def test_inspect_errors_exit_with_code_2_and_a_message(args, message, tmp_path):
    result = _engram(*args, cache=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_rejects_a_config_with_unknown_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layer_ids": [1], "n_heads": 4}))
    result = _engram("inspect", "--config", str(path), cache=tmp_path)
    assert result.returncode == 2
    assert "unknown EngramConfig keys ['n_heads']" in result.stderr


def test_help_and_missing_command():
    assert "inspect" in _engram("--help").stdout
    assert _engram().returncode == 2


def test_params_counts_and_allocates(tmp_path):
    from engram.model import ModelConfig
    from engram.model.accounting import allocate, estimate_parameters

    result = _engram("params", "--config", "configs/moe-small.json")
    assert result.returncode == 0, result.stderr
    counts = estimate_parameters(ModelConfig.load(REPO / "configs" / "moe-small.json"))
    assert f"total (excl. embedding, head)     {counts.total:>18,}" in result.stdout
    assert f"active per token                  {counts.active:>18,}" in result.stdout

    out = tmp_path / "engram.json"
    result = _engram(
        "params",
        "--config",
        "configs/moe-small.json",
        "--rho",
        "0.8",
        "--engram",
        "configs/engram-layers.json",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    written = ModelConfig.load(out)
    expected = allocate(
        ModelConfig.load(REPO / "configs" / "moe-small.json"),
        0.8,
        EngramConfig.from_json((REPO / "configs" / "engram-layers.json").read_text()),
    )
    assert written == expected.engram
    assert f"total mismatch {100 * expected.total_mismatch:+.3f}%" in result.stdout

    args = ["params", "--config", "configs/moe-small.json", "--rho", "0.8", "--engram", "configs/engram-layers.json"]
    matched = _engram(*args, "--match", "total_and_active", "--out", str(out))
    assert matched.returncode == 0, matched.stderr
    both = allocate(
        ModelConfig.load(REPO / "configs" / "moe-small.json"),
        0.8,
        EngramConfig.from_json((REPO / "configs" / "engram-layers.json").read_text()),
        match="total_and_active",
    )
    assert ModelConfig.load(out) == both.engram and abs(both.active_mismatch) < 1e-3
    assert f"dense FFN width (pays for the Engram projections): 688 -> {both.engram.ffn_hidden}" in matched.stdout

    missing = _engram("params", "--config", "configs/moe-small.json", "--rho", "0.8")
    assert missing.returncode == 2 and "--rho needs --engram" in missing.stderr
    dense = _engram(
        "params", "--config", "configs/dense-small.json", "--rho", "0.5", "--engram", "configs/engram-layers.json"
    )
    assert dense.returncode == 2 and "pure MoE" in dense.stderr
