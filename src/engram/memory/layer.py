"""The Engram layer: hashed n-gram lookup, context gate, short convolution (docs/definition.md, "The layer").

Shapes: B batch, T positions, M residual branches, d hidden size, H = (N-1)*K heads,
h = head width, d_mem = H*h.

    e      = concat_heads(table[hash_ids + offsets])        (B, T, d_mem)
    v      = W_V e                                           (B, T, d)      one projection for all branches
    k^m    = W_K^m e                                         (B, T, M, d)
    s^m    = <RMSNorm_q^m(h^m), RMSNorm_k^m(k^m)> / sqrt(d)  (B, T, M)
    alpha  = sigmoid(sign(s) sqrt(|s|))  or sigmoid(s)       (B, T, M)
    v~^m   = alpha^m v                                       (B, T, M, d)
    Y      = v~ + SiLU(Conv1D(RMSNorm(v~)))                  (B, T, M, d)

The layer returns Y; the block adds it to the residual stream before attention. Only the short
convolution reaches back in time, so decoding (``step``) carries its state and nothing else.

The ablation switches of ``EngramConfig`` (docs/definition.md, "Ablation switches and controls")
fix alpha to 1 (``use_gate=False``: no key projection, no key/query norms), drop the convolution
(``use_conv=False``: Y = v~), or make the module OverEncoding (``variant="overencoding"``: the
table alone, Y = (sum_n e_n - (N-1) h) / N with e_n (B, T, d) order n's rows).
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import torch
from torch import nn

from engram._checks import as_id_tensor, checks_values
from engram.config import EngramConfig
from engram.indexing.indexer import EngramIndexer, engram_head_sizes
from engram.memory.conv import BranchRMSNorm, ShortConv
from engram.storage.base import TableStorage
from engram.storage.device import DeviceTable
from engram.storage.prefetch import PendingRows


class Engram(nn.Module):
    """Conditional memory for one backbone layer.

    Args:
        config: shared Engram hyper-parameters.
        layer_id: which of ``config.layer_ids`` this module serves (selects its primes and hash).
        hidden_size: d, the backbone's hidden size.
        n_branches: M residual branches (hyper-connections); 1 for a plain residual stream.
        indexer: optional ``EngramIndexer``; needed only to call ``forward`` with raw ``input_ids``.
        storage: the table; defaults to a ``DeviceTable`` of ``sum(head sizes)`` rows of width
            ``config.head_dim``. Any ``TableStorage`` of that shape works (host, disk, sharded).
    """

    def __init__(
        self,
        config: EngramConfig,
        layer_id: int,
        hidden_size: int,
        n_branches: int = 1,
        indexer: EngramIndexer | None = None,
        storage: TableStorage | None = None,
    ):
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ValueError(f"layer_id {layer_id} is not in config.layer_ids {config.layer_ids}")
        if hidden_size < 1 or n_branches < 1:
            raise ValueError(f"hidden_size and n_branches must be >= 1, got {hidden_size} and {n_branches}")
        if config.variant == "overencoding" and hidden_size != config.n_embed_per_ngram:
            raise ValueError(
                f"OverEncoding adds each order's {config.n_embed_per_ngram}-wide rows to the embedding itself: "
                f"hidden_size ({hidden_size}) must equal n_embed_per_ngram"
            )
        if indexer is not None and indexer.config != config:
            raise ValueError("the indexer was built from a different EngramConfig than this layer")
        self.config = config
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.n_branches = n_branches
        self.indexer = indexer

        self.head_sizes = self.table_head_sizes(config, layer_id)
        offsets = [0]
        for size in self.head_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        # Derived from the config, so not part of the state dict.
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("head_size_tensor", torch.tensor(self.head_sizes, dtype=torch.long), persistent=False)

        num_rows, dim = self.table_shape(config, layer_id)
        if storage is None:
            storage = DeviceTable(num_rows, dim, init_std=config.table_init_std)
        elif (storage.num_rows, storage.dim) != (num_rows, dim):
            raise ValueError(
                f"storage has shape ({storage.num_rows}, {storage.dim}) but layer {layer_id} needs ({num_rows}, {dim})"
            )
        self.table = storage

        # Only the modules a switch keeps are built, so that parameter counts stay honest
        # (docs/definition.md, "Ablation switches and controls").
        full = config.variant == "engram"  # OverEncoding keeps the table alone
        gated = full and config.use_gate
        d_mem = config.memory_dim
        self.value_proj = nn.Linear(d_mem, hidden_size) if full else None
        self.key_proj = nn.Linear(d_mem, n_branches * hidden_size) if gated else None  # W_K^m for all m, stacked
        self.key_norm = BranchRMSNorm(n_branches, hidden_size, config.gate_norm_eps) if gated else None
        self.query_norm = BranchRMSNorm(n_branches, hidden_size, config.gate_norm_eps) if gated else None
        # Set record_gates to keep each forward's gate values (B, T, M) in last_gate (analysis, plots):
        # ones with use_gate=False; OverEncoding has no gate and leaves last_gate None.
        self.record_gates = False
        self.last_gate: torch.Tensor | None = None
        self.short_conv = (
            ShortConv(
                n_branches,
                hidden_size,
                kernel_size=config.kernel_size,
                dilation=config.max_ngram_size,
                norm_eps=config.conv_norm_eps,
                zero_init=config.conv_zero_init,
            )
            if full and config.use_conv
            else None
        )

    @staticmethod
    def table_head_sizes(config: EngramConfig, layer_id: int) -> list[int]:
        """Rows of each head's table for ``layer_id``, in hash-output order (``engram_head_sizes``)."""
        return engram_head_sizes(config, layer_id)

    @classmethod
    def table_shape(cls, config: EngramConfig, layer_id: int) -> tuple[int, int]:
        """(rows, width) of the table a layer needs: for building a storage before the layer."""
        return sum(cls.table_head_sizes(config, layer_id)), config.head_dim

    @property
    def n_heads(self) -> int:
        return len(self.head_sizes)

    def prefetch(self, hash_ids: torch.Tensor) -> PendingRows | None:
        """Start fetching the table rows of ``hash_ids`` (B, T, H) ahead of ``forward``/``step``.

        Tables off the device (host, disk) fetch in a background thread while the layers before this
        one compute; pass the result as ``prefetched`` with the same ``hash_ids``. None for tiers
        that have nothing to prefetch.
        """
        return self.table.prefetch(hash_ids + self.offsets)

    def read_ahead(self, hash_ids: torch.Tensor) -> Future | None:
        """Start bringing the table rows of a later batch's ``hash_ids`` (B, T, H) into memory (a hint:
        ``TableStorage.read_ahead``); None for tiers that keep their rows in memory."""
        return self.table.read_ahead(hash_ids + self.offsets)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        hash_ids: torch.Tensor | None = None,
        prefetched: PendingRows | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """The residual update Y.

        Args:
            hidden_states: (B, T, d), or (B, T, M, d) with M = ``n_branches``.
            input_ids: (B, T) raw token ids (needs an ``indexer``), or
            hash_ids: (B, T, H) precomputed per-head indices from ``NgramHasher.hash``.
            prefetched: what ``prefetch(hash_ids)`` returned for these hash ids, if called.
            check_ids: check the values of ``input_ids`` (or of ``hash_ids``): a host read, a device
                sync on a GPU. ``False`` for callers whose ids are valid by construction
                (``EngramLM`` passes hash ids its indexer computed from ids it checked). Shapes and
                dtypes are always checked.

        Returns:
            Y with the shape of ``hidden_states``.
        """
        hidden, squeeze = self._check_hidden(hidden_states)
        hash_ids = self._resolve_hash_ids(hidden.shape[:2], input_ids, hash_ids, check_ids)
        out = self._position_wise(hidden, hash_ids, prefetched)
        if self.short_conv is not None:
            out = out + self.short_conv(out)
        return out.squeeze(-2) if squeeze else out

    def step(
        self,
        hidden_states: torch.Tensor,
        hash_ids: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        prefetched: PendingRows | None = None,
        check_ids: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual update Y of positions that continue a sequence, for incremental decoding.

        Only the short convolution looks back in time; its state carries the positions before.
        Without a convolution (``use_conv=False``, OverEncoding) there is no state: it stays ``None``.

        Args:
            hidden_states: (B, T, d), or (B, T, M, d), of the new positions.
            hash_ids: (B, T, H) their per-head indices, hashed with the history of the sequence
                (``EngramIndexer.hash_step`` or ``NgramHasher.hash_incremental``).
            conv_state: the state returned by the previous call; ``None`` at the start of a sequence.
            prefetched: what ``prefetch(hash_ids)`` returned, if called.
            check_ids: check the values of ``hash_ids`` (as in ``forward``).

        Returns:
            ``(Y, conv_state)``: Y equal to the last T positions of ``forward`` over the whole
            sequence, and the convolution's state after them, (B, M*d, (kernel_size-1)*N), or
            ``None`` without a convolution.
        """
        hidden, squeeze = self._check_hidden(hidden_states)
        hash_ids = self._resolve_hash_ids(hidden.shape[:2], None, hash_ids, check_ids)
        out = self._position_wise(hidden, hash_ids, prefetched)
        if self.short_conv is not None:
            conv, conv_state = self.short_conv.step(out, conv_state)
            out = out + conv
        elif conv_state is not None:
            raise ValueError(
                "this layer has no short convolution (use_conv=False or OverEncoding): pass conv_state=None"
            )
        return (out.squeeze(-2) if squeeze else out), conv_state

    def _position_wise(
        self, hidden: torch.Tensor, hash_ids: torch.Tensor, prefetched: PendingRows | None = None
    ) -> torch.Tensor:
        """Everything before the convolution, (B, T, M, d): v~, or OverEncoding's whole update.

        Position-wise: every position depends only on its own hidden state (B, T, M, d) and row indices.
        """
        memory = self.table(hash_ids + self.offsets, prefetched).flatten(-2)  # (B, T, d_mem)
        if self.value_proj is None:
            return self._overencoding_update(hidden, memory.to(hidden.dtype))
        # A table may store its rows in another dtype than the layer computes in (a bfloat16 host table).
        memory = memory.to(self.value_proj.weight.dtype)
        value = self.value_proj(memory).unsqueeze(-2)  # (B, T, 1, d): one value for every branch
        if self.key_proj is None:  # use_gate=False: alpha = 1, v~ = v in every branch
            if self.record_gates:
                self.last_gate = value.new_ones(hidden.shape[:-1])
            return value.expand(hidden.shape)
        keys = self.key_proj(memory).unflatten(-1, (self.n_branches, self.hidden_size))  # (B, T, M, d)
        score = (self.key_norm(keys) * self.query_norm(hidden)).sum(-1) / math.sqrt(self.hidden_size)
        if self.config.gate_activation == "signed_sqrt":
            score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
        gate = torch.sigmoid(score).unsqueeze(-1)  # (B, T, M, 1)
        if self.record_gates:
            self.last_gate = gate.squeeze(-1).detach()
        return gate * value

    def _overencoding_update(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """u = (sum_n e_n - (N-1) h) / N (B, T, M, d), so that h + u = (h + sum_n e_n) / N.

        ``memory`` (B, T, d_mem) holds e_2 .. e_N side by side, each (B, T, d) the K heads of one
        order (docs/definition.md, "Ablation switches and controls"). At block 0 every branch of
        ``hidden`` is the token embedding, and h + u is the mean of it and the N-1 n-gram embeddings.
        """
        orders = self.config.max_ngram_size
        ngrams = memory.unflatten(-1, (orders - 1, self.hidden_size)).sum(-2)  # (B, T, d)
        return (ngrams.unsqueeze(-2) - (orders - 1) * hidden) / orders

    # -- validation -----------------------------------------------------------------------------
    def _check_hidden(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            raise TypeError("hidden_states must be a floating-point tensor")
        # OverEncoding has no weights besides its table: it computes in the hidden states' dtype.
        computes_in = hidden_states.dtype if self.value_proj is None else self.value_proj.weight.dtype
        if torch.promote_types(hidden_states.dtype, computes_in) != computes_in:  # e.g. float64 into float32
            raise TypeError(
                f"hidden_states are {hidden_states.dtype} but this layer computes in {computes_in}; convert one to "
                f"the other (hidden_states.to({computes_in}) or layer.to({hidden_states.dtype}))"
            )
        d, m = self.hidden_size, self.n_branches
        shape = tuple(hidden_states.shape)
        if hidden_states.dim() >= 3 and 0 in shape[:2]:
            raise ValueError(f"hidden_states must hold at least one sequence of one position, got shape {shape}")
        if hidden_states.dim() == 3 and m == 1 and shape[-1] == d:
            return hidden_states.unsqueeze(-2), True
        if hidden_states.dim() == 4 and shape[-2:] == (m, d):
            return hidden_states, False
        expected = f"(B, T, {m}, {d})" if m > 1 else f"(B, T, {d}) or (B, T, 1, {d})"
        raise ValueError(f"hidden_states must have shape {expected}, got {shape}")

    def _resolve_hash_ids(
        self,
        batch_shape: torch.Size,
        input_ids: torch.Tensor | None,
        hash_ids: torch.Tensor | None,
        check_ids: bool,
    ) -> torch.Tensor:
        if (input_ids is None) == (hash_ids is None):
            raise ValueError("pass exactly one of input_ids (raw token ids) or hash_ids (precomputed indices)")
        if input_ids is not None:
            if self.indexer is None:
                raise ValueError("forward(input_ids=...) needs an EngramIndexer: build the layer with indexer=...")
            input_ids = as_id_tensor(input_ids, "input_ids", ndim=2)
            if input_ids.shape != batch_shape:
                raise ValueError(
                    f"input_ids shape {tuple(input_ids.shape)} does not match the (B, T) of hidden_states, "
                    f"{tuple(batch_shape)}"
                )
            hash_ids = self.indexer.hash_layer(input_ids, self.layer_id, check_ids=check_ids)
            check_ids = False  # hashes of checked ids are in range by construction
        hash_ids = as_id_tensor(hash_ids, "hash_ids", ndim=3)
        if hash_ids.shape != (*batch_shape, self.n_heads):
            raise ValueError(
                f"hash_ids must have shape (B, T, H) = ({batch_shape[0]}, {batch_shape[1]}, {self.n_heads}), "
                f"got {tuple(hash_ids.shape)}"
            )
        if not checks_values(check_ids) or hash_ids.device.type == "meta":
            return hash_ids
        outside = (hash_ids < 0) | (hash_ids >= self.head_size_tensor)
        if bool(outside.any()):
            bad = torch.nonzero(outside)[0].tolist()
            raise ValueError(
                f"hash_ids{bad} = {int(hash_ids[tuple(bad)])} is outside head {bad[-1]}'s table "
                f"[0, {self.head_sizes[bad[-1]]}); were the ids hashed for layer {self.layer_id} with this config?"
            )
        return hash_ids
