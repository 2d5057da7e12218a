"""The reference decoder: each variant learns, is causal, validates its inputs and round-trips its config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.training import TrainConfig, build_optimizers
from tests.corpus import sonnets_tokenizer, sonnets_tokens

ENGRAM = EngramConfig(
    layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=32, engram_vocab_size=[4001, 4001], pad_id=0
)
BASE = dict(vocab_size=1024, d_model=48, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=64)
MOE = MoEConfig(n_routed_experts=4, top_k=2, expert_hidden=48)
VARIANTS = {
    "dense": ModelConfig(**BASE),
    "moe": ModelConfig(**BASE, moe=MOE, n_dense_layers=1),
    "engram_moe": ModelConfig(**BASE, moe=MOE, engram=ENGRAM),
    "engram_moe_4_branches_tied": ModelConfig(**BASE, moe=MOE, engram=ENGRAM, n_branches=4, tie_embeddings=True),
}


@pytest.fixture(scope="module")
def indexer() -> EngramIndexer:
    return EngramIndexer(ENGRAM, CompressedTokenizer(sonnets_tokenizer(), cache_dir=False))


def _model(name: str, indexer: EngramIndexer) -> EngramLM:
    torch.manual_seed(0)
    config = VARIANTS[name]
    return EngramLM(config, indexer=indexer if config.engram else None)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_overfits_a_batch_of_real_text(name, indexer):
    model = _model(name, indexer)
    train, _ = sonnets_tokens()
    batch = torch.from_numpy(train[: 4 * 33].astype("int64")).view(4, 33)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizers = build_optimizers(model, TrainConfig(lr=3e-3, weight_decay=0.0)).values()
    first = None
    for _ in range(40):
        out = model(inputs, targets=targets)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.update_router_biases()
        first = out.loss.item() if first is None else first
    assert first > 6.5  # ~ln(1024) at initialisation
    assert out.loss.item() < 0.5 * first


@pytest.mark.parametrize("name", ["moe", "engram_moe_4_branches_tied"])
def test_outputs_are_causal(name, indexer):
    model = _model(name, indexer).eval()
    ids = torch.randint(2, 1024, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(2, 1024, (2, 8))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_engram_switch_and_precomputed_hashes(indexer):
    model = _model("engram_moe", indexer).eval()
    with torch.no_grad():  # make the Engram output non-trivial
        model.blocks[1].engram.short_conv.conv.weight.normal_()
    ids = torch.randint(2, 1024, (2, 16))
    with torch.no_grad():
        on = model(ids).logits
        assert torch.equal(model(ids, hash_ids=indexer(ids)).logits, on)
        off = model(ids, engram_enabled=False).logits
        # Engram off equals the same model with its Engram module removed.
        model.blocks[1].engram = None
        assert torch.equal(model(ids).logits, off)
    assert not torch.allclose(on, off)


def test_tied_embeddings_share_one_tensor(indexer):
    model = _model("engram_moe_4_branches_tied", indexer)
    assert model.head.weight is model.embed.weight


def test_bad_inputs_are_refused(indexer):
    model = _model("engram_moe", indexer)
    with pytest.raises(ValueError, match=r"input_ids contains id 1024, outside the valid range \[0, 1024\)"):
        model(torch.tensor([[1, 1024]]))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="beyond max_seq_len=64"):
        model(torch.ones(1, 65, dtype=torch.long))
    bare = EngramLM(VARIANTS["engram_moe"])
    with pytest.raises(ValueError, match="pass hash_ids or build it with indexer"):
        bare(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hash_ids lacks Engram layers \[1\]"):
        bare(torch.ones(1, 4, dtype=torch.long), hash_ids={})
    other = dataclasses.replace(ENGRAM, seed=1)
    with pytest.raises(ValueError, match="different EngramConfig"):
        EngramLM(dataclasses.replace(VARIANTS["engram_moe"], engram=other), indexer=indexer)


def test_config_round_trip_and_validation(tmp_path):
    for config in VARIANTS.values():
        assert ModelConfig.from_json(config.to_json()) == config
    path = tmp_path / "model.json"
    path.write_text(VARIANTS["engram_moe"].to_json())
    assert ModelConfig.load(path) == VARIANTS["engram_moe"]
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['d_ff'\]"):
        ModelConfig.from_dict({"vocab_size": 10, "d_ff": 3})
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['experts'\]"):
        ModelConfig.from_dict({"vocab_size": 10, "moe": {"experts": 3}})
    with pytest.raises(ValueError, match=r"engram\.layer_ids: layers \[2\] do not exist in a 2-layer model"):
        ModelConfig(**BASE, engram=dataclasses.replace(ENGRAM, layer_ids=[2]))
    with pytest.raises(ValueError, match="heads of even size"):
        ModelConfig(**{**BASE, "n_heads": 5})
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_routed_experts=2, top_k=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.load(tmp_path / "missing.json")


def test_trimmed_vocabulary_maps_tokenizer_ids_and_hashes_the_full_ids(indexer):
    """Embedding and head cover only the kept ids (+ unknown); Engram still hashes the tokenizer's ids."""
    kept = torch.tensor([5, 17, 99, 1000, 3, 250])
    config = dataclasses.replace(VARIANTS["engram_moe"], vocab_size=7, input_vocab_size=1024)
    torch.manual_seed(0)
    model = EngramLM(config, indexer=indexer)
    model.set_vocabulary(kept)
    ids = torch.tensor([[5, 17, 42, 1000, 3, 250]])  # 42 is not kept
    assert model.to_model_ids(ids).tolist() == [[1, 2, 0, 4, 5, 6]]
    assert model.to_tokenizer_ids(torch.tensor([0, 1, 6])).tolist() == [-1, 5, 250]
    assert model.to_model_ids(torch.tensor([[-100, 99]])).tolist() == [[-100, 3]]
    out = model(ids, targets=ids)
    assert out.logits.shape == (1, 6, 7)
    expected = torch.nn.functional.cross_entropy(out.logits[0].float(), torch.tensor([1, 2, 0, 4, 5, 6]))
    torch.testing.assert_close(out.loss, expected)
    # Engram reads rows hashed from the tokenizer ids, not from the model ids.
    engram = model.blocks[1].engram
    engram.record_gates = True
    with torch.no_grad():
        model(ids)
        gate_raw = engram.last_gate.clone()
        model(ids, hash_ids={1: indexer(model.to_model_ids(ids))[1]})
    assert not torch.equal(engram.last_gate, gate_raw)
    with pytest.raises(ValueError, match="distinct tokenizer ids"):
        model.set_vocabulary(torch.tensor([1, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="smaller than the trimmed vocabulary"):
        dataclasses.replace(config, input_vocab_size=3)


def test_evaluation_of_a_trimmed_vocabulary_model_matches_its_loss(indexer):
    from engram.eval import evaluate

    train, _ = sonnets_tokens()
    kept = torch.from_numpy(np.unique(train[:3000]).astype("int64"))
    config = dataclasses.replace(VARIANTS["engram_moe"], vocab_size=len(kept) + 1, input_vocab_size=1024)
    torch.manual_seed(0)
    model = EngramLM(config, indexer=indexer).eval()
    model.set_vocabulary(kept)
    tokens = train[: 2 * 32 + 1]
    result = evaluate(model, tokens, batch_size=2, seq_len=32)
    windows = torch.from_numpy(tokens[:65].astype("int64"))
    inputs = torch.stack([windows[:32], windows[32:64]])
    targets = torch.stack([windows[1:33], windows[33:65]])
    with torch.no_grad():
        expected = model(inputs, targets=targets).loss.item()
    assert result.tokens == 64
    assert result.loss == pytest.approx(expected, rel=1e-6)
