"""Multi-head n-gram hashing (docs/definition.md, "Hashing"), bit-exact with the reference definition.

For layer ``l`` and order ``n`` the suffix n-gram ending at position t is mixed into one int64

    mix_n[t] = (x[t] * m_0) ^ (x[t-1] * m_1) ^ ... ^ (x[t-n+1] * m_{n-1})

where ``x`` are canonical ids (positions before the start read the canonical pad id) and the odd
multipliers ``m`` come from ``numpy.random.default_rng(seed + 10007 * l)``. Head k of order n
reads row ``mix_n mod p[l][n][k]`` of its prime-sized table. All K heads of an order share
``mix_n``; only the prime differs.

Everything runs in torch on the ids' device. The multiplier bound keeps ``x * m`` inside int64
for every canonical id, and since all products are non-negative so is every mix, so the C-style
``fmod`` used below equals the floor modulo of the reference.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

from engram._checks import as_id_tensor, check_hashing_params, check_id_range, checks_values
from engram.indexing.primes import engram_table_sizes

_LAYER_SEED_STRIDE = 10007
_INT64_MAX = np.iinfo(np.int64).max


def layer_multipliers(layer_id: int, max_ngram_size: int, compressed_vocab_size: int, seed: int = 0) -> list[int]:
    """The N odd hash multipliers of one layer (docs/definition.md, "Hashing")."""
    half_bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(seed + _LAYER_SEED_STRIDE * layer_id)
    r = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
    return [int(v) for v in 2 * r + 1]


def _order_mixes(
    extended: torch.Tensor, multipliers: Sequence[int], context: int, pad_id: int, keep: torch.Tensor | None
) -> list[torch.Tensor]:
    """``mix_n`` for n = 2..N over the last T positions of ``extended`` (B, context+T).

    Args:
        extended: canonical ids, the first ``context`` = N-1 columns being what precedes the sequence.
        multipliers: the layer's N odd multipliers.
        keep: optional (N-1, B, T) mask; where ``keep[k-1]`` is False, x[t-k] reads ``pad_id``.

    Returns:
        N-1 int64 tensors (B, T); entry n-2 mixes the suffix n-gram ending at each position.
    """
    length = extended.shape[1] - context
    mix = extended[:, context:] * multipliers[0]
    mixes = []
    for k in range(1, len(multipliers)):
        shifted = extended[:, context - k : context - k + length]  # x[t-k]
        if keep is not None:
            shifted = torch.where(keep[k - 1], shifted, pad_id)
        mix = mix ^ (shifted * multipliers[k])
        mixes.append(mix)
    return mixes


def _hash_with_constants(
    extended: torch.Tensor,
    keep: torch.Tensor | None,
    multipliers: Sequence[int],
    primes: Sequence[Sequence[int]],
    context: int,
    pad_id: int,
) -> torch.Tensor:
    """The hash written for ``torch.compile``: every prime a Python constant, every head its own ``fmod``.

    Equal to the eager hash; traced, the constants let the compiler replace the divisions by
    multiplications, and nothing is cached or written in place (no guard, no strided ``out=``).
    """
    mixes = _order_mixes(extended, multipliers, context, pad_id, keep)
    return torch.stack([torch.fmod(mix, p) for mix, ps in zip(mixes, primes, strict=True) for p in ps], dim=-1)


def _compiler_missing(error: BaseException) -> bool:
    """Whether a failed ``torch.compile`` was caused, somewhere in its chain, by the C++ toolchain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (CppCompileError, InvalidCxxCompiler)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class NgramHasher:
    """Hashes canonical token ids into per-head table rows for every Engram layer.

    Args:
        layer_ids: layers that carry an Engram module; taken literally (they seed the multipliers)
            and in order (they decide which layer gets which primes).
        max_ngram_size: N; orders 2..N are hashed.
        n_head_per_ngram: K heads (tables) per order.
        engram_vocab_size: base table size per order, ``[S_2, ..., S_N]``.
        compressed_vocab_size: number of canonical ids, ``len(CompressedTokenizer)``.
        pad_id: canonical id that fills positions before the start of a sequence.
        seed: global hash seed.
        separator_id: optional canonical id at which n-gram windows restart (packed documents):
            from a separator on, positions before it read ``pad_id``, exactly as if each document
            (beginning with its separator) had been hashed on its own. Off by default.
        compile: hash with a ``torch.compile``d kernel per layer (needs a C++ compiler on CPU).
            About 3x faster than eager on CPU for fixed batch shapes (training); each new batch shape compiles
            once (seconds) and past torch's recompile limit (8 shapes per layer) calls run eagerly,
            so keep it off for decoding. Results are identical either way.

    ``table_sizes[layer_id]`` holds one list of primes per order; ``hash()`` returns indices
    of shape (B, T, (N-1)*K), order-major then head, before any per-head table offset.
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        max_ngram_size: int,
        n_head_per_ngram: int,
        engram_vocab_size: Sequence[int],
        compressed_vocab_size: int,
        pad_id: int,
        seed: int = 0,
        separator_id: int | None = None,
        compile: bool = False,
    ):
        layer_ids = [int(i) if isinstance(i, np.integer) else i for i in layer_ids]
        engram_vocab_size = [int(s) if isinstance(s, np.integer) else s for s in engram_vocab_size]
        check_hashing_params(layer_ids, max_ngram_size, n_head_per_ngram, engram_vocab_size)
        if compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
        for name, value in (("pad_id", pad_id), ("separator_id", separator_id)):
            if value is not None and not 0 <= value < compressed_vocab_size:
                raise ValueError(
                    f"{name} must be a canonical id in [0, {compressed_vocab_size}), got {value}; "
                    "map a raw id through the CompressedTokenizer first"
                )
        self.layer_ids = list(layer_ids)
        self.max_ngram_size = max_ngram_size
        self.n_head_per_ngram = n_head_per_ngram
        self.engram_vocab_size = engram_vocab_size
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.separator_id = separator_id
        self.table_sizes = engram_table_sizes(self.layer_ids, max_ngram_size, n_head_per_ngram, self.engram_vocab_size)
        self._multipliers = {
            lid: layer_multipliers(lid, max_ngram_size, self.compressed_vocab_size, self.seed) for lid in self.layer_ids
        }
        self.compile = compile
        self._primes: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._kernels: dict[int, Callable] = {}

    @property
    def n_heads(self) -> int:
        """Heads per layer, (N-1)*K: the last dimension of ``hash()``'s output."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def context_size(self) -> int:
        """N-1: how many past canonical ids an incremental step needs."""
        return self.max_ngram_size - 1

    def multipliers(self, layer_id: int) -> list[int]:
        """The N odd multipliers of ``layer_id``."""
        self._check_layer(layer_id)
        return list(self._multipliers[layer_id])

    def head_sizes(self, layer_id: int) -> list[int]:
        """Table size of every head of ``layer_id``, flattened in output order."""
        self._check_layer(layer_id)
        return [p for order in self.table_sizes[layer_id] for p in order]

    # -- hashing --------------------------------------------------------------------------------
    def hash(
        self,
        compressed_ids: torch.Tensor,
        layer_id: int,
        history: torch.Tensor | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """Per-head row indices of every position.

        Args:
            compressed_ids: (B, T) canonical ids in ``[0, compressed_vocab_size)``.
            layer_id: one of ``layer_ids``.
            history: optional (B, N-1) canonical ids that precede the sequence (decoding);
                ``None`` means the sequence starts here (pad id before it).
            check_ids: check that the ids (and history) lie in range, a host read; ``False`` for
                callers that checked them already (``EngramIndexer``). Shapes are always checked.

        Returns:
            (B, T, (N-1)*K) int64 indices; entry ``[..., (n-2)*K + k]`` is in ``[0, p[n][k])``.
        """
        self._check_layer(layer_id)
        ids = self._check_ids(compressed_ids, "compressed_ids", check_ids)
        batch, length = ids.shape
        if history is None:
            context = ids.new_full((batch, self.context_size), self.pad_id)
        else:
            context = self._check_history(history, batch, check_ids)
        extended = torch.cat([context, ids], dim=1)  # (B, N-1+T)
        return self._hash_extended(extended, layer_id, length)

    def hash_incremental(
        self, new_ids: torch.Tensor, history: torch.Tensor, layer_id: int, check_ids: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash newly decoded tokens given each sequence's last N-1 canonical ids.

        Args:
            new_ids: (B, t) canonical ids of the new positions.
            history: (B, N-1) canonical ids before them; ``initial_history()`` at the start.

        Returns:
            ``(hashes, new_history)``: (B, t, (N-1)*K) indices, equal to the last t positions of
            hashing the whole sequence, and the (B, N-1) history after the new tokens.
        """
        hashes = self.hash(new_ids, layer_id, history=history, check_ids=check_ids)
        return hashes, self.update_history(history, new_ids, check_ids=False)  # just checked by hash

    def initial_history(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, N-1) history of sequences that have not started yet (all pad id)."""
        return torch.full((batch_size, self.context_size), self.pad_id, dtype=torch.long, device=device)

    def update_history(self, history: torch.Tensor, new_ids: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
        """The last N-1 canonical ids after appending ``new_ids`` (B, t) to ``history`` (B, N-1)."""
        new_ids = self._check_ids(new_ids, "new_ids", check_ids)
        history = self._check_history(history, new_ids.shape[0], check_ids)
        return torch.cat([history, new_ids], dim=1)[:, -self.context_size :]

    def _hash_extended(self, extended: torch.Tensor, layer_id: int, length: int) -> torch.Tensor:
        """Hash the last ``length`` positions of ``extended`` (B, N-1+T), whose first N-1 are context."""
        keep = self._window_mask(extended, length) if self.separator_id is not None else None
        if torch.compiler.is_compiling():  # traced as part of a compiled model: the kernel's code, inlined
            return _hash_with_constants(
                extended, keep, self._multipliers[layer_id], self.table_sizes[layer_id], self.context_size, self.pad_id
            )
        if self.compile:
            return self._compiled_kernel(layer_id)(extended, keep)
        primes = self._primes_on(layer_id, extended.device)  # (N-1, K)
        out = torch.empty(extended.shape[0], length, self.n_heads, dtype=torch.long, device=extended.device)
        K = self.n_head_per_ngram
        mixes = _order_mixes(extended, self._multipliers[layer_id], self.context_size, self.pad_id, keep)
        for order, mix in enumerate(mixes):
            # Every head of the order takes the same mix modulo its own prime.
            torch.fmod(mix.unsqueeze(-1), primes[order], out=out[:, :, order * K : (order + 1) * K])
        return out

    def _compiled_kernel(self, layer_id: int) -> Callable:
        """A fused kernel for one layer, its multipliers and primes compiled in as constants.

        With constant divisors the C++ compiler replaces each 64-bit division by a multiply and
        shifts, which the eager ``fmod`` (a hardware division per element) cannot do. Vectorised
        code generation is switched off for this kernel alone: it would read the divisors from a
        vector register and fall back to hardware division.
        """
        if layer_id not in self._kernels:
            multipliers, primes = self._multipliers[layer_id], self.table_sizes[layer_id]
            ctx, pad = self.context_size, self.pad_id

            def kernel(extended: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
                return _hash_with_constants(extended, keep, multipliers, primes, ctx, pad)

            # A code object of its own per kernel: torch.compile keeps its cache (and recompile limit)
            # per code object, and the constants differ from layer to layer and hasher to hasher.
            own_code = kernel.__code__.replace(co_name=f"engram_hash_layer_{layer_id}")
            kernel = types.FunctionType(own_code, kernel.__globals__, closure=kernel.__closure__)
            compiled = torch.compile(kernel, dynamic=False, options={"cpp.vec_isa_ok": False})

            def run(extended: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
                try:
                    return compiled(extended, keep)
                except (BackendCompilerFailed, InductorError) as exc:  # the backend could not build it
                    hint = " (on CPU torch.compile needs a working C++ compiler)" if _compiler_missing(exc) else ""
                    raise RuntimeError(
                        f"NgramHasher(compile=True) could not build its kernel{hint}; use compile=False. "
                        f"Cause: {type(exc).__name__}: {exc}"
                    ) from exc

            self._kernels[layer_id] = run
        return self._kernels[layer_id]

    def _window_mask(self, extended: torch.Tensor, length: int) -> torch.Tensor:
        """(N-1, B, T) mask: may position t read x[t-k] (no separator in (t-k, t])?"""
        positions = torch.arange(extended.shape[1], device=extended.device)
        # Index of the latest separator at or before each position (0 if none; position 0 then
        # imposes no restriction because every shift reaches at most back to it).
        starts = torch.where(extended == self.separator_id, positions, 0).cummax(dim=1).values
        starts = starts[:, self.context_size :]  # (B, T)
        targets = positions[self.context_size :]  # (T,)
        shifts = torch.arange(1, self.max_ngram_size, device=extended.device).view(-1, 1, 1)
        return (targets - shifts) >= starts.unsqueeze(0)

    def _primes_on(self, layer_id: int, device: torch.device) -> torch.Tensor:
        key = (layer_id, device)
        if key not in self._primes:
            self._primes[key] = torch.tensor(self.table_sizes[layer_id], dtype=torch.long, device=device)
        return self._primes[key]

    # -- validation -----------------------------------------------------------------------------
    def _check_layer(self, layer_id: int) -> None:
        if layer_id not in self._multipliers:
            raise KeyError(f"layer {layer_id} has no Engram module; configured layer_ids are {self.layer_ids}")

    def check_ids(self, ids: torch.Tensor, name: str = "compressed_ids") -> torch.Tensor:
        """Check canonical ids (B, T): integers in ``[0, compressed_vocab_size)`` (one host read); as int64."""
        ids = as_id_tensor(ids, name, ndim=2)
        check_id_range(
            ids,
            0,
            self.compressed_vocab_size,
            name,
            " of canonical ids; map raw ids through CompressedTokenizer and replace negative padding markers "
            "with the pad id",
        )
        return ids

    def _check_ids(self, ids: torch.Tensor, name: str, check_values: bool = True) -> torch.Tensor:
        return self.check_ids(ids, name) if checks_values(check_values) else as_id_tensor(ids, name, ndim=2)

    def _check_history(self, history: torch.Tensor, batch: int, check_values: bool = True) -> torch.Tensor:
        history = self._check_ids(history, "history", check_values)
        if history.shape != (batch, self.context_size):
            raise ValueError(
                f"history must have shape (batch, N-1) = ({batch}, {self.context_size}), got {tuple(history.shape)}"
            )
        return history
