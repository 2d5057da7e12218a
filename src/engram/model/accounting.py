"""Parameter and FLOP accounting as the paper defines it, and the sparsity allocation builder.

The paper's budget excludes the vocabulary embedding and the LM head. ``total`` counts every other
parameter; ``active`` those a token touches (everything dense, ``top_k`` of the routed experts, and
the few Engram table rows it reads); ``sparse = total - active``. The allocation law (claim C3)
splits a fixed sparse budget: a share rho to routed experts, 1 - rho to Engram tables, with the
total and active parameter counts held fixed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from engram.config import EngramConfig
from engram.memory.layer import Engram
from engram.model.config import ModelConfig
from engram.model.lm import EngramLM
from engram.model.moe import MoE

Match = Literal["total", "total_and_active"]


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


def _engram_dense(e: EngramConfig, d: int, m: int) -> int:
    """Parameters of one Engram module besides its table, as its switches build it (hidden size d, M = m).

    docs/definition.md, "Ablation switches and controls": OverEncoding keeps the table alone,
    ``use_gate=False`` drops the key projections and the key/query norms, ``use_conv=False`` the
    convolution and its norm.
    """
    if e.variant == "overencoding":
        return 0
    params = (e.memory_dim + 1) * d  # value projection W_V, b_V
    if e.use_gate:
        params += (e.memory_dim + 1) * m * d + 2 * m * d  # W_K^m, b_K^m; the key and query RMSNorms
    if e.use_conv:
        params += m * d + m * d * e.kernel_size  # the conv's RMSNorm and depthwise taps (no bias)
    return params


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
            layer_table = math.prod(Engram.table_shape(e, layer))
            layer_dense = _engram_dense(e, d, m)
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
    """A pure-MoE model and the Engram model that spends a share ``1 - rho`` of its sparse budget on tables.

    ``match`` says what the allocation held equal: ``"total"`` (total parameters only; the Engram
    model has more active parameters, its projections) or ``"total_and_active"`` (the dense FFN is
    narrowed to pay for them). The mismatch properties report what rounding leaves.
    """

    rho: float
    moe: ModelConfig
    engram: ModelConfig
    moe_counts: ParamCounts
    engram_counts: ParamCounts
    match: Match = "total"

    @property
    def total_mismatch(self) -> float:
        """(Engram total - MoE total) / MoE total."""
        return self.engram_counts.total / self.moe_counts.total - 1

    @property
    def active_mismatch(self) -> float:
        """(Engram active - MoE active) / MoE active."""
        return self.engram_counts.active / self.moe_counts.active - 1

    @property
    def experts_only(self) -> ModelConfig:
        """The Engram model's backbone without its tables: the control that separates memory from fewer experts."""
        return dataclasses.replace(self.engram, engram=None)


def allocate(base: ModelConfig, rho: float, engram: EngramConfig, match: Match = "total") -> Allocation:
    """Split ``base``'s sparse budget: a share ``rho`` to routed experts, the rest to Engram tables.

    ``base`` is the pure-MoE model (rho = 1); its total and active parameters are the budget. The
    Engram model keeps the backbone and ``top_k`` and changes only the number of routed experts and
    the tables' base sizes (taken from ``engram``, whose other fields fix the Engram layers).
    Tables absorb whatever the experts leave of the total, so the total matches up to prime
    rounding. With ``match="total"`` the active count grows by the Engram projections (reported as
    ``active_mismatch``); with ``match="total_and_active"`` the dense FFN layers (``ffn_hidden`` of
    the first ``n_dense_layers`` blocks) are narrowed by as many units as the projections add, so the
    active count matches to within one unit (3 d parameters per dense layer) and the tables grow by
    what the FFN gave up.

    Raises:
        ValueError: ``base`` has no MoE or already has Engram, rho is outside (0, 1], the Engram
            layers' projections alone exceed what the experts leave of the budget, or
            ``match="total_and_active"`` for a model without dense FFN layers to narrow.
    """
    if base.moe is None or base.engram is not None:
        raise ValueError("the base model must be a pure MoE model (moe set, engram None)")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if match not in ("total", "total_and_active"):
        raise ValueError(f"match must be 'total' or 'total_and_active', got {match!r}")
    moe_counts = estimate_parameters(base)
    if rho == 1:
        return Allocation(rho, base, base, moe_counts, moe_counts, match)
    moe_layers = sum(base.uses_moe(layer) for layer in range(base.n_layers))
    # The sparse budget of a pure MoE model is its inactive routed experts: (E - k) experts per layer.
    experts = base.moe.top_k + round(
        rho * moe_counts.sparse / (_swiglu(base.d_model, base.moe.expert_hidden) * moe_layers)
    )
    backbone = dataclasses.replace(base, moe=dataclasses.replace(base.moe, n_routed_experts=experts))
    smallest_tables = dataclasses.replace(engram, engram_vocab_size=[2] * (engram.max_ngram_size - 1))
    if match == "total_and_active":
        backbone = _pay_active_with_dense_ffn(backbone, smallest_tables, moe_counts.active)
    without_tables = estimate_parameters(dataclasses.replace(backbone, engram=smallest_tables))
    table_budget = moe_counts.total - (without_tables.total - without_tables.engram_tables)
    engram_cfg = fit_table_sizes(engram, table_budget, context=f"rho={rho}")
    config = dataclasses.replace(backbone, engram=engram_cfg)
    return Allocation(rho, base, config, moe_counts, estimate_parameters(config), match)


def _pay_active_with_dense_ffn(backbone: ModelConfig, engram: EngramConfig, active_budget: int) -> ModelConfig:
    """``backbone`` with its dense FFNs narrowed so that, with ``engram`` added, it has ``active_budget`` active."""
    dense_layers = sum(not backbone.uses_moe(layer) for layer in range(backbone.n_layers))
    if dense_layers == 0:
        raise ValueError(
            "match='total_and_active' narrows the dense FFN layers to pay for the Engram projections, but this "
            "model has none; set n_dense_layers >= 1 or use match='total'"
        )
    extra = estimate_parameters(dataclasses.replace(backbone, engram=engram)).active - active_budget
    per_unit = _swiglu(backbone.d_model, 1) * dense_layers  # one hidden unit of every dense FFN
    hidden = backbone.ffn_hidden - round(extra / per_unit)
    if hidden < 1:
        raise ValueError(
            f"the Engram projections ({extra:,} active parameters) exceed the dense FFNs' {backbone.ffn_hidden} "
            "hidden units; use smaller Engram layers or match='total'"
        )
    return dataclasses.replace(backbone, ffn_hidden=hidden)


def fit_table_sizes(engram: EngramConfig, budget: int, context: str = "the budget") -> EngramConfig:
    """``engram`` with the largest equal base table size whose tables hold at most ``budget`` parameters.

    The tables' parameter count grows with the base size (primes above it), so a binary search finds it.

    Raises:
        ValueError: even base size 2 exceeds the budget.
    """
    orders = engram.max_ngram_size - 1

    def with_base(size: int) -> EngramConfig:
        return dataclasses.replace(engram, engram_vocab_size=[size] * orders)

    def table_params(size: int) -> int:
        config = with_base(size)
        return sum(math.prod(Engram.table_shape(config, layer)) for layer in config.layer_ids)

    low, high = 2, max(2, budget // (len(engram.layer_ids) * engram.n_heads * engram.head_dim))
    if table_params(low) > budget:
        raise ValueError(f"{context} leaves no room for Engram tables ({budget:,} parameters)")
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if table_params(mid) <= budget else (low, mid - 1)
    return with_base(low)
