"""Prefetched sharded lookups in a model, run under torchrun; each rank writes what it computed.

Usage: torchrun --nproc-per-node N tests/distributed/sharded_prefetch.py OUT_DIR

A model with two Engram layers (two sharded tables, both exchanges in flight at once during a
forward pass) is built twice from one seed, its tables sharded in the host tier with prefetch on
and off. Each rank takes its slice of every batch: logits before training, then ``STEPS`` steps of
the tables' RowAdam on the mean loss over the ranks (the dense weights stay fixed), then logits
again. Both copies run on every rank in the same order, so their collectives match. Then the ways a
prefetched lookup can go wrong, each of which must be refused on every rank: other indices, a second
use, an optimizer step between the prefetch and the lookup, a write while a prefetch is outstanding.

It writes ``rank<r>.safetensors``: per copy (``on/``, ``off/``) the logits, the losses, every
table's shard and its Adam state; and ``refused/<case>`` = 1 for each refusal seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from engram import CompressedTokenizer, EngramConfig, EngramIndexer
from engram.data.batches import RandomWindows
from engram.model import EngramLM, ModelConfig
from engram.storage import StorageConfig, place_tables
from engram.training import RowAdam, seed_everything
from tests.corpus import sonnets_tokenizer, sonnets_tokens

CONFIG = ModelConfig(
    vocab_size=1024,
    d_model=32,
    n_layers=2,
    n_heads=2,
    ffn_hidden=64,
    max_seq_len=32,
    engram=EngramConfig(
        layer_ids=[0, 1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16, engram_vocab_size=[997, 1009]
    ),
)
BATCH, LENGTH, STEPS = 4, 32, 3


def build(prefetch: bool) -> EngramLM:
    """The model, its tables in the host tier: sharded over the default group if one is initialised."""
    seed_everything(0)
    indexer = EngramIndexer(CONFIG.engram, CompressedTokenizer(sonnets_tokenizer(), cache_dir=False))
    return place_tables(EngramLM(CONFIG, indexer=indexer), StorageConfig(tier="host", prefetch=prefetch))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The combined batches: ``STEPS`` for training, then one for the logits after it."""
    windows = RandomWindows(sonnets_tokens()[0], BATCH, LENGTH, seed=0)
    return [windows.batch(i) for i in range(STEPS + 1)]


def run(model: EngramLM, parts: list[slice]) -> dict[str, torch.Tensor]:
    """Logits, ``STEPS`` table-only RowAdam steps on the ``parts`` of each batch, logits again.

    A rank passes its own part; one process passes every rank's part, which gives the same mean
    loss over the combined batch. ``losses`` is (STEPS, len(parts)), the logits are the parts'
    concatenated.
    """
    for parameter in model.parameters():  # the dense part stays as built: no DDP needed
        parameter.requires_grad_(False)
    data = batches()
    out = {}
    with torch.no_grad():
        out["logits_before"] = torch.cat([model.eval()(data[-1][0][part]).logits for part in parts])
    optimizer = RowAdam(model.engram_tables(), lr=1e-2)
    losses = []
    model.train()
    for inputs, targets in data[:-1]:
        for part in parts:
            loss = model(inputs[part], targets=targets[part]).loss
            # The mean over the parts: sharded tables average the ranks' gradients themselves, as DDP would.
            (loss / len(parts)).backward()
            losses.append(loss.detach())
        optimizer.step()
    out["losses"] = torch.stack(losses).view(STEPS, len(parts))
    with torch.no_grad():
        out["logits_after"] = torch.cat([model.eval()(data[-1][0][part]).logits for part in parts])
    for i, table in enumerate(model.engram_tables()):
        shard = table.local_shard()
        out[f"table{i}"] = shard.read_rows(torch.arange(shard.num_rows))
        for name in ("exp_avg", "exp_avg_sq"):
            out[f"table{i}_{name}"] = shard.row_states()[name]
    return out


def rank_parts(world: int) -> list[slice]:
    """Each rank's sequences of a combined batch."""
    return [slice(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]


def refusals(model: EngramLM) -> dict[str, torch.Tensor]:
    """Misuses of prefetched lookups, each of which must raise: 1 per refusal seen."""
    table = model.engram_tables()[0]
    generator = torch.Generator().manual_seed(dist.get_rank())
    a, b = (torch.randint(0, table.num_rows, (2, 8, 4), generator=generator) for _ in range(2))
    seen = {}

    def refused(case: str, call, match: str) -> None:
        try:
            call()
        except RuntimeError as error:
            seen[case] = torch.tensor([float(match in str(error))])

    model.train()
    handle = table.prefetch(a)
    refused("other_indices", lambda: table.lookup(b, handle), "another batch")
    table.lookup(a, handle)  # the right indices are still served
    refused("second_use", lambda: table.lookup(a, handle), "used already")

    handle = table.prefetch(a)
    refused("write_while_outstanding", lambda: table.write_rows(torch.tensor([table.start]), table.local.gather(
        torch.tensor([0]))), "outstanding")  # fmt: skip
    table.zero_row_grad()
    table.lookup(b).sum().backward()
    RowAdam([table], lr=1e-2).step()  # rows change after the prefetch of ``a``
    refused("stale_after_step", lambda: table.lookup(a, handle), "optimizer step")
    return {f"refused/{case}": value for case, value in seen.items()}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = {}
    for name, prefetch in (("on", True), ("off", False)):
        model = build(prefetch)
        assert all(table.prefetch_enabled == prefetch for table in model.engram_tables())
        saved |= {f"{name}/{key}": value.contiguous() for key, value in run(model, [rank_parts(world)[rank]]).items()}
    saved |= refusals(build(True))
    save_file(saved, str(out_dir / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
