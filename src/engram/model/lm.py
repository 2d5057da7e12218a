"""The reference decoder: embedding, pre-norm blocks (Engram, attention, FFN or MoE), LM head.

A block at an Engram layer adds the Engram update to the residual stream before attention, as in
the paper:

    h <- h + Engram(h, hash_ids)       (every branch)
    h <- h + Attention(RMSNorm(h))
    h <- h + FFN_or_MoE(RMSNorm(h))

With M > 1 residual branches the two sublayer residuals are hyper-connections. Shapes: B batch,
T positions, d width, M branches, V vocabulary.

Decoding runs the same forward pass over the new positions only, with a ``DecodeState``
(``model.new_state``): attention reads the keys and values of the past from a KV cache, Engram
hashes the new ids from the last N-1 canonical ids and its short convolution continues from the
normalised inputs of the last (kernel_size-1)*N positions. Everything else (norms, FFN, MoE,
hyper-connections, the head) acts on each position alone and needs no state.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from engram._checks import as_id_tensor, check_id_range, checks_values
from engram.indexing.indexer import EngramIndexer
from engram.memory.layer import Engram
from engram.model.config import ModelConfig
from engram.model.hyper import HyperConnection
from engram.model.layers import CausalSelfAttention, KVCache, Rotary, SwiGLU
from engram.model.moe import MoE
from engram.storage.base import TableStorage
from engram.storage.device import DeviceTable
from engram.storage.prefetch import PendingRows

if TYPE_CHECKING:
    from engram.storage.config import StorageConfig


@dataclass
class LMOutput:
    """logits (B, T, V); loss: mean next-token cross-entropy if targets were given; aux_loss: MoE balance loss.

    hidden_states (with ``output_hidden_states=True``): n_layers + 1 tensors (B, T, d), the embedding
    output (before M > 1 residual branches copy it) and the output of each block (its M branches
    summed, as before the final norm), so ``head(norm(hidden_states[-1]))`` are the logits.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BlockCache:
    """What one block keeps between decoding calls.

    Attributes:
        kv: the attention's keys and values of the positions seen so far.
        conv: the Engram short convolution's state, (B, M*d, (kernel_size-1)*N); ``None`` before
            the first call and in blocks without Engram.
    """

    kv: KVCache
    conv: torch.Tensor | None = None


@dataclass
class DecodeState:
    """Everything ``EngramLM.forward(..., state=...)`` needs from earlier positions; advanced in place.

    Attributes:
        batch_size: B; every call must continue all B sequences.
        capacity: positions the state can hold (prompt plus generated tokens).
        blocks: one ``BlockCache`` per block.
        history: (B, N-1) canonical ids of the last positions, which Engram hashes new ids with;
            ``None`` before the first call and in models without Engram.
    """

    batch_size: int
    capacity: int
    blocks: list[BlockCache]
    history: torch.Tensor | None = None

    @property
    def position(self) -> int:
        """Positions processed so far: the absolute position of the next input id."""
        return self.blocks[0].kv.length


class Block(nn.Module):
    """One Transformer block, with an optional Engram module in front."""

    def __init__(self, config: ModelConfig, index: int, rotary: Rotary):
        super().__init__()
        d, branches = config.d_model, config.n_branches
        self.engram: Engram | None = None
        if config.engram is not None and index in config.engram.layer_ids:
            # A plain table, its rows drawn on first use (its seed now): engram.storage.place_tables moves it.
            rows, dim = Engram.table_shape(config.engram, index)
            table = DeviceTable(rows, dim, init_std=config.engram.table_init_std, sparse_grad=True)
            self.engram = Engram(config.engram, index, d, branches, storage=table)
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.attn = CausalSelfAttention(d, config.n_heads, rotary)
        self.ffn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.ffn = MoE(d, config.moe) if config.uses_moe(index) else SwiGLU(d, config.ffn_hidden)
        self.attn_hc = HyperConnection(branches, 2 * index) if branches > 1 else None
        self.ffn_hc = HyperConnection(branches, 2 * index + 1) if branches > 1 else None

    def forward(
        self,
        h: torch.Tensor,
        hash_ids: torch.Tensor | None,
        cache: BlockCache | None = None,
        prefetched: PendingRows | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """h: (B, T, d) or (B, T, M, d); ``hash_ids`` None skips the Engram module.

        With ``cache`` the T positions continue the cached ones (decoding) and the cache advances.
        ``prefetched``: the Engram rows of ``hash_ids``, fetched ahead (``Engram.prefetch``).
        ``check_ids``: check the values of ``hash_ids`` (False: the model's indexer computed them).
        """
        if self.engram is not None and hash_ids is not None:
            if cache is None:
                h = h + self.engram(h, hash_ids=hash_ids, prefetched=prefetched, check_ids=check_ids)
            else:
                update, cache.conv = self.engram.step(h, hash_ids, cache.conv, prefetched, check_ids=check_ids)
                h = h + update
        kv = None if cache is None else cache.kv
        h = self._residual(h, self.attn_hc, lambda x: self.attn(self.attn_norm(x), kv))
        return self._residual(h, self.ffn_hc, lambda x: self.ffn(self.ffn_norm(x)))

    @staticmethod
    def _residual(h: torch.Tensor, hyper: HyperConnection | None, sublayer) -> torch.Tensor:
        return h + sublayer(h) if hyper is None else hyper(h, sublayer)


class EngramLM(nn.Module):
    """Decoder-only language model; dense, MoE or Engram+MoE depending on ``config``.

    Args:
        config: the architecture.
        indexer: computes Engram row indices from ``input_ids`` when ``forward`` is not given
            ``hash_ids`` (the input ids must then be the indexer's tokenizer ids).

    The Engram tables are built plain: a ``DeviceTable`` per Engram layer, with sparse gradients
    (for the row optimizers), whose rows are drawn from its seed on first use, so a model with
    tables bigger than memory can be built. ``engram.storage.place_tables(model, storage)`` moves
    them to host memory or disk, or shards them over a process group.

    Attributes:
        placement: the ``StorageConfig`` the tables were placed with (``place_tables``); None:
            plain device tables.
    """

    def __init__(self, config: ModelConfig, indexer: EngramIndexer | None = None):
        super().__init__()
        if indexer is not None and indexer.config != config.engram:
            raise ValueError("the indexer was built from a different EngramConfig than config.engram")
        self.config = config
        self.indexer = indexer
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        rotary = Rotary(config.head_dim, config.max_seq_len, config.rope_theta)
        self.placement: StorageConfig | None = None
        self.blocks = nn.ModuleList(Block(config, i, rotary) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_backbone()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.input_vocab_size is not None:
            # Trimmed vocabulary: tokenizer id -> model id (0 = unknown) and back (-1 for unknown).
            self.register_buffer("token_map", torch.zeros(config.input_vocab_size, dtype=torch.long))
            self.register_buffer("output_ids", torch.full((config.vocab_size,), -1, dtype=torch.long))

    @torch.no_grad()
    def set_vocabulary(self, kept_ids: torch.Tensor) -> None:
        """Trim the vocabulary to ``kept_ids`` (the tokenizer ids of model ids 1, 2, ...; id 0 is unknown)."""
        if self.config.input_vocab_size is None:
            raise ValueError("set_vocabulary needs a model built with input_vocab_size (a trimmed vocabulary)")
        kept_ids = as_id_tensor(kept_ids, "kept_ids", ndim=1)
        if kept_ids.numel() != self.config.vocab_size - 1 or kept_ids.unique().numel() != kept_ids.numel():
            raise ValueError(f"kept_ids must hold vocab_size - 1 = {self.config.vocab_size - 1} distinct tokenizer ids")
        check_id_range(kept_ids, 0, self.config.input_vocab_size, "kept_ids")
        device = self.token_map.device
        self.token_map.zero_()
        self.token_map[kept_ids.to(device)] = torch.arange(1, self.config.vocab_size, device=device)
        self.output_ids.fill_(-1)
        self.output_ids[1:] = kept_ids.to(device)

    @property
    def num_input_ids(self) -> int:
        """How many ids ``forward`` reads: ids in ``[0, num_input_ids)``.

        ``input_vocab_size`` (a trimmed vocabulary) or ``vocab_size``, and never more than the
        indexer's tokenizer has when Engram layers hash the ids.
        """
        n_ids = self.config.input_vocab_size or self.config.vocab_size
        if self.indexer is not None and self.engram_layers():
            n_ids = min(n_ids, self.indexer.compressor.raw_vocab_size)
        return n_ids

    def check_input_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> torch.Tensor:
        """Check ids the model is to read: (B, T) integers, B, T >= 1, in ``[0, num_input_ids)``; as int64.

        This is the model's boundary: ``forward`` calls it (unless told ``check_ids=False``) and
        everything after it (indexer, hasher, Engram layers) trusts the ids. One host read of the
        ids' minimum and maximum, a device sync on a GPU.
        """
        input_ids = self._check_input_shape(input_ids, name)
        n_ids, n_model = self.num_input_ids, self.config.input_vocab_size or self.config.vocab_size
        hint = f" of the model's {n_ids} ids" if n_ids == n_model else f" of the tokenizer's {n_ids} raw ids"
        check_id_range(input_ids, 0, n_ids, name, hint)
        return input_ids

    def _checked_ids(self, input_ids: torch.Tensor, check_ids: bool, name: str = "input_ids") -> torch.Tensor:
        """``check_input_ids`` if values are checked (``checks_values(check_ids)``), else the shape check only."""
        if checks_values(check_ids):
            return self.check_input_ids(input_ids, name)
        return self._check_input_shape(input_ids, name)

    @staticmethod
    def _check_input_shape(input_ids: torch.Tensor, name: str) -> torch.Tensor:
        input_ids = as_id_tensor(input_ids, name, ndim=2)
        if 0 in input_ids.shape:
            raise ValueError(f"{name} (B, T) must have B >= 1 and T >= 1, got shape {tuple(input_ids.shape)}")
        return input_ids

    def to_model_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> model ids (identity without a trimmed vocabulary; -100 stays -100)."""
        if self.config.input_vocab_size is None:
            return ids
        return torch.where(ids == -100, ids, self.token_map[ids.clamp(min=0)])

    def to_tokenizer_ids(self, model_ids: torch.Tensor) -> torch.Tensor:
        """Model ids (e.g. sampled tokens) -> tokenizer ids; the unknown id maps to -1."""
        return model_ids if self.config.input_vocab_size is None else self.output_ids[model_ids]

    def _init_backbone(self) -> None:
        """Normal(0, init_std) for every linear and embedding weight (Engram's projections included),
        with the projections that write into the residual stream scaled by 1/sqrt(2L).

        Without this, the Engram value projection keeps PyTorch's default init and its update starts
        an order of magnitude larger than the residual stream it is added to. The Engram tables
        (``table_init_std``) and the zero-initialised convolution keep their own init.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith((".attn.out", ".down", ".value_proj"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # -- structure ----------------------------------------------------------------------------------
    def engram_layers(self) -> dict[int, Engram]:
        """The Engram modules by layer index."""
        return {i: block.engram for i, block in enumerate(self.blocks) if block.engram is not None}

    def engram_tables(self) -> list[TableStorage]:
        """The Engram tables, in layer order (what the sparse row optimizer updates)."""
        return [engram.table for engram in self.engram_layers().values()]

    def reads_ahead(self) -> bool:
        """Whether ``read_ahead`` has anything to do: some Engram table is of a tier that reads ahead (disk)."""
        return any(table.reads_ahead for table in self.engram_tables())

    def read_ahead(self, input_ids: torch.Tensor, check_ids: bool = True) -> list[Future]:
        """Start bringing the Engram rows of a later batch ``input_ids`` (B, T) into memory, in the background.

        Hashes the batch and hands each Engram layer's row indices to its table's ``read_ahead``:
        disk tables ask the kernel for the rows' file pages, so that the batch's own forward pass
        finds them in the page cache (other tiers do nothing, and then nothing is hashed). A hint
        only: no result changes. ``forward(..., read_ahead=next_ids)`` calls this once the current
        batch's rows are queued, which is where it helps most. Returns the tables' background tasks.
        """
        engrams = {i: e for i, e in self.engram_layers().items() if e.table.reads_ahead}
        if not engrams:
            return []
        if self.indexer is None:
            raise ValueError("reading Engram rows ahead needs the model's indexer: build it with indexer=...")
        hash_ids = self.indexer(self._checked_ids(input_ids, check_ids, "read_ahead"), check_ids=False)
        tasks = (engram.read_ahead(hash_ids[i]) for i, engram in engrams.items())
        return [task for task in tasks if task is not None]

    def moe_layers(self) -> list[MoE]:
        """The MoE FFNs, in layer order (read from the blocks, not ``modules()``: a compiled forward
        could not walk the modules after the MoE layers set their ``aux_loss``)."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """One loss-free balancing step for every MoE layer (call after each optimizer step)."""
        for moe in self.moe_layers():
            moe.update_bias()

    # -- decoding -----------------------------------------------------------------------------------
    def new_state(self, batch_size: int, capacity: int | None = None) -> DecodeState:
        """An empty decoding state for ``batch_size`` sequences of up to ``capacity`` positions.

        ``capacity`` defaults to ``max_seq_len``; the KV caches are allocated for it on first use,
        (B, n_heads, capacity, head_dim) keys and values per block.
        """
        capacity = self.config.max_seq_len if capacity is None else capacity
        if batch_size < 1 or not 1 <= capacity <= self.config.max_seq_len:
            raise ValueError(
                f"need batch_size >= 1 and 1 <= capacity <= max_seq_len={self.config.max_seq_len}, "
                f"got {batch_size} and {capacity}"
            )
        return DecodeState(batch_size, capacity, [BlockCache(KVCache(capacity)) for _ in self.blocks])

    def _check_continues(
        self, state: DecodeState, input_ids: torch.Tensor, hash_ids: dict[int, torch.Tensor] | None
    ) -> None:
        """Raise unless ``input_ids`` (B, T) can continue ``state``; before anything in it changes."""
        if hash_ids is not None:
            raise ValueError("with a decoding state the Engram row indices come from its history: pass no hash_ids")
        batch, length = input_ids.shape
        if batch != state.batch_size or length == 0:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} cannot continue a decoding state of "
                f"{state.batch_size} sequences (need ({state.batch_size}, T >= 1))"
            )
        if state.position + length > state.capacity:
            raise ValueError(
                f"the decoding state holds {state.capacity} positions: {state.position} are used, "
                f"{length} more do not fit"
            )
        if self.engram_layers() and self.indexer is None:
            raise ValueError("decoding a model with Engram layers needs its indexer: build it with indexer=...")

    def _step_hash_ids(self, input_ids: torch.Tensor, state: DecodeState) -> dict[int, torch.Tensor]:
        """Engram row indices of the new positions ``input_ids`` (B, T), checked by the caller; advances
        the state's history (its own, so valid)."""
        if not self.engram_layers():
            return {}
        hash_ids, state.history = self.indexer.hash_step(input_ids, state.history, check_ids=False)
        return hash_ids

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        hash_ids: dict[int, torch.Tensor] | None = None,
        engram_enabled: bool = True,
        state: DecodeState | None = None,
        output_hidden_states: bool = False,
        check_ids: bool = True,
        read_ahead: torch.Tensor | None = None,
    ) -> LMOutput:
        """Logits over model ids (and loss) for ``input_ids`` (B, T).

        Args:
            input_ids: (B, T) tokenizer ids in ``[0, input_vocab_size or vocab_size)``; Engram hashes
                these, the embedding reads their model ids.
            targets: optional (B, T) next tokenizer ids; -100 marks positions without a target.
            hash_ids: precomputed Engram row indices ``{layer: (B, T, H)}``; computed with the
                indexer when omitted.
            engram_enabled: False zeroes every Engram module's output (the sensitivity analysis).
            state: decoding. ``input_ids`` continue the sequences of this state (``new_state``),
                which advances in place, and the logits are those of the new positions, equal to the
                last T positions of a forward pass over the whole sequences. Engram's row indices
                come from the indexer and the state's history (pass no ``hash_ids``); keep
                ``engram_enabled`` the same for the whole sequence. For inference (no gradient).
            output_hidden_states: also return the embedding output and every block's output
                (``LMOutput.hidden_states``), for analysis.
            check_ids: check the values of ``input_ids`` (``check_input_ids``) and of given
                ``hash_ids``: host reads, each a device sync on a GPU. The ids are checked here
                once, not again by the indexer, hasher or layers. ``False`` for callers whose ids
                are valid already (the ``Trainer`` checks its batches on the host, ``generate`` its
                prompt); shapes and dtypes are always checked. Value checks are also skipped while
                ``torch.compile`` traces the model; ``engram.set_debug_checks(True)`` turns every
                check (the inner ones too) back on.
            read_ahead: the next batch's ids (B', T'), if known: once this batch's rows are queued,
                ``read_ahead(read_ahead)`` starts reading the next batch's rows of disk tables into
                the page cache while this batch computes. No result changes; not with ``state``.
        """
        input_ids = self._checked_ids(input_ids, check_ids)
        if read_ahead is not None:
            if state is not None:
                raise ValueError("read_ahead is for whole batches, not decoding steps: pass no read_ahead with a state")
            read_ahead = self._checked_ids(read_ahead, check_ids, "read_ahead")
        check_hash_ids = check_ids and hash_ids is not None  # computed by the indexer, they are in range
        engrams = self.engram_layers() if engram_enabled else {}
        if state is not None:
            self._check_continues(state, input_ids, hash_ids)
            hash_ids = self._step_hash_ids(input_ids, state)
        elif engrams and hash_ids is None:
            if self.indexer is None:
                raise ValueError("this model has Engram layers: pass hash_ids or build it with indexer=...")
            hash_ids = self.indexer(input_ids, check_ids=False)
        missing = sorted(set(engrams) - set(hash_ids or {}))
        if missing:
            raise ValueError(f"hash_ids lacks Engram layers {missing}")

        h = self.embed(self.to_model_ids(input_ids))  # (B, T, d)
        hidden_states = [h] if output_hidden_states else None
        if self.config.n_branches > 1:
            h = h.unsqueeze(2).expand(-1, -1, self.config.n_branches, -1)  # (B, T, M, d)
        # Row indices depend on the ids only: start every Engram layer's table reads now, so tables off
        # the device are read while the layers in front compute (a no-op for device tables). Sharded
        # tables start their collective exchange here, in layer order on every rank.
        prefetched = {i: engram.prefetch(hash_ids[i]) for i, engram in engrams.items()}
        if read_ahead is not None and engrams:  # queued after this batch's fetches: they go first
            self.read_ahead(read_ahead, check_ids=False)
        caches = [None] * len(self.blocks) if state is None else state.blocks
        for i, (block, cache) in enumerate(zip(self.blocks, caches, strict=True)):
            h = block(h, hash_ids[i] if i in engrams else None, cache, prefetched.get(i), check_hash_ids)
            if hidden_states is not None:
                hidden_states.append(h.sum(dim=2) if self.config.n_branches > 1 else h)
        if self.config.n_branches > 1:
            h = h.sum(dim=2)
        logits = self.head(self.norm(h))

        loss = None
        if targets is not None:
            targets = as_id_tensor(targets, "targets", ndim=2)
            if targets.shape != input_ids.shape:
                raise ValueError(
                    f"targets shape {tuple(targets.shape)} differs from input_ids {tuple(input_ids.shape)}"
                )
            targets = self.to_model_ids(targets)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        return LMOutput(logits, loss, aux_loss, None if hidden_states is None else tuple(hidden_states))
