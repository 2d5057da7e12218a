"""Corpus -> token shards: ``prepare_dataset`` streams documents, splits them by document, tokenizes them in
batches and appends them to per-split token files, counting the train split's token frequencies on the way.

- **Split by document, by hash.** Document ``doc_id`` goes to train, val or test by the first 8 bytes of
  BLAKE2b(``"{seed}\\0{doc_id}"``) read as a fraction of 2**64 against the cumulative split fractions: the same
  seed and ids give the same assignment whatever the order or the rest of the corpus, and a document is never
  divided between splits (see ``split_of``).
- **Streaming.** Documents are read and tokenized a batch at a time (about ``batch_chars`` characters) and their
  tokens appended to the files, so memory does not grow with the corpus (besides one offset per document).
- **Atomic.** Everything is written into a temporary sibling folder, fsynced and renamed into place at the end,
  with ``manifest.json`` written last: a crashed run leaves at most a ``.tmp-`` folder, never a half dataset at
  the output path.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from engram import __version__
from engram._files import fsync_dir, sha256_file, swap_into_place
from engram.data.dataset import (
    FORMAT,
    MANIFEST,
    SPLITS,
    TOKEN_DTYPE,
    TOKEN_DTYPE_NAME,
    VERSION,
    TokenDataset,
    dataset_fingerprint,
)
from engram.data.dataset import split_file_names as _split_file_names
from engram.data.sources import DEFAULT_MAX_DOC_CHARS, DocumentSource, as_source, open_source
from engram.data.text import clean_text
from engram.indexing.compression import CompressedTokenizer

# End-of-text tokens looked up (in this order) when no separator id is given.
EOS_TOKENS = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
DEFAULT_BATCH_CHARS = 2_000_000
_BATCH_DOCS = 4096


def split_of(doc_id: str, seed: int, splits: Sequence[float] = (0.98, 0.01, 0.01)) -> str:
    """The split (``"train"``, ``"val"`` or ``"test"``) that ``prepare_dataset`` assigns to ``doc_id``."""
    return SPLITS[_split_index(doc_id, seed, _thresholds(check_splits(splits)))]


def default_separator_id(tokenizer: CompressedTokenizer) -> int:
    """The tokenizer's end-of-text id (DeepSeek-V3: 1), found by name; ``ValueError`` if it has none."""
    tok = tokenizer.tokenizer
    if not isinstance(tok, Tokenizer):
        eos = getattr(tok, "eos_token_id", None)
        if isinstance(eos, int):
            return eos
        tok = getattr(tok, "backend_tokenizer", None)
    if tok is not None:
        for token in EOS_TOKENS:
            tid = tok.token_to_id(token)
            if tid is not None:
                return tid
    raise ValueError(f"the tokenizer has no end-of-text token ({', '.join(EOS_TOKENS)}); pass separator_id")


def prepare_dataset(
    source: str | os.PathLike | DocumentSource | Iterable[tuple[str, str]],
    out_dir: str | os.PathLike,
    tokenizer: CompressedTokenizer,
    splits: Sequence[float] = (0.98, 0.01, 0.01),
    seed: int = 0,
    max_tokens: int | None = None,
    min_count: int = 1,
    max_vocab: int | None = None,
    separator_id: int | None = None,
    max_doc_chars: int | None = None,
    clean: bool = True,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    batch_chars: int = DEFAULT_BATCH_CHARS,
) -> TokenDataset:
    """Tokenize a corpus into a dataset folder (format: ``engram.data.dataset``) and open it.

    Args:
        source: ``"shakespeare"``, ``"wikipedia"``, a file or folder path (``engram.data.sources``), a
            ``DocumentSource``, or ``(doc_id, text)`` pairs.
        out_dir: the dataset folder to create.
        tokenizer: its raw ids are stored; its fingerprint is recorded.
        splits: train, validation and test fractions of documents (each >= 0, summing to 1, train > 0).
        seed: with the document id, fixes the split of each document.
        max_tokens: stop after the document that brings the total (all splits, separators included) to this
            many tokens; the manifest then says ``"truncated": true``.
        min_count: keep tokenizer ids seen at least this often in train for the output vocabulary ...
        max_vocab: ... and of those at most this many, the most frequent (ties: the smaller id).
        separator_id: appended after every document (default: the tokenizer's end-of-text id).
        max_doc_chars: longer documents are cut into parts of at most this many characters, each a document
            (``engram.data.text.cut_document``). None: the source's default (20,000 for ``"shakespeare"``, else
            100,000). For a ``DocumentSource``, it was fixed when the source was opened.
        clean: pass every document through ``engram.data.text.clean_text``; documents left empty are skipped.
        cache_dir: where fetched corpora are kept (``engram.data.fetch.corpus_cache_dir``).
        overwrite: replace an existing non-empty ``out_dir`` (otherwise ``FileExistsError``).
        progress: show a progress bar on stderr.
        batch_chars: characters tokenized per batch.

    Raises:
        TypeError: ``tokenizer`` is not a ``CompressedTokenizer``.
        ValueError: invalid arguments, a malformed input file, or a corpus without tokens (or without train
            tokens, or without any id reaching ``min_count``).
        FileNotFoundError: the source file or folder does not exist.
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    if not isinstance(tokenizer, CompressedTokenizer):
        raise TypeError(f"tokenizer must be a CompressedTokenizer, got {type(tokenizer).__name__}")
    fractions = check_splits(splits)
    for name, value, low in (("min_count", min_count, 1), ("batch_chars", batch_chars, 1), ("seed", seed, None)):
        if type(value) is not int or (low is not None and value < low):
            raise ValueError(f"{name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
    for name, value in (("max_tokens", max_tokens), ("max_vocab", max_vocab), ("max_doc_chars", max_doc_chars)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    if separator_id is None:
        separator_id = default_separator_id(tokenizer)
    if type(separator_id) is not int or not 0 <= separator_id < tokenizer.raw_vocab_size:
        raise ValueError(f"separator_id must be an id in [0, {tokenizer.raw_vocab_size}), got {separator_id!r}")

    target = Path(out_dir).absolute()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise FileExistsError(f"{target} already exists and is not empty; choose another folder or overwrite it")
    if isinstance(source, (str, os.PathLike)):
        source = open_source(source, max_doc_chars=max_doc_chars, cache_dir=cache_dir)
    elif isinstance(source, DocumentSource):
        if max_doc_chars is not None and max_doc_chars != source.max_doc_chars:
            raise ValueError(
                f"max_doc_chars={max_doc_chars} differs from the DocumentSource's {source.max_doc_chars}; "
                "pass it to open_source instead"
            )
    else:
        source = as_source(source, max_doc_chars or DEFAULT_MAX_DOC_CHARS)

    parameters = {
        "splits": dict(zip(SPLITS, fractions, strict=True)),
        "seed": seed,
        "max_tokens": max_tokens,
        "min_count": min_count,
        "max_vocab": max_vocab,
        "max_doc_chars": source.max_doc_chars,
        "clean": clean,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{secrets.token_hex(8)}"
    tmp.mkdir()
    writer = None
    try:
        writer = _DatasetWriter(tmp, tokenizer, separator_id, _thresholds(fractions), seed)
        with tqdm(desc="documents", unit=" docs", disable=not progress, dynamic_ncols=True) as bar:
            writer.consume(source, clean, max_tokens, batch_chars, bar)
        manifest = writer.finish(source.description, parameters, min_count, max_vocab)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if target.exists() and any(target.iterdir()) and not overwrite:  # written meanwhile by another process
            raise FileExistsError(f"{target} was written by another process meanwhile; this dataset is discarded")
        swap_into_place(tmp, target)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenDataset(target)


# -- splitting ------------------------------------------------------------------------------------------------


def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in splits)
    except (TypeError, ValueError):
        raise ValueError(f"splits must be three numbers (train, val, test), got {splits!r}") from None
    if len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"splits must be three fractions >= 0 (train, val, test) summing to 1, got {splits!r}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be > 0, got {splits!r}")
    return fractions  # type: ignore[return-value]


def _thresholds(fractions: Sequence[float]) -> tuple[int, int]:
    """Hash values below the first threshold go to train, below the second to val, the rest to test."""
    train = min(round(fractions[0] * 2**64), 2**64)
    val = min(round((fractions[0] + fractions[1]) * 2**64), 2**64)
    if fractions[2] == 0:
        val = 2**64
    return train, val


def _split_index(doc_id: str, seed: int, thresholds: tuple[int, int]) -> int:
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    return 0 if value < thresholds[0] else (1 if value < thresholds[1] else 2)


# -- writing --------------------------------------------------------------------------------------------------


def _batch_encoder(tokenizer: CompressedTokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Raw ids of a list of texts, no special tokens: ``encode_batch`` (parallel) for a ``tokenizers.Tokenizer``."""
    tok = tokenizer.tokenizer
    if isinstance(tok, Tokenizer):
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: the same ids, about 1.5x faster.
        encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return lambda texts: [encoding.ids for encoding in encode_batch(texts, add_special_tokens=False)]
    return lambda texts: [tokenizer.encode(text) for text in texts]


class _SplitWriter:
    """Appends documents to one split's files; hashes the token file as it is written."""

    def __init__(self, directory: Path, split: str, vocab_size: int):
        self.directory, self.split = directory, split
        self.names = _split_file_names(split)
        self.tokens_file = open(directory / self.names["tokens"], "wb")  # noqa: SIM115 - closed in close()
        self.ids_file = open(directory / self.names["document_ids"], "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self.tokens_sha = hashlib.sha256()
        self.starts = array("q")
        self.n_tokens = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def write(self, doc_ids: list[str], docs: list[np.ndarray]) -> None:
        if not docs:
            return
        for doc_id, doc in zip(doc_ids, docs, strict=True):
            self.starts.append(self.n_tokens)
            self.n_tokens += len(doc)
            self.ids_file.write(json.dumps(doc_id, ensure_ascii=False) + "\n")
        data = np.concatenate(docs).astype(TOKEN_DTYPE, copy=False)
        self.counts += np.bincount(data, minlength=len(self.counts))
        buffer = data.tobytes()
        self.tokens_sha.update(buffer)
        self.tokens_file.write(buffer)

    def abort(self) -> None:
        self.tokens_file.close()
        self.ids_file.close()

    def close(self) -> dict[str, dict[str, Any]]:
        """Flush, fsync and close the files; their manifest entries by role."""
        for f in (self.tokens_file, self.ids_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(self.directory / self.names["document_starts"], "wb") as f:
            np.save(f, np.frombuffer(self.starts, dtype=np.int64) if self.starts else np.zeros(0, np.int64))
            f.flush()
            os.fsync(f.fileno())
        digests = {"tokens": self.tokens_sha.hexdigest()}
        return {
            role: {
                "path": name,
                "bytes": (self.directory / name).stat().st_size,
                "sha256": digests.get(role) or sha256_file(self.directory / name),
            }
            for role, name in self.names.items()
        }


class _DatasetWriter:
    def __init__(
        self, directory: Path, tokenizer: CompressedTokenizer, separator_id: int, thresholds: tuple[int, int], seed: int
    ):
        self.directory, self.tokenizer, self.separator_id = directory, tokenizer, separator_id
        self.thresholds, self.seed = thresholds, seed
        self.encode = _batch_encoder(tokenizer)
        self.writers = [_SplitWriter(directory, split, tokenizer.raw_vocab_size) for split in SPLITS]
        self.read = self.empty = 0
        self.truncated = False

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()

    @property
    def total_tokens(self) -> int:
        return sum(w.n_tokens for w in self.writers)

    def consume(
        self,
        source: DocumentSource,
        clean: bool,
        max_tokens: int | None,
        batch_chars: int,
        bar: tqdm,
    ) -> None:
        documents = iter(source)
        try:
            batch: list[tuple[str, str]] = []
            chars = 0
            for doc_id, text in documents:
                if not isinstance(doc_id, str) or not isinstance(text, str):
                    raise TypeError(f"documents must be (str id, str text) pairs, got ({doc_id!r:.40}, {text!r:.40})")
                batch.append((doc_id, clean_text(text) if clean else text))
                chars += len(text)
                if chars >= self._batch_limit(batch_chars, max_tokens) or len(batch) >= _BATCH_DOCS:
                    if not self._write_batch(batch, max_tokens, bar):
                        return
                    batch, chars = [], 0
            if batch:
                self._write_batch(batch, max_tokens, bar)
        finally:
            close = getattr(documents, "close", None)
            if close is not None:
                close()  # a generator stopped early closes its files

    def _batch_limit(self, batch_chars: int, max_tokens: int | None) -> int:
        """Characters to gather before tokenizing: fewer near ``max_tokens`` (about 4 characters per token)."""
        if max_tokens is None:
            return batch_chars
        return min(batch_chars, max(10_000, 4 * (max_tokens - self.total_tokens)))

    def _write_batch(self, batch: list[tuple[str, str]], max_tokens: int | None, bar: tqdm) -> bool:
        """Tokenize and append a batch; False once ``max_tokens`` is reached."""
        encoded = self.encode([text for _, text in batch])
        per_split: list[tuple[list[str], list[np.ndarray]]] = [([], []) for _ in SPLITS]
        total = self.total_tokens
        keep_going = True
        for (doc_id, _), ids in zip(batch, encoded, strict=True):
            self.read += 1
            if not ids:
                self.empty += 1
                continue
            doc = np.empty(len(ids) + 1, dtype=np.int64)
            doc[:-1] = ids
            doc[-1] = self.separator_id
            index = _split_index(doc_id, self.seed, self.thresholds)
            per_split[index][0].append(doc_id)
            per_split[index][1].append(doc)
            total += len(doc)
            if max_tokens is not None and total >= max_tokens:
                self.truncated, keep_going = True, False
                break
        for writer, (doc_ids, docs) in zip(self.writers, per_split, strict=True):
            writer.write(doc_ids, docs)
        bar.update(sum(len(ids) for ids, _ in per_split))
        bar.set_postfix(tokens=f"{self.total_tokens:,}", refresh=False)
        return keep_going

    def finish(
        self, description: dict[str, Any], parameters: dict[str, Any], min_count: int, max_vocab: int | None
    ) -> dict[str, Any]:
        files = [writer.close() for writer in self.writers]
        train = self.writers[0]
        if self.total_tokens == 0:
            raise ValueError(
                f"the corpus holds no text ({self.read} documents read, all empty): {_describe(description)}"
            )
        if train.n_tokens == 0:
            raise ValueError(
                f"no document fell into the train split ({self.read - self.empty} documents): give more documents, "
                "a larger train fraction or a smaller max_doc_chars"
            )
        kept = np.flatnonzero(train.counts >= min_count)
        if max_vocab is not None and len(kept) > max_vocab:
            order = np.lexsort((kept, -train.counts[kept]))  # most frequent first, ties by id
            kept = np.sort(kept[order[:max_vocab]])
        if len(kept) == 0:
            raise ValueError(f"no token id occurs {min_count} times in the train split; lower min_count")
        kept = kept.astype(np.int64)
        vocab_path = self.directory / "vocab.npy"
        with open(vocab_path, "wb") as f:
            np.save(f, kept)
            f.flush()
            os.fsync(f.fileno())
        splits = {}
        for writer, split_files in zip(self.writers, files, strict=True):
            inside = int(writer.counts[kept].sum())
            splits[writer.split] = {
                "tokens": writer.n_tokens,
                "documents": len(writer.starts),
                "unknown_tokens": writer.n_tokens - inside,
                "files": split_files,
            }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "token_dtype": TOKEN_DTYPE_NAME,
            "tokenizer": {
                "fingerprint": self.tokenizer.fingerprint,
                "raw_vocab_size": self.tokenizer.raw_vocab_size,
                "canonical_vocab_size": len(self.tokenizer),
            },
            "separator_id": self.separator_id,
            "source": description,
            "parameters": parameters,
            "documents": {"read": self.read, "empty": self.empty, "written": self.read - self.empty},
            "truncated": self.truncated,
            "splits": splits,
            "vocabulary": {
                "size": len(kept),
                "model_vocab_size": len(kept) + 1,
                "unknown_id": 0,
                "min_count": min_count,
                "max_vocab": max_vocab,
                "train_coverage": int(train.counts[kept].sum()) / train.n_tokens,
                "file": {
                    "path": vocab_path.name,
                    "bytes": vocab_path.stat().st_size,
                    "sha256": sha256_file(vocab_path),
                },
            },
            "engram_version": __version__,
        }
        manifest["fingerprint"] = dataset_fingerprint(manifest)
        return manifest


def _describe(description: dict[str, Any]) -> str:
    return str(description.get("name") or description.get("path") or description.get("kind"))
