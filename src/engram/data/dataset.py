"""A prepared token dataset on disk, opened read-only and memory-mapped (written by ``prepare_dataset``).

A dataset is a folder:

    manifest.json          what the folder holds (below); written last, so a folder without it is not a dataset
    train.bin              raw tokenizer ids, little-endian uint32, the documents one after the other, each
    val.bin                followed by the separator id (the tokenizer's end-of-text id unless chosen otherwise)
    test.bin
    {split}.docs.npy       int64 start offset of each document in {split}.bin (a document ends where the next
                           starts, the last one at the end of the file)
    {split}.doc_ids.jsonl  the id of each document, one JSON string per line, in the same order
    vocab.npy              int64 tokenizer ids kept for the output vocabulary, ascending: model id k + 1 is
                           tokenizer id vocab[k], model id 0 the unknown token (``EngramLM.set_vocabulary``)

``manifest.json``:

    {"format": "engram-token-dataset", "version": 1, "token_dtype": "uint32",
     "tokenizer": {"fingerprint": "<sha256 of the tokenizer>", "raw_vocab_size": 128815, "canonical_vocab_size": ...},
     "separator_id": 1,
     "source": {"kind": "named" | "folder" | "jsonl" | "text" | "iterable", ...},
     "parameters": {"splits": {"train": 0.98, "val": 0.01, "test": 0.01}, "seed": 0, "max_tokens": null,
                    "min_count": 1, "max_vocab": null, "max_doc_chars": 100000, "clean": true},
     "documents": {"read": ..., "empty": ..., "written": ...}, "truncated": false,
     "splits": {"train": {"tokens": ..., "documents": ..., "unknown_tokens": ...,
                          "files": {"tokens": {"path": "train.bin", "bytes": ..., "sha256": ...},
                                    "document_starts": {...}, "document_ids": {...}}}, "val": ..., "test": ...},
     "vocabulary": {"size": K, "model_vocab_size": K + 1, "unknown_id": 0, "min_count": 1, "max_vocab": null,
                    "train_coverage": 1.0, "file": {"path": "vocab.npy", "bytes": ..., "sha256": ...}},
     "engram_version": "0.1.0",
     "fingerprint": "<sha256 of the tokenizer fingerprint, separator and every file's sha256>"}

``unknown_tokens`` counts a split's tokens outside the kept vocabulary (0 for train without ``max_vocab`` or
``min_count``); ``train_coverage`` is the share of train tokens inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from engram._files import sha256_file

FORMAT = "engram-token-dataset"
VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
TOKEN_DTYPE_NAME = "uint32"
UNKNOWN_ID = 0
_SPLIT_FILES = {"tokens": ".bin", "document_starts": ".docs.npy", "document_ids": ".doc_ids.jsonl"}
_VOCAB_FILE = "vocab.npy"


def dataset_fingerprint(manifest: dict[str, Any]) -> str:
    """SHA-256 identifying a dataset's content: the tokenizer fingerprint, the separator and every file's
    SHA-256 (not the source path or the parameters, so equal data from elsewhere has the same fingerprint)."""
    identity = {
        "format": [manifest["format"], manifest["version"], manifest["token_dtype"]],
        "tokenizer": manifest["tokenizer"]["fingerprint"],
        "separator_id": manifest["separator_id"],
        "files": {
            split: {role: entry["sha256"] for role, entry in manifest["splits"][split]["files"].items()}
            for split in SPLITS
        },
        "vocabulary": manifest["vocabulary"]["file"]["sha256"],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def split_file_names(split: str) -> dict[str, str]:
    """The file names of one split, by role (``tokens``, ``document_starts``, ``document_ids``)."""
    return {role: f"{split}{suffix}" for role, suffix in _SPLIT_FILES.items()}


class TokenDataset:
    """A dataset folder written by ``prepare_dataset``, checked on opening.

    Args:
        path: the dataset folder.
        verify: also re-hash every file against the SHA-256 in the manifest and check that every token id is
            below the tokenizer's vocabulary size (reads everything once; the default checks only the
            manifest, file sizes, document offsets and the vocabulary).

    Raises:
        FileNotFoundError: the folder, its manifest or one of its files is missing.
        ValueError: an unknown format or version, or a file whose size, content or hash does not match the
            manifest (a truncated or damaged shard).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no dataset folder at {self.path}")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a prepared dataset: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{manifest_path} is not valid JSON ({exc})") from None
        self.manifest: dict[str, Any] = manifest
        self._check_manifest()
        self._tokens: dict[str, np.ndarray] = {}
        self._starts: dict[str, np.ndarray] = {}
        for split in SPLITS:
            self._check_split(split)
        self._vocabulary = self._load_vocabulary()
        if verify:
            self.verify()

    # -- access ---------------------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the dataset's content (``dataset_fingerprint``), as recorded in the manifest."""
        return self.manifest["fingerprint"]

    @property
    def separator_id(self) -> int:
        """The id appended after every document."""
        return self.manifest["separator_id"]

    @property
    def raw_vocab_size(self) -> int:
        """The tokenizer's number of ids (the model's ``input_vocab_size``)."""
        return self.manifest["tokenizer"]["raw_vocab_size"]

    @property
    def vocabulary(self) -> np.ndarray:
        """Tokenizer ids kept for the output vocabulary, ascending, int64 (read-only)."""
        return self._vocabulary

    @property
    def model_vocab_size(self) -> int:
        """Size of the trimmed output vocabulary: the kept ids plus the unknown id 0."""
        return len(self._vocabulary) + 1

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def num_documents(self, split: str) -> int:
        return self._split(split)["documents"]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids as a read-only ``np.memmap`` of uint32 (an empty array for an empty split)."""
        self._split(split)
        if split not in self._tokens:
            path = self._file(split, "tokens")
            if self.num_tokens(split) == 0:
                empty = np.empty(0, dtype=TOKEN_DTYPE)
                empty.flags.writeable = False
                self._tokens[split] = empty
            else:
                self._tokens[split] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(self.num_tokens(split),))
        return self._tokens[split]

    def document_starts(self, split: str) -> np.ndarray:
        """Start offset of each document of the split in ``tokens(split)``, int64, ascending (read-only)."""
        self._split(split)
        return self._starts[split]

    def document(self, split: str, index: int) -> np.ndarray:
        """The tokens of document ``index`` of the split, its trailing separator included."""
        starts = self.document_starts(split)
        if not -len(starts) <= index < len(starts):
            raise IndexError(f"document {index} out of range: split {split!r} has {len(starts)} documents")
        index %= len(starts)
        end = starts[index + 1] if index + 1 < len(starts) else self.num_tokens(split)
        return self.tokens(split)[starts[index] : end]

    def document_ids(self, split: str) -> list[str]:
        """The id of each document of the split, in order."""
        path = self._file(split, "document_ids")
        with open(path, encoding="utf-8") as f:
            ids = [json.loads(line) for line in f]
        if len(ids) != self.num_documents(split):
            raise ValueError(f"{path} holds {len(ids)} ids, the manifest {self.num_documents(split)} documents")
        return ids

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``ValueError`` unless ``tokenizer`` (a ``CompressedTokenizer``) is the one the data was made with."""
        recorded = self.manifest["tokenizer"]
        fingerprint = getattr(tokenizer, "fingerprint", None)
        raw_vocab_size = getattr(tokenizer, "raw_vocab_size", None)
        if fingerprint != recorded["fingerprint"] or raw_vocab_size != recorded["raw_vocab_size"]:
            raise ValueError(
                f"dataset {self.path} was tokenized with another tokenizer: fingerprint {recorded['fingerprint']} "
                f"({recorded['raw_vocab_size']} ids), given {fingerprint} ({raw_vocab_size} ids)"
            )

    def verify(self) -> None:
        """Re-hash every file against the manifest and check the token id range; raise ``ValueError`` if not."""
        for name, entry in self._file_entries():
            digest = sha256_file(self.path / name)
            if digest != entry["sha256"]:
                raise ValueError(
                    f"damaged dataset {self.path}: {name} has SHA-256 {digest}, the manifest records {entry['sha256']}"
                )
        for split in SPLITS:
            tokens = self.tokens(split)
            for first in range(0, len(tokens), 1 << 24):
                chunk_max = int(tokens[first : first + (1 << 24)].max())
                if chunk_max >= self.raw_vocab_size:
                    raise ValueError(
                        f"damaged dataset {self.path}: {split} holds id {chunk_max}, outside the tokenizer's "
                        f"{self.raw_vocab_size} ids"
                    )

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_tokens(s):,}" for s in SPLITS)
        return f"TokenDataset({str(self.path)!r}, tokens: {counts}, vocabulary {len(self._vocabulary):,})"

    # -- checks -----------------------------------------------------------------------------------------------
    def _fail(self, message: str) -> ValueError:
        return ValueError(f"damaged dataset {self.path}: {message}")

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
        return self.manifest["splits"][split]

    def _file(self, split: str, role: str) -> Path:
        return self.path / self._split(split)["files"][role]["path"]

    def _check_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"{self.path / MANIFEST} is not an {FORMAT} manifest")
        if type(m.get("version")) is not int or m["version"] != VERSION:
            raise ValueError(
                f"{self.path / MANIFEST} has format version {m.get('version')!r}; this code reads {VERSION}"
            )
        try:
            ok = (
                m["token_dtype"] == TOKEN_DTYPE_NAME
                and _is_count(m["separator_id"])
                and _is_count(m["tokenizer"]["raw_vocab_size"])
                and m["separator_id"] < m["tokenizer"]["raw_vocab_size"]
                and all(_is_count(m["splits"][s][key]) for s in SPLITS for key in ("tokens", "documents"))
                and _is_count(m["vocabulary"]["size"])
            )
            entries = list(self._file_entries())
            fingerprint_ok = m["fingerprint"] == dataset_fingerprint(m)
        except (KeyError, TypeError) as exc:
            raise self._fail(f"{MANIFEST} lacks or mistypes a field ({exc!r})") from None
        if not ok:
            raise self._fail(f"{MANIFEST} holds an invalid dtype, separator id or count")
        if not fingerprint_ok:
            raise self._fail(f"{MANIFEST} was edited: its fingerprint does not match the files' hashes it records")
        for name, entry in entries:
            if not isinstance(entry, dict):
                raise self._fail(f"{MANIFEST} holds an invalid file entry: {entry!r:.80}")
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise self._fail(f"{MANIFEST} names a file outside the folder: {name!r}")
            path = self.path / name
            if not path.is_file():
                raise FileNotFoundError(f"incomplete dataset {self.path}: {name} is missing")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise self._fail(f"{name} has {size:,} bytes, the manifest records {entry.get('bytes')!r} (truncated?)")

    def _file_entries(self):
        for split in SPLITS:
            for role in _SPLIT_FILES:
                entry = self.manifest["splits"][split]["files"][role]
                yield entry["path"], entry
        entry = self.manifest["vocabulary"]["file"]
        yield entry["path"], entry

    def _check_split(self, split: str) -> None:
        info = self._split(split)
        n_tokens, n_docs = info["tokens"], info["documents"]
        tokens_path = self._file(split, "tokens")
        if tokens_path.stat().st_size != n_tokens * TOKEN_DTYPE.itemsize:
            raise self._fail(f"{tokens_path.name} has {tokens_path.stat().st_size:,} bytes for {n_tokens:,} tokens")
        starts_path = self._file(split, "document_starts")
        try:
            starts = np.load(starts_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self._fail(f"{starts_path.name} is not a NumPy array file ({exc})") from None
        if starts.dtype != np.int64 or starts.shape != (n_docs,):
            raise self._fail(f"{starts_path.name} holds {starts.dtype} {starts.shape}, expected int64 ({n_docs},)")
        if n_docs and (starts[0] != 0 or starts[-1] >= n_tokens or np.any(np.diff(starts) <= 0)):
            raise self._fail(f"{starts_path.name}: document offsets are not increasing from 0 within the tokens")
        if n_docs == 0 and n_tokens:
            raise self._fail(f"split {split} has {n_tokens} tokens but no documents")
        self._starts[split] = starts

    def _load_vocabulary(self) -> np.ndarray:
        path = self.path / self.manifest["vocabulary"]["file"]["path"]
        try:
            vocab = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self._fail(f"{path.name} is not a NumPy array file ({exc})") from None
        size = self.manifest["vocabulary"]["size"]
        if vocab.dtype != np.int64 or vocab.shape != (size,):
            raise self._fail(f"{path.name} holds {vocab.dtype} {vocab.shape}, expected int64 ({size},)")
        if size and (vocab[0] < 0 or vocab[-1] >= self.raw_vocab_size or np.any(np.diff(vocab) <= 0)):
            raise self._fail(f"{path.name}: ids are not ascending within the tokenizer's {self.raw_vocab_size} ids")
        vocab.flags.writeable = False
        return vocab


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0
