"""Parameter and FLOP accounting as the paper defines it, and the sparsity allocation builder.

The paper's budget excludes the vocabulary embedding and the LM head. ``total`` counts every other
parameter; ``active`` those a token touches (everything dense, ``top_k`` of the routed experts, and
the few Engram table rows it reads); ``sparse = total - active``. The allocation law (claim C3)
splits a fixed sparse budget: a share rho to routed experts, 1 - rho to Engram tables, with the
total and active parameter counts held fixed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engram.config import EngramConfig
from engram.hashing.primes import engram_table_sizes
from engram.model.config import ModelConfig
from engram.model.lm import EngramLM
from engram.model.moe import MoE


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model (embedding and LM head excluded unless named)."""

    total: int
    active: int
    routed_experts: int
    engram_tables: int
    engram_dense: int
    embedding: int
    flops_per_token: int

    @property
    def sparse(self) -> int:
        return self.total - self.active


def _swiglu(d: int, hidden: int) -> int:
    return 3 * d * hidden


def estimate_parameters(config: ModelConfig, seq_len: int | None = None) -> ParamCounts:
    """Counts from the config alone (no model is built, so any size is cheap).

    ``flops_per_token`` is the forward cost at ``seq_len`` (default ``max_seq_len``): two FLOPs per
    active weight, the LM head, and the attention scores and weighted sum over the causal context
    (on average ``seq_len / 2`` positions).
    """
    d, m = config.d_model, config.n_branches
    seq_len = config.max_seq_len if seq_len is None else seq_len
    total = active = routed = tables = engram_dense = 0
    for layer in range(config.n_layers):
        dense = 4 * d * d + 2 * d  # attention q, k, v, out; two RMSNorms
        if m > 1:
            dense += 2 * (m * m + 2 * m)  # two hyper-connections
        if config.uses_moe(layer):
            moe = config.moe
            dense += d * moe.n_routed_experts + _swiglu(d, moe.n_shared_experts * moe.expert_hidden)
            layer_routed = moe.n_routed_experts * _swiglu(d, moe.expert_hidden)
            routed += layer_routed
            active += moe.top_k * _swiglu(d, moe.expert_hidden)
            total += layer_routed
        else:
            dense += _swiglu(d, config.ffn_hidden)
        if config.engram is not None and layer in config.engram.layer_ids:
            e = config.engram
            sizes = engram_table_sizes(e.layer_ids, e.max_ngram_size, e.n_head_per_ngram, e.engram_vocab_size)[layer]
            layer_table = sum(p for order in sizes for p in order) * e.head_dim
            layer_dense = (e.memory_dim + 1) * d * (1 + m) + 3 * m * d + m * d * e.kernel_size
            tables += layer_table
            engram_dense += layer_dense
            dense += layer_dense
            total += layer_table
            active += e.n_heads * e.head_dim  # the rows a token reads
        total += dense
        active += dense
    total += d  # final norm
    active += d
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    head = config.vocab_size * d
    flops = 2 * (active + head) + 2 * config.n_layers * seq_len * d  # QK^T and AV over seq_len/2 on average
    return ParamCounts(total, active, routed, tables, engram_dense, embedding, flops)


def count_parameters(model: EngramLM) -> ParamCounts:
    """Counts read off a built model's modules (independent of ``estimate_parameters``)."""
    config = model.config
    embedding_ids = {id(model.embed.weight), id(model.head.weight)}
    embedding = sum(p.numel() for p in {id(p): p for p in (model.embed.weight, model.head.weight)}.values())
    total = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    engrams = model.engram_layers().values()
    tables = sum(engram.table.weight.numel() for engram in engrams)
    engram_all = sum(p.numel() for engram in engrams for p in engram.parameters())
    rows_read = sum(engram.n_heads * engram.table.dim for engram in engrams)
    routed = inactive_routed = 0
    for moe in (module for module in model.modules() if isinstance(module, MoE)):
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        routed += per_expert * len(moe.experts)
        inactive_routed += per_expert * (len(moe.experts) - moe.config.top_k)
    active = total - inactive_routed - tables + rows_read
    head = model.head.weight.numel()
    flops = 2 * (active + head) + 2 * config.n_layers * config.max_seq_len * config.d_model
    return ParamCounts(total, active, routed, tables, engram_all - tables, embedding, flops)


@dataclass(frozen=True)
class Allocation:
    """A pure-MoE model and the Engram model that spends a share ``1 - rho`` of its sparse budget on tables."""

    rho: float
    moe: ModelConfig
    engram: ModelConfig
    moe_counts: ParamCounts
    engram_counts: ParamCounts

    @property
    def total_mismatch(self) -> float:
        """(Engram total - MoE total) / MoE total."""
        return self.engram_counts.total / self.moe_counts.total - 1

    @property
    def active_mismatch(self) -> float:
        """(Engram active - MoE active) / MoE active."""
        return self.engram_counts.active / self.moe_counts.active - 1


def allocate(base: ModelConfig, rho: float, engram: EngramConfig) -> Allocation:
    """Split ``base``'s sparse budget: a share ``rho`` to routed experts, the rest to Engram tables.

    ``base`` is the pure-MoE model (rho = 1); its total and active parameters are the budget. The
    Engram model keeps the backbone and ``top_k`` and changes only the number of routed experts and
    the tables' base sizes (taken from ``engram``, whose other fields fix the Engram layers).
    Tables absorb whatever the experts leave of the total, so the total matches up to prime
    rounding; the active count grows by the Engram projections (reported as ``active_mismatch``).

    Raises:
        ValueError: ``base`` has no MoE or already has Engram, rho is outside (0, 1], or the
            Engram layers' projections alone exceed what the experts leave of the budget.
    """
    if base.moe is None or base.engram is not None:
        raise ValueError("the base model must be a pure MoE model (moe set, engram None)")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    moe_counts = estimate_parameters(base)
    if rho == 1:
        return Allocation(rho, base, base, moe_counts, moe_counts)
    moe_layers = sum(base.uses_moe(layer) for layer in range(base.n_layers))
    # The sparse budget of a pure MoE model is its inactive routed experts: (E - k) experts per layer.
    experts = base.moe.top_k + round(
        rho * moe_counts.sparse / (_swiglu(base.d_model, base.moe.expert_hidden) * moe_layers)
    )
    moe_cfg = dataclasses.replace(base.moe, n_routed_experts=experts)
    smallest_tables = dataclasses.replace(engram, engram_vocab_size=[2] * (engram.max_ngram_size - 1))
    without_tables = estimate_parameters(dataclasses.replace(base, moe=moe_cfg, engram=smallest_tables))
    table_budget = moe_counts.total - (without_tables.total - without_tables.engram_tables)

    def table_params(base_size: int) -> int:
        sizes = engram_table_sizes(
            engram.layer_ids, engram.max_ngram_size, engram.n_head_per_ngram, [base_size] * (engram.max_ngram_size - 1)
        )
        return sum(p for layer in sizes.values() for order in layer for p in order) * engram.head_dim

    # The largest base size whose prime tables fit the budget (the prime sum grows with the base).
    low, high = 2, max(2, table_budget // (len(engram.layer_ids) * engram.n_heads * engram.head_dim))
    if table_params(low) > table_budget:
        raise ValueError(f"rho={rho} leaves no room for Engram tables ({table_budget} parameters)")
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if table_params(mid) <= table_budget else (low, mid - 1)
    engram_cfg = dataclasses.replace(engram, engram_vocab_size=[low] * (engram.max_ngram_size - 1))
    config = dataclasses.replace(base, moe=moe_cfg, engram=engram_cfg)
    return Allocation(rho, base, config, moe_counts, estimate_parameters(config))
