"""Parameter accounting against the built modules, and the iso-parameter allocation builder."""

from __future__ import annotations

import dataclasses

import pytest

from engram import EngramConfig
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.model.accounting import allocate, count_parameters, estimate_parameters

ENGRAM = EngramConfig(
    layer_ids=[1, 3], max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=32, engram_vocab_size=[503, 601]
)
CONFIGS = [
    ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, ffn_hidden=80),
    ModelConfig(
        vocab_size=300,
        d_model=32,
        n_layers=4,
        n_heads=2,
        ffn_hidden=80,
        tie_embeddings=True,
        moe=MoEConfig(n_routed_experts=6, n_shared_experts=2, top_k=3, expert_hidden=24),
        n_dense_layers=1,
    ),
    ModelConfig(
        vocab_size=300,
        d_model=32,
        n_layers=4,
        n_heads=4,
        moe=MoEConfig(n_routed_experts=5, top_k=1, expert_hidden=16, n_shared_experts=0),
        engram=ENGRAM,
        n_branches=3,
    ),
    ModelConfig(vocab_size=300, d_model=32, n_layers=4, n_heads=4, engram=dataclasses.replace(ENGRAM, kernel_size=2)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["dense", "moe_tied", "engram_moe_3_branches", "engram_dense"])
def test_estimate_matches_the_built_modules(config):
    built = EngramLM(config)
    counted = count_parameters(built)
    assert estimate_parameters(config) == counted
    # Independent of both: every parameter tensor of the module, split by hand.
    everything = sum(p.numel() for p in built.parameters())
    assert counted.total + counted.embedding == everything
    if config.engram is not None:
        tables = sum(engram.table.weight.numel() for engram in built.engram_layers().values())
        assert counted.engram_tables == tables
        assert counted.sparse >= tables - sum(e.n_heads * e.table.dim for e in built.engram_layers().values())


def test_active_parameters_of_an_moe_count_top_k_experts():
    config = CONFIGS[1]
    counts = estimate_parameters(config)
    per_expert = 3 * 32 * 24
    moe_layers = 3
    assert counts.routed_experts == moe_layers * 6 * per_expert
    assert counts.sparse == moe_layers * (6 - 3) * per_expert


BASE = ModelConfig(
    vocab_size=1000,
    d_model=64,
    n_layers=4,
    n_heads=4,
    n_dense_layers=1,
    moe=MoEConfig(n_routed_experts=32, top_k=2, expert_hidden=32),
)
TEMPLATE = EngramConfig(layer_ids=[1], n_embed_per_ngram=64, n_head_per_ngram=4)


@pytest.mark.parametrize("rho", [1.0, 0.9, 0.75, 0.5, 0.25])
def test_allocation_keeps_totals_within_one_percent(rho):
    allocation = allocate(BASE, rho, TEMPLATE)
    moe, eng = allocation.moe_counts, allocation.engram_counts
    assert abs(allocation.total_mismatch) < 0.01
    assert moe == estimate_parameters(BASE) and eng == estimate_parameters(allocation.engram)
    # Only the expert count and the table sizes change.
    changed = {k for k, v in allocation.engram.to_dict().items() if v != BASE.to_dict()[k]}
    assert changed <= {"moe", "engram"}
    if rho == 1.0:
        assert allocation.engram == BASE
        return
    assert dataclasses.replace(allocation.engram.moe, n_routed_experts=32) == BASE.moe
    expected_experts = 2 + round(rho * moe.sparse / (3 * 64 * 32 * 3))
    assert allocation.engram.moe.n_routed_experts == expected_experts
    # Engram (tables and projections) takes (1 - rho) of the sparse budget, up to rounding the expert
    # count (half an expert in each MoE layer) and the router rows that go with it.
    one_expert_everywhere = (3 * 64 * 32 + 64) * 3
    assert eng.engram_tables + eng.engram_dense == pytest.approx((1 - rho) * moe.sparse, abs=one_expert_everywhere)
    assert allocation.engram.engram.engram_vocab_size[0] > 2


def test_allocation_errors():
    with pytest.raises(ValueError, match="pure MoE"):
        allocate(CONFIGS[0], 0.5, TEMPLATE)
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
        allocate(BASE, 0.0, TEMPLATE)
    with pytest.raises(ValueError, match="no room for Engram tables"):
        allocate(BASE, 0.999, TEMPLATE)


@pytest.mark.parametrize("rho", [0.9, 0.75, 0.5])
def test_total_and_active_allocation_matches_both_counts(rho):
    allocation = allocate(BASE, rho, TEMPLATE, match="total_and_active")
    moe, eng = allocation.moe_counts, allocation.engram_counts
    # Counted on the built models, independently of the estimate the allocation used.
    assert count_parameters(EngramLM(allocation.engram)) == eng
    assert count_parameters(EngramLM(allocation.moe)) == moe
    assert abs(allocation.total_mismatch) < 0.01
    one_unit = 3 * BASE.d_model  # one hidden unit of the one dense FFN
    assert abs(eng.active - moe.active) <= one_unit / 2
    # Only the dense FFN width pays: the experts are those of the total-only allocation.
    total_only = allocate(BASE, rho, TEMPLATE)
    assert allocation.engram.moe == total_only.engram.moe
    assert allocation.engram.ffn_hidden < BASE.ffn_hidden
    assert eng.active < total_only.engram_counts.active
    # The control without tables keeps the Engram model's backbone exactly.
    control = allocation.experts_only
    assert (
        control.engram is None
        and control.moe == allocation.engram.moe
        and control.ffn_hidden == allocation.engram.ffn_hidden
    )


def test_total_and_active_allocation_needs_a_dense_ffn():
    no_dense = dataclasses.replace(BASE, n_dense_layers=0)
    with pytest.raises(ValueError, match="n_dense_layers >= 1"):
        allocate(no_dense, 0.8, TEMPLATE, match="total_and_active")
    with pytest.raises(ValueError, match="match must be"):
        allocate(BASE, 0.8, TEMPLATE, match="active")
