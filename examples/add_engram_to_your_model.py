"""Add Engram to your own PyTorch model in a few lines.

The model below is a stand-in for yours: a tiny pre-norm Transformer written from scratch (token and
position embeddings, blocks of causal self-attention and an MLP, an LM head). Nothing in it knows
about Engram except one line in ``Block.forward``. The Engram part takes four steps:

1. ``EngramConfig``: which of your blocks get a memory, how many n-gram orders and hash heads, how
   wide the rows are and how large the tables are;
2. ``EngramIndexer(config, CompressedTokenizer())``: tokenizer compression (DeepSeek-V3 by default,
   offline) and n-gram hashing, from the raw token ids your tokenizer produces to table rows;
3. ``Engram(config, layer_id, hidden_size)``: the layer, built plainly into your model, then
   ``place_tables(model, StorageConfig())``: its table stays a ``DeviceTable`` on the device and now
   produces sparse gradients (only the looked-up rows); ``StorageConfig(tier="host")`` or
   ``"disk"`` would move it off the device, and a process group would shard it;
4. in the block, ``h = h + engram(h, hash_ids=...)`` before attention, and an optimizer pair:
   ``engram.training.RowAdam`` for the table (5x the learning rate, no weight decay, as in the
   paper; it updates only the looked-up rows, in whatever tier the table is) and AdamW for
   everything else (AdamW cannot take sparse gradients).

The script then trains the model for a few dozen steps on a few sentences and prints the loss, the
Engram gate (how much memory the hidden state lets in) before and after, the loss with Engram
switched off, and what the sparse table gradient looks like. A few seconds on 2 CPU cores.

Run: python examples/add_engram_to_your_model.py [--steps 60]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from engram import CompressedTokenizer, Engram, EngramConfig, EngramIndexer
from engram.storage import StorageConfig, place_tables
from engram.training import RowAdam

TEXT = (
    "Alexander the Great was a king of Macedon. As a boy, Alexander the Great tamed the horse Bucephalus, "
    "which was afraid of its own shadow: he turned the horse toward the sun. By the way, the horse Bucephalus "
    "carried Alexander the Great into many battles, and when the horse Bucephalus died, Alexander the Great "
    "named a city after it. By the way, the city of Alexandria in Egypt was also named after Alexander the Great."
)


# --- your model (nothing Engram-specific except the marked line) -------------------------------
class Block(nn.Module):
    """Pre-norm Transformer block; ``engram`` (optional) adds the memory to the residual stream first."""

    def __init__(self, d_model: int, n_heads: int, engram: Engram | None = None):
        super().__init__()
        self.engram = engram
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, h: torch.Tensor, hash_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.engram is not None and hash_ids is not None:
            h = h + self.engram(h, hash_ids=hash_ids)  # <- Engram, before attention (the one new line)
        x = self.attn_norm(h)
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).triu(1)
        h = h + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        return h + self.mlp(self.mlp_norm(h))


class TinyLM(nn.Module):
    """Embeddings, blocks, LM head. ``engrams`` maps a block index to the Engram module it carries."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int, engrams=None):
        super().__init__()
        engrams = engrams or {}
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, engrams.get(i)) for i in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, hash_ids: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, T, V); ``hash_ids`` None runs the model without its memory."""
        h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for i, block in enumerate(self.blocks):
            h = block(h, None if hash_ids is None else hash_ids.get(i))
        return self.head(self.norm(h))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate; the table gets 5x")
    args = parser.parse_args()
    torch.manual_seed(0)

    # Raw token ids from the tokenizer (DeepSeek-V3 here: Engram's compression is built for it).
    tokenizer = CompressedTokenizer()  # offline; compression table cached in ~/.cache/engram
    raw = torch.tensor([tokenizer.encode(TEXT)])  # (1, T+1) raw tokenizer ids
    # Your model may use any vocabulary of its own; to stay small, this one knows only the ids of the
    # text. Engram does not care: it always hashes the tokenizer's raw ids.
    vocabulary = sorted(set(raw[0].tolist()))
    ids = torch.tensor([[vocabulary.index(t) for t in raw[0].tolist()]])  # (1, T+1) model ids
    inputs, targets = ids[:, :-1], ids[:, 1:]
    print(f"text: {raw.shape[1]} DeepSeek-V3 tokens, {len(vocabulary)} distinct (the model's vocabulary)")

    # --- the Engram part -------------------------------------------------------------------------
    d_model, engram_block = 64, 1
    config = EngramConfig(
        layer_ids=[engram_block],  # block 1 of 2 gets the memory
        max_ngram_size=3,  # 2-grams and 3-grams
        n_head_per_ngram=4,  # 4 hash heads per order: 8 rows per token
        n_embed_per_ngram=64,  # 4 heads x 16 dims per order; d_mem = 2 x 64 = 128
        engram_vocab_size=[20_000, 20_000],  # base table size per order (the heads take distinct primes above)
    )
    indexer = EngramIndexer(config, tokenizer)  # raw ids -> canonical ids -> rows, for every Engram layer
    rows, dim = Engram.table_shape(config, engram_block)
    # The layer builds its table plainly: a DeviceTable (an nn.Parameter behind the TableStorage interface,
    # rows drawn on first use) with dense gradients. Placement, a step of its own after the model is built,
    # decides where it lives and turns on sparse gradients, which RowAdam needs (AdamW cannot take them).
    engram_layer = Engram(config, engram_block, hidden_size=d_model)
    model = TinyLM(len(vocabulary), d_model, n_layers=2, n_heads=4, max_len=256, engrams={engram_block: engram_layer})
    place_tables(model, StorageConfig(tier="device"), sparse_grad=True)
    table = engram_layer.table

    # Rows depend only on the ids: compute them once, ahead of the forward pass (a data loader could).
    hash_ids = indexer(raw[:, :-1])  # {1: (B, T, 8) int64}, from the raw ids of the inputs
    print(f"Engram at block {engram_block}: table {type(table).__name__} of {rows:,} rows x {dim} dims")
    print(f"  heads' prime table sizes {engram_layer.head_sizes}")
    print(f"  hash ids {tuple(hash_ids[engram_block].shape)} = (B, T, (N-1)*K)")

    # Two optimizers: Adam on the looked-up rows of the table (its state lives beside the table, in its tier),
    # AdamW on everything else (a device table's weight is a parameter of the model, but not AdamW's).
    table_params = {id(p) for p in table.parameters()}
    dense = [p for p in model.parameters() if id(p) not in table_params]
    table_optimizer = RowAdam([table], lr=5 * args.lr, betas=(0.9, 0.95))
    dense_optimizer = torch.optim.AdamW(dense, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def gate_stats() -> str:
        gate = engram_layer.last_gate  # (B, T, M): one scalar gate per position (and branch)
        return f"mean {gate.mean():.3f} (min {gate.min():.3f}, max {gate.max():.3f})"

    engram_layer.record_gates = True  # keep each forward's gate values in engram_layer.last_gate
    losses = []
    for step in range(args.steps):
        loss = loss_of(model(inputs, hash_ids))
        if step == 0:
            print(f"gate at step 0:    {gate_stats()}")
        table_optimizer.zero_grad()
        dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            sparse = table.weight.grad.is_sparse
        # The table's gradient per looked-up row, summed over its lookups: [(table, rows (U,), grad (U, dim))].
        grads = table_optimizer.take_grads()
        if step == 0:
            touched = grads[0][1].numel()
            print(
                f"table gradient: sparse={sparse}, {touched} of {rows:,} rows touched "
                f"({inputs.numel()} positions x {engram_layer.n_heads} heads, repeated n-grams share rows)"
            )
        table_optimizer.step(grads)  # (or step() alone, which takes the gradients itself)
        dense_optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    with torch.no_grad():
        final = loss_of(model(inputs, hash_ids)).item()
        print(f"gate at the end:   {gate_stats()}")
        off = loss_of(model(inputs, hash_ids=None)).item()  # the same model with Engram switched off
    print(f"loss: first step {losses[0]:.3f} -> after training {final:.3f} (decreased: {final < losses[0]})")
    print(f"loss with Engram switched off: {off:.3f} (how much the trained model leans on its memory)")


if __name__ == "__main__":
    main()
