"""The trainer on real text: exact resume, checkpoint validation, optimizer groups, sparse updates, metrics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from engram import EngramConfig, EngramIndexer
from engram.eval import token_byte_lengths
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.training import RowAdam, TrainConfig, Trainer, build_optimizers, lr_factor, seed_everything
from engram.training.checkpoint import latest_checkpoint, load_checkpoint
from tests.corpus import sonnets_tokens

ENGRAM = EngramConfig(
    layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=32, engram_vocab_size=[3001, 3001], pad_id=0
)
MODEL = ModelConfig(
    vocab_size=1024,
    d_model=32,
    n_layers=2,
    n_heads=2,
    ffn_hidden=64,
    max_seq_len=64,
    moe=MoEConfig(n_routed_experts=4, top_k=2, expert_hidden=32),
    engram=ENGRAM,
)
TRAIN = TrainConfig(
    steps=12,
    batch_size=4,
    seq_len=32,
    lr=3e-3,
    warmup_steps=3,
    log_every=2,
    eval_every=6,
    eval_batches=2,
    checkpoint_every=6,
    device="cpu",
)


def _trainer(compressor, out_dir, model_config=MODEL, train_config=TRAIN, seed=0, run_info=None) -> Trainer:
    seed_everything(seed)
    model = EngramLM(model_config, indexer=EngramIndexer(model_config.engram, compressor))
    train, val = sonnets_tokens()
    return Trainer(
        model,
        train_config,
        train,
        val,
        out_dir=out_dir,
        byte_lengths=token_byte_lengths(compressor),
        run_info=run_info or {"tokenizer": compressor.fingerprint},
        progress=False,
    )


def test_resume_reproduces_the_uninterrupted_run(compressor, tmp_path):
    straight = _trainer(compressor, tmp_path / "a")
    expected = straight.train()
    assert len(expected) == 12

    interrupted = _trainer(compressor, tmp_path / "b")
    first_half = interrupted.train(until=6)
    assert first_half == expected[:6]
    # A new process: a differently seeded model, restored from the checkpoint of step 6.
    resumed = _trainer(compressor, tmp_path / "b", seed=123)
    assert resumed.resume() and resumed.step == 6
    assert resumed.train() == expected[6:]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The metrics file reads as one run: no duplicated steps after the resume.
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert {"val_bpb", "val_loss_engram_off"} <= set(evals[0])
    assert (tmp_path / "b" / "loss.png").stat().st_size > 10_000


def test_resume_skips_a_damaged_checkpoint_and_refuses_a_mismatch(compressor, tmp_path):
    trainer = _trainer(compressor, tmp_path)
    trainer.train()
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000006", "step_00000012"]
    tensors = checkpoints[-1] / "shard_00000_of_00001.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # the newest checkpoint damaged after it was written
    with pytest.warns(UserWarning, match="skipping the damaged or incomplete checkpoint .*step_00000012"):
        assert latest_checkpoint(tmp_path / "checkpoints") == checkpoints[0]
    fresh = _trainer(compressor, tmp_path, seed=5)
    damaged = "step_00000012 cannot be used: checkpoint file .* does not match .*resuming from step_00000006"
    with pytest.warns(UserWarning, match=damaged):
        assert fresh.resume() and fresh.step == 6
    # the damaged checkpoint is set aside, never to be overwritten by the resumed run's step 12
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(names) == 2 and names[0] == "step_00000006" and names[1].startswith("step_00000012.damaged-")

    wider = dataclasses.replace(MODEL, d_model=64)
    other = _trainer(compressor, None, model_config=wider)
    with pytest.raises(ValueError, match="d_model: checkpoint 32, current 64"):
        load_checkpoint(checkpoints[0], other.model, other.optimizers)
    with pytest.raises(ValueError, match="tokenizer: checkpoint"):
        load_checkpoint(checkpoints[0], fresh.model, fresh.optimizers, run_info={"tokenizer": "another"})


def test_optimizer_groups_follow_the_recipe(compressor):
    trainer = _trainer(compressor, None)
    optimizers = trainer.optimizers
    assert set(optimizers) == {"tables", "adamw"}
    tables = optimizers["tables"]
    assert isinstance(tables, RowAdam)
    assert tables.tables == [trainer.model.blocks[1].engram.table]
    assert tables.param_groups[0]["lr"] == pytest.approx(5 * TRAIN.lr) and tables.param_groups[0]["weight_decay"] == 0
    decay, no_decay = optimizers["adamw"].param_groups
    matrices = {id(m.weight) for m in trainer.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert decay["weight_decay"] == 0.1 and {id(p) for p in decay["params"]} == matrices
    assert no_decay["weight_decay"] == 0.0 and not {id(p) for p in no_decay["params"]} & matrices
    norms = trainer.model.blocks[1].engram.key_norm.weight
    assert any(p is norms for p in no_decay["params"])
    n_params = len(list(trainer.model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) + 1 == n_params

    muon = build_optimizers(trainer.model, dataclasses.replace(TRAIN, optimizer="muon"))
    assert set(muon) == {"tables", "adamw", "muon"}
    on_adamw = {id(p) for g in muon["adamw"].param_groups for p in g["params"]}
    assert id(trainer.model.embed.weight) in on_adamw and id(trainer.model.head.weight) in on_adamw
    assert all(p.dim() == 2 for p in muon["muon"].param_groups[0]["params"])


def test_a_step_updates_only_the_looked_up_table_rows(compressor):
    trainer = _trainer(compressor, None)
    engram = trainer.model.blocks[1].engram
    before = engram.table.weight.detach().clone()
    inputs, _ = trainer.batches.batch(0)
    looked_up = (trainer.model.indexer(inputs)[1] + engram.offsets).unique()
    trainer.train_step()
    changed = (engram.table.weight.detach() != before).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, looked_up)


def test_muon_trains(compressor):
    config = dataclasses.replace(TRAIN, optimizer="muon", steps=30, lr=1e-2, eval_every=0, checkpoint_every=0)
    losses = _trainer(compressor, None, train_config=config).train()
    assert np.mean(losses[-3:]) < losses[0] - 0.5  # measured: 6.95 -> 5.9


def test_learning_rate_schedules():
    cosine = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(cosine, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(cosine, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 60) == pytest.approx(0.55)
    assert lr_factor(cosine, 110) == pytest.approx(0.1)
    step = dataclasses.replace(cosine, schedule="step")
    assert [lr_factor(step, s) for s in (50, 89, 90, 99, 100, 109)] == pytest.approx(
        [1, 1, 0.316, 0.316, 0.316**2, 0.316**2]
    )
    assert lr_factor(dataclasses.replace(cosine, schedule="constant"), 100) == 1.0


def test_train_config_validation():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="optimizer: expected 'adamw' or 'muon', got 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="steps: must be >= 1, got 0"):
        TrainConfig(steps=0)
