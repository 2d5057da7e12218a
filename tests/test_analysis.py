"""Analysis tools: hidden states, linear CKA, LogitLens, n-gram classes, Engram-off sensitivity, gates, the CLI.

Each number is checked against an independent computation: CKA against HSIC with explicit centring
matrices, the LogitLens against float64 KL from the hidden states, the class statistics against
per-position losses and recorded gates computed here.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from torch.nn import functional as F

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.eval import (
    NgramCounts,
    cka_matrix,
    gate_classes,
    gate_statistics,
    linear_cka,
    logit_lens_kl,
    sensitivity_by_class,
    target_classes,
)
from engram.model import EngramLM, ModelConfig, MoEConfig
from tests.cli_runs import make_workspace, run_engram
from tests.corpus import sonnets_tokens

ENGRAM = EngramConfig(
    layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=32, engram_vocab_size=[4001, 4001], pad_id=0
)
BASE = dict(vocab_size=1024, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=64)
MOE = MoEConfig(n_routed_experts=4, top_k=2, expert_hidden=32)
SEQ_LEN, BATCH = 32, 3


def _model(indexer: EngramIndexer | None, seed: int = 0, **overrides) -> EngramLM:
    torch.manual_seed(seed)
    config = ModelConfig(**{**BASE, "moe": MOE, "engram": ENGRAM if indexer else None, **overrides})
    model = EngramLM(config, indexer=indexer if config.engram else None)
    with torch.no_grad():  # a trained-looking convolution, so that Engram's output is not the gated value alone
        for engram in model.engram_layers().values():
            engram.short_conv.conv.weight.normal_(std=0.3)
    return model


@pytest.fixture(scope="module")
def indexer(compressor) -> EngramIndexer:
    return EngramIndexer(ENGRAM, compressor)


def _windows(tokens: np.ndarray, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` non-overlapping windows, built here without the library's batching."""
    rows = np.stack([tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in range(count)]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


# -- hidden states --------------------------------------------------------------------------------
@pytest.mark.parametrize("branches", [1, 4])
def test_hidden_states_are_the_embedding_and_each_block_output(indexer, branches):
    model = _model(indexer, n_branches=branches).eval()
    ids = torch.randint(2, 1024, (2, 12))
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, output_hidden_states=True)
        off = model(ids, engram_enabled=False, output_hidden_states=True)
        hidden = out.hidden_states
        assert plain.hidden_states is None and torch.equal(plain.logits, out.logits)
        assert len(hidden) == 3 and all(h.shape == (2, 12, 32) for h in hidden)
        assert torch.equal(hidden[0], model.embed(ids))
        assert torch.equal(model.head(model.norm(hidden[-1])), out.logits)
        assert torch.equal(model.head(model.norm(off.hidden_states[-1])), off.logits)
        assert torch.equal(off.hidden_states[0], hidden[0]) and not torch.allclose(off.hidden_states[2], hidden[2])
        if branches == 1:  # block 1 (the Engram block) applied to block 0's output gives the next state
            assert torch.equal(model.blocks[1](hidden[1], indexer(ids)[1]), hidden[2])
            assert torch.equal(model.blocks[1](hidden[1], None), off.hidden_states[2])


# -- linear CKA -----------------------------------------------------------------------------------
def _cka_by_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as normalised HSIC of linear kernels, with the centring matrix H = I - 11^T / n."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))


def test_cka_of_a_matrix_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.from_numpy(x).float(), x) == pytest.approx(1.0, abs=1e-6)


def test_cka_is_invariant_to_rotation_and_scale_and_equals_hsic():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 10)) + 3.0  # an offset that only centring removes
    y = x[:, :6] @ rng.normal(size=(6, 7)) + rng.normal(size=(120, 7))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    expected = _cka_by_hsic(x, y)
    assert 0.2 < expected < 0.99
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(2.5 * x @ q, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(y, x) == pytest.approx(expected, rel=1e-10)


def test_cka_of_independent_features_is_near_zero():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20_000, 5)) + 4.0, rng.normal(size=(20_000, 6)) - 2.0
    assert linear_cka(x, y) < 0.01  # without centring the offsets alone would give about 1
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((10, 3)), y[:10])
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x[:10], y[:11])


def test_cka_matrix_compares_every_hidden_state_on_the_same_windows(indexer):
    _, val = sonnets_tokens()
    a, b = _model(indexer, seed=0), _model(None, seed=1, n_layers=3)
    matrix = cka_matrix(a, b, val, seq_len=SEQ_LEN, batch_size=BATCH, max_positions=7 * SEQ_LEN + 5)
    assert matrix.shape == (3, 4)
    inputs, _ = _windows(val, 7)
    with torch.no_grad():
        ha, hb = (m(inputs, output_hidden_states=True).hidden_states for m in (a, b))
    for i, j in [(0, 0), (1, 3), (2, 2)]:
        assert matrix[i, j] == pytest.approx(linear_cka(ha[i].flatten(0, 1), hb[j].flatten(0, 1)), rel=1e-6)
    same = cka_matrix(a, a, val, seq_len=SEQ_LEN, batch_size=BATCH, max_positions=4 * SEQ_LEN)
    np.testing.assert_allclose(np.diagonal(same), 1.0, atol=1e-12)
    assert a.training and b.training  # modes restored


# -- LogitLens ------------------------------------------------------------------------------------
def test_logit_lens_matches_kl_computed_from_the_hidden_states(indexer):
    _, val = sonnets_tokens()
    model = _model(indexer)
    kl = logit_lens_kl(model, val, seq_len=SEQ_LEN, batch_size=BATCH, max_positions=7 * SEQ_LEN)
    assert model.training and kl.shape == (3,) and kl[-1] == 0.0
    inputs, _ = _windows(val, 7)
    model.eval()
    with torch.no_grad():
        hidden = model(inputs, output_hidden_states=True).hidden_states
        log_p = [F.log_softmax(model.head(model.norm(h)).double(), -1) for h in hidden]
    expected = [float((lp.exp() * (lp - log_p[-1])).sum(-1).mean()) for lp in log_p]
    assert expected[0] > 1e-3  # small at initialisation, but far from the float32 error
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-7)


# -- n-gram counts and classes --------------------------------------------------------------------
def test_ngram_counts_and_target_classes_by_hand():
    counts = NgramCounts(np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, 5], dtype=np.uint32), n=3)
    queries = np.array([[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 4], [2, 4, 5], [1, 2, 5], [9, 9, 9], [5, 1, 2]])
    assert counts.count(queries).tolist() == [2, 2, 2, 1, 1, 0, 0, 0]
    inputs = np.array([[7, 1, 2, 3, 8, 1, 2, 9], [8, 1, 3, 1, 2, 3, 1, 5]])
    targets = np.array([[1, 2, 3, 8, 1, 2, 9, 6], [1, 3, 1, 2, 3, 1, 5, 5]])
    # Row 0: (1, 2, 3) ends at t=2; the bigram (1, 2) of t=5 repeats t=1. Row 1: three frequent trigrams
    # (t=3..5; the bigram (3, 1) of t=5 repeats t=2 but frequent comes first), and (8, 1) at t=0 is
    # not "seen before": its earlier occurrence is in another window.
    assert target_classes(inputs, targets, counts, min_count=2).tolist() == [
        [2, 2, 0, 2, 2, 1, 2, 2],
        [2, 2, 2, 0, 0, 0, 2, 2],
    ]
    assert target_classes(inputs, targets, counts, min_count=3).tolist() == [
        [2, 2, 2, 2, 2, 1, 2, 2],
        [2, 2, 2, 2, 2, 1, 2, 2],
    ]


def test_ngram_counts_scale_to_a_training_split():
    tokens = np.random.default_rng(0).integers(0, 20_000, size=1_400_000).astype(np.uint32)
    started = time.perf_counter()
    counts = NgramCounts(tokens, n=3)
    found = counts.count(np.lib.stride_tricks.sliding_window_view(tokens[:1000], 3))
    assert time.perf_counter() - started < 10
    assert (found >= 1).all() and counts.counts.sum() == len(tokens) - 2


def test_gate_classes_by_hand():
    vocab = {"<unk>": 0, "Ġthe": 1, "Ġfair": 2, "est": 3, ",": 4, "Ġbe": 5, "a": 6, "ut": 7, "y": 8}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.ByteLevel()
    tokenizer = CompressedTokenizer(backend, cache_dir=False)
    assert tokenizer.decode([2]) == " fair"
    counts = NgramCounts(np.array([1, 2, 3, 4, 1, 2, 3, 4, 6, 7]), n=2)
    inputs = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])  # " the fair|est, be|a|ut|y" then " the"
    targets = np.array([[2, 3, 4, 5, 6, 7, 8, 1]])
    classes = gate_classes(inputs, targets, counts, min_count=2, tokenizer=tokenizer)
    assert classes["word_end"][0].tolist() == [False, False, True, False, False, False, False, True]
    assert classes["frequent_ngram"][0].tolist() == [False, True, True, True, False, False, False, False]
    assert classes["rest"][0].tolist() == [True, False, False, False, True, True, True, False]


# -- Engram-off sensitivity -----------------------------------------------------------------------
def test_sensitivity_by_class_equals_a_per_position_computation(indexer):
    train, val = sonnets_tokens()
    kept = torch.from_numpy(np.unique(train).astype(np.int64))  # a trimmed vocabulary: unknown val ids map to 0
    model = _model(indexer, vocab_size=len(kept) + 1, input_vocab_size=1024)
    model.set_vocabulary(kept)
    result = sensitivity_by_class(
        model, train, val, seq_len=SEQ_LEN, batch_size=BATCH, max_positions=8 * SEQ_LEN, n=3, min_count=2
    )
    assert model.training
    inputs, targets = _windows(val, 8)
    model.eval()
    with torch.no_grad():
        on, off = (
            F.cross_entropy(
                model(inputs, engram_enabled=enabled).logits.flatten(0, 1).double(),
                model.to_model_ids(targets).flatten(),
                reduction="none",
            ).numpy()
            for enabled in (True, False)
        )
    classes = target_classes(inputs.numpy(), targets.numpy(), NgramCounts(train, 3), 2).ravel()
    total = (off - on).sum()
    assert result["all"]["positions"] == 8 * SEQ_LEN
    assert result["all"]["loss_on"] == pytest.approx(on.mean(), rel=1e-5)
    for k, name in enumerate(("frequent_ngram", "in_context", "other")):
        mine, expected = result["classes"][name], classes == k
        assert mine["positions"] == expected.sum() > 0
        assert mine["loss_on"] == pytest.approx(on[expected].mean(), rel=1e-5)
        assert mine["loss_off"] == pytest.approx(off[expected].mean(), rel=1e-5)
        assert mine["delta"] == pytest.approx((off - on)[expected].mean(), rel=1e-4, abs=1e-6)
        assert mine["share_of_increase"] == pytest.approx((off - on)[expected].sum() / total, rel=1e-4, abs=1e-6)
    assert sum(c["share_of_increase"] for c in result["classes"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no Engram layers"):
        sensitivity_by_class(_model(None), train, val, seq_len=SEQ_LEN)


# -- gate statistics ------------------------------------------------------------------------------
def test_gate_statistics_equal_the_mean_of_the_recorded_gates(indexer, compressor):
    train, val = sonnets_tokens()
    model = _model(indexer, n_branches=2)
    counts = NgramCounts(train, 3)
    result = gate_statistics(
        model, counts, val, compressor, seq_len=SEQ_LEN, batch_size=BATCH, max_positions=7 * SEQ_LEN, min_count=2
    )
    engram = model.blocks[1].engram
    assert model.training and not engram.record_gates and engram.last_gate is None  # state restored
    inputs, targets = _windows(val, 7)
    engram.record_gates = True
    with torch.no_grad():
        model.eval()(inputs)
    gate = engram.last_gate.double().numpy()  # (7, T, 2)
    masks = gate_classes(inputs.numpy(), targets.numpy(), counts, 2, compressor)
    masks["all"] = np.ones(inputs.shape, dtype=bool)
    stats = result["layers"][1]
    assert set(stats) == {"all", "frequent_ngram", "word_end", "rest"}
    for name, mask in masks.items():
        assert stats[name]["positions"] == mask.sum() > 0
        assert stats[name]["mean_gate"] == pytest.approx(gate[mask].mean(), rel=1e-6)
        np.testing.assert_allclose(stats[name]["branch_means"], gate[mask].mean(axis=0), rtol=1e-6)


def test_gate_statistics_skip_layers_without_gates(indexer, compressor):
    train, val = sonnets_tokens()
    model = _model(indexer)
    engram = model.blocks[1].engram
    # A module that records no gate values, as the OverEncoding variant: drop them after every forward.
    hook = engram.register_forward_hook(lambda module, args, output: setattr(module, "last_gate", None))
    result = gate_statistics(model, train, val, compressor, seq_len=SEQ_LEN, max_positions=SEQ_LEN)
    hook.remove()
    assert "records no gate values" in result["skipped"] and "layers" not in result
    no_gate = ModelConfig(**BASE, moe=MOE, engram=dataclasses.replace(ENGRAM, use_gate=False))
    model = EngramLM(no_gate, indexer=EngramIndexer(no_gate.engram, compressor))
    assert "use_gate=False" in gate_statistics(model, train, val, compressor, seq_len=SEQ_LEN)["skipped"]


# -- the command line -----------------------------------------------------------------------------
def test_analyze_writes_analysis_json_and_plots(tmp_path):
    ws = make_workspace(tmp_path)
    baseline = tmp_path / "moe.json"
    baseline.write_text(dataclasses.replace(ModelConfig.load(ws["model"]), engram=None).to_json())
    sets = ["train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.eval_every=2", "train.eval_batches=1"]
    for name, config in (("engram", ws["model"]), ("moe", baseline)):
        trained = run_engram(
            "train",
            "--data",
            ws["data"],
            "--model",
            config,
            "--out",
            tmp_path / name,
            "--tokenizer",
            ws["tokenizer"],
            "--no-progress",
            *[a for s in sets for a in ("--set", s)],
            cache=tmp_path,
        )
        assert trained.returncode == 0, trained.stderr
    out = tmp_path / "analysis"
    args = ["analyze", tmp_path / "engram", "--compare", tmp_path / "moe", "--max-positions", "128", "--out", out]
    result = run_engram(*args, "--min-count", "2", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    analysis = json.loads((out / "analysis.json").read_text())
    assert {"split", "data", "seq_len", "max_positions", "runs", "cka"} <= set(analysis)
    engram, moe = analysis["runs"]
    assert (engram["name"], moe["name"]) == ("engram", "moe")
    assert len(engram["logit_lens_kl"]) == 3 and engram["logit_lens_kl"][-1] == 0.0
    assert set(engram["sensitivity"]["classes"]) == {"frequent_ngram", "in_context", "other"}
    assert engram["sensitivity"]["all"]["positions"] == 128
    assert set(engram["gates"]["layers"]["1"]) == {"all", "frequent_ngram", "word_end", "rest"}
    assert "skipped" in moe["sensitivity"] and "skipped" in moe["gates"]
    assert np.array(analysis["cka"]["matrix"]).shape == (3, 3)
    assert {p.name for p in out.iterdir()} == {"analysis.json", "logit_lens.png", "sensitivity.png", "cka.png"}
    assert "LogitLens" in result.stdout and "CKA engram vs moe" in result.stdout
