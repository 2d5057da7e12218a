"""``engram inspect``: tokenizer compression and one sentence walked through an Engram layer.

Everything printed is computed: the compression table of the tokenizer, the canonical ids, the
n-grams, the multipliers, the prime table sizes and the per-head row indices of each layer. The
layer's tensor shapes come from a real forward pass of an ``Engram`` module built on PyTorch's
``meta`` device (shapes without memory), so even the demo's 0.66B-parameter tables cost nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engram.cli._options import add_tokenizer_option
from engram.config import EngramConfig
from engram.indexing.compression import CompressedTokenizer, default_tokenizer_path
from engram.indexing.indexer import EngramIndexer
from engram.memory.layer import Engram

DEFAULT_TEXT = "Only Alexander the Great could tame the horse Bucephalus."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="show tokenizer compression and walk one sentence through hashing and an Engram layer",
        description=__doc__.split("\n\n")[0],
    )
    add_tokenizer_option(parser)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="EngramConfig as JSON (default: the published demo configuration)",
    )
    parser.add_argument("--text", default=DEFAULT_TEXT, help="sentence to walk through (default: %(default)r)")
    parser.add_argument("--top", type=int, default=8, help="how many merge groups to list (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=1024, help="backbone hidden size d (default: %(default)s)")
    parser.add_argument("--branches", type=int, default=4, help="residual branches M (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    compressor = CompressedTokenizer(args.tokenizer)
    _print_compression(compressor, args.tokenizer, args.top)
    indexer = EngramIndexer(config, compressor)
    raw = compressor.encode(args.text)
    if not raw:
        raise ValueError("--text produced no tokens; give a non-empty sentence")
    _print_sentence(compressor, indexer, args.text, raw)
    hashes = indexer(torch.tensor([raw]))
    for position, layer_id in enumerate(config.layer_ids):
        _print_layer_hashes(indexer, layer_id, hashes[layer_id], compressor, raw, per_position=position == 0)
    _print_layer_shapes(config, indexer, hashes, args.hidden_size, args.branches)
    return 0


def _load_config(path: Path | None) -> EngramConfig:
    return EngramConfig() if path is None else EngramConfig.load(path)


def _show(text: str, width: int = 0) -> str:
    return repr(text).ljust(width)


def _print_compression(ct: CompressedTokenizer, source: Path | None, top: int) -> None:
    raw, canonical = ct.raw_vocab_size, len(ct)
    print("== Tokenizer compression ==")
    print(f"tokenizer      {source or default_tokenizer_path()}")
    print(f"raw ids        {raw:,}")
    print(f"canonical ids  {canonical:,}  ({100 * (1 - canonical / raw):.3f}% fewer)")
    print("largest merge groups (canonical key <- raw tokens):")
    for cid, members in ct.merge_groups(top=top):
        examples = ", ".join(_show(ct.decode([m])) for m in members[:6])
        more = f", ... (+{len(members) - 6})" if len(members) > 6 else ""
        print(f"  {_show(ct.canonical_key(cid), 10)} {len(members):4d} ids: {examples}{more}")
    print()


def _print_sentence(ct: CompressedTokenizer, indexer: EngramIndexer, text: str, raw: list[int]) -> None:
    canonical = ct(torch.tensor(raw)).tolist()
    print(f"== Sentence: {text!r} ==")
    print(f"pad id {indexer.config.pad_id} (raw) -> {indexer.hasher.pad_id} (canonical)")
    print(f"{'pos':>3}  {'token':<16} {'raw id':>7} {'canonical':>9}  canonical key")
    for pos, (tid, cid) in enumerate(zip(raw, canonical, strict=True)):
        print(f"{pos:>3}  {_show(ct.decode([tid]), 16)} {tid:>7} {cid:>9}  {ct.canonical_key(cid)!r}")
    print()


def _print_layer_hashes(
    indexer: EngramIndexer,
    layer_id: int,
    hashes: torch.Tensor,
    ct: CompressedTokenizer,
    raw: list[int],
    per_position: bool,
) -> None:
    hasher = indexer.hasher
    n_max, heads = hasher.max_ngram_size, hasher.n_head_per_ngram
    print(f"== Layer {layer_id}: hashing ==")
    print(f"multipliers (seed {hasher.seed} + 10007*{layer_id}): {hasher.multipliers(layer_id)}")
    for n, primes in enumerate(hasher.table_sizes[layer_id], start=2):
        print(f"{n}-gram table sizes (primes): {primes}")
    if not per_position:
        print(f"rows of the last position: {hashes[0, -1].tolist()}\n")
        return
    keys = ["<pad>"] * (n_max - 1) + [ct.canonical_key(int(c)) for c in ct(torch.tensor(raw))]
    for pos in range(len(raw)):
        print(f"pos {pos}:")
        for n in range(2, n_max + 1):
            gram = " | ".join(repr(k) if k != "<pad>" else k for k in keys[pos + n_max - n : pos + n_max])
            cols = hashes[0, pos, (n - 2) * heads : (n - 1) * heads].tolist()
            print(f"  {n}-gram [{gram}] -> rows {cols}")
    print()


def _print_layer_shapes(
    config: EngramConfig, indexer: EngramIndexer, hashes: dict[int, torch.Tensor], hidden: int, branches: int
) -> None:
    layer_id = config.layer_ids[0]
    with torch.device("meta"):
        layer = Engram(config, layer_id, hidden_size=hidden, n_branches=branches)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape)

        return hook

    for name, module in [
        ("rows", layer.table),
        ("value", layer.value_proj),
        ("keys", layer.key_proj),
        ("conv", layer.short_conv),
    ]:
        if module is not None:  # the ablation switches leave some modules out
            module.register_forward_hook(record(name))
    batch_ids = hashes[layer_id]
    hidden_states = torch.empty(*batch_ids.shape[:2], branches, hidden, device="meta")
    out = layer(hidden_states, hash_ids=batch_ids.to("meta"))
    table_params = layer.table.num_rows * layer.table.dim
    other = sum(p.numel() for p in layer.parameters()) - table_params
    print(f"== Layer {layer_id}: one forward pass (d={hidden}, M={branches}; meta device, shapes only) ==")
    print(f"input ids           {tuple(batch_ids.shape[:2])}")
    print(f"hash ids            {tuple(batch_ids.shape)}   (N-1)*K = {config.n_heads} heads")
    print(f"retrieved rows      {shapes['rows']}   {config.head_dim} dims per head")
    print(f"memory e            {(*shapes['rows'][:2], config.memory_dim)}   d_mem = {config.memory_dim}")
    if "value" in shapes:
        print(f"value W_V e         {shapes['value']}   shared by all branches")
    if "keys" in shapes:
        print(f"keys W_K^m e        {(*shapes['keys'][:2], branches, hidden)}   one per branch")
        print(f"gated value         {(*shapes['value'][:2], branches, hidden)}   sigmoid gate per branch and position")
    if "conv" in shapes:
        print(f"conv branch         {shapes['conv']}   kernel {config.kernel_size}, dilation {config.max_ngram_size}")
    print(f"output Y            {tuple(out.shape)}   added to the residual stream before attention")
    print(
        f"parameters          table {layer.table.num_rows:,} rows x {layer.table.dim} = {table_params:,}; "
        f"projections, norms, conv {other:,}"
    )
