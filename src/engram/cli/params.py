"""``engram params``: parameter and FLOP accounting, and the iso-parameter allocation builder."""

from __future__ import annotations

import argparse
from pathlib import Path

from engram._json_config import option_type
from engram.config import EngramConfig
from engram.model.accounting import ParamCounts, allocate, estimate_parameters
from engram.model.config import ModelConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "params",
        help="count total, active and sparse parameters and FLOPs; build iso-parameter Engram allocations",
        description="Parameters as the paper counts them (vocabulary embedding and LM head excluded). "
        "With --rho, split the sparse budget of a pure-MoE model between routed experts (rho) and Engram "
        "tables (1 - rho) at equal total parameters.",
    )
    parser.add_argument("--config", type=Path, required=True, help="ModelConfig JSON")
    parser.add_argument(
        "--seq-len", type=option_type(int, ge=1), default=None, help="context for the FLOP count (default: max_seq_len)"
    )
    parser.add_argument(
        "--rho",
        type=option_type(float, gt=0, le=1),
        default=None,
        help="share of the sparse budget kept by routed experts, in (0, 1]",
    )
    parser.add_argument(
        "--engram",
        type=Path,
        default=None,
        help="EngramConfig JSON fixing the Engram layers for --rho (its table sizes are replaced)",
    )
    parser.add_argument(
        "--match",
        choices=("total", "total_and_active"),
        default="total",
        help="with --rho: hold only the total equal (default), or the active count too by narrowing the dense FFN",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the allocated Engram ModelConfig here (JSON)")
    parser.set_defaults(run=run)


def _rows(counts: ParamCounts) -> list[tuple[str, int]]:
    return [
        ("total (excl. embedding, head)", counts.total),
        ("active per token", counts.active),
        ("sparse (total - active)", counts.sparse),
        ("routed experts", counts.routed_experts),
        ("Engram tables", counts.engram_tables),
        ("Engram projections, norms, conv", counts.engram_dense),
        ("embedding + LM head", counts.embedding),
        ("forward FLOPs per token", counts.flops_per_token),
    ]


def _print_table(columns: dict[str, ParamCounts]) -> None:
    print(f"{'':34}" + "".join(f"{name:>18}" for name in columns))
    for cells in zip(*(_rows(counts) for counts in columns.values()), strict=True):
        print(f"{cells[0][0]:34}" + "".join(f"{value:>18,}" for _, value in cells))


def run(args: argparse.Namespace) -> int:
    config = ModelConfig.load(args.config)
    if args.rho is None:
        _print_table({args.config.stem: estimate_parameters(config, args.seq_len)})
        return 0
    if args.engram is None:
        raise ValueError("--rho needs --engram, an EngramConfig JSON that fixes the Engram layers")
    template = EngramConfig.load(args.engram)
    allocation = allocate(config, args.rho, template, match=args.match)
    _print_table({"pure MoE": allocation.moe_counts, f"Engram, rho={args.rho:g}": allocation.engram_counts})
    print(f"\nrouted experts per MoE layer: {config.moe.n_routed_experts} -> {allocation.engram.moe.n_routed_experts}")
    if allocation.engram.engram is not None:
        print(f"Engram base table sizes: {allocation.engram.engram.engram_vocab_size}")
    if allocation.engram.ffn_hidden != config.ffn_hidden:
        narrowed = f"{config.ffn_hidden} -> {allocation.engram.ffn_hidden}"
        print(f"dense FFN width (pays for the Engram projections): {narrowed}")
    total, active = 100 * allocation.total_mismatch, 100 * allocation.active_mismatch
    print(f"total mismatch {total:+.3f}%, active mismatch {active:+.3f}%")
    if args.out is not None:
        args.out.write_text(allocation.engram.to_json() + "\n")
        print(f"wrote {args.out}")
    return 0
