"""A training checkpoint written at one world size and read at another, under torchrun.

Usage: torchrun --nproc-per-node N tests/distributed/checkpoint_ranks.py save|load FOLDER TIER

save: every rank builds the same model (tied embeddings, one Engram table sharded over the ranks in TIER) and the
trainer's optimizers, takes an AdamW step on seeded gradients, sets every table array (rows and RowAdam state) to
``table_arrays`` (the same whole arrays on every rank, each rank keeping its rows) and saves checkpoint step 1
into FOLDER/checkpoints. Rank 0 writes what was saved, whole, to FOLDER/saved.safetensors.
load: every rank builds the model from another seed, loads that checkpoint and writes what it holds (``held``) to
FOLDER/loaded_rank<r>.safetensors. ``held`` also runs on one process, without torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from engram import EngramConfig
from engram.model import EngramLM, ModelConfig
from engram.storage import StorageConfig, place_tables
from engram.training import TrainConfig, build_optimizers, seed_everything
from engram.training.checkpoint import _local_arrays, _row_range, load_checkpoint, save_checkpoint

ENGRAM = EngramConfig(
    layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, engram_vocab_size=[101, 101], pad_id=0
)
MODEL = ModelConfig(
    vocab_size=50, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=16, engram=ENGRAM, tie_embeddings=True
)
TRAIN = TrainConfig(device="cpu")


def build(tier: str, seed: int) -> tuple[EngramLM, dict]:
    seed_everything(seed)
    model = place_tables(EngramLM(MODEL), StorageConfig(tier=tier, cache_mb=1 if tier == "host" else 0))
    return model, build_optimizers(model, TRAIN)


def table_arrays(model: EngramLM) -> dict[str, torch.Tensor]:
    """Every table array, whole, from a fixed seed (in each array's dtype)."""
    generator = torch.Generator().manual_seed(1)
    arrays = {}
    for layer, engram in model.engram_layers().items():
        for name, local in _local_arrays(engram.table).items():
            shape = (engram.table.num_rows, *local.shape[1:])
            if local.is_floating_point():
                arrays[f"tables/{layer}/{name}"] = torch.randn(shape, generator=generator).to(local.dtype)
            else:
                arrays[f"tables/{layer}/{name}"] = torch.randint(0, 1 << 40, shape, generator=generator).to(local.dtype)
    return arrays


def held(model: EngramLM, optimizers: dict) -> dict[str, torch.Tensor]:
    """What this process holds: dense weights, the AdamW state, the random state and its rows of the table arrays."""
    state = {f"model/{k}": v.clone() for k, v in model.state_dict().items() if ".table." not in k}
    for index, entries in optimizers["adamw"].state_dict()["state"].items():
        state.update({f"adamw/{index}/{key}": value.clone() for key, value in entries.items()})
    state["rng/torch"] = torch.get_rng_state()
    for layer, engram in model.engram_layers().items():
        state.update({f"tables/{layer}/{name}": a.clone() for name, a in _local_arrays(engram.table).items()})
    return state


def load(folder: Path, tier: str) -> dict[str, torch.Tensor]:
    model, optimizers = build(tier, seed=7)
    load_checkpoint(folder / "checkpoints" / "step_00000001", model, optimizers)
    return held(model, optimizers)


def main() -> None:
    mode, folder, tier = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "load":
        save_file(load(folder, tier), folder / f"loaded_rank{rank}.safetensors")
    else:
        model, optimizers = build(tier, seed=0)
        generator = torch.Generator().manual_seed(2)
        for group in optimizers["adamw"].param_groups:
            for param in group["params"]:
                param.grad = torch.randn(param.shape, generator=generator)
        optimizers["adamw"].step()
        whole = table_arrays(model)
        for layer, engram in model.engram_layers().items():
            start, end = _row_range(engram.table)
            for name, local in _local_arrays(engram.table).items():
                local.copy_(whole[f"tables/{layer}/{name}"][start:end])
        saved = {**held(model, optimizers), **whole}
        save_checkpoint(folder / "checkpoints", 1, model, optimizers, TRAIN)
        if rank == 0:
            save_file(saved, folder / "saved.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
