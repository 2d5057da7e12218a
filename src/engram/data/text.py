"""Text cleaning and the cutting of long texts into documents of bounded size.

Both are pure functions of the text, so a corpus prepared twice gives the same documents, and a plain
text file cut while it is streamed from disk gives exactly the parts the same text would give in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# Project Gutenberg's licence header and footer. The markers are specific enough not to occur in prose.
_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE |THIS )?PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)
_TRAILING_SPACE = re.compile(r"[ \t\f\v]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 3 or more blank lines


def normalize_newlines(text: str) -> str:
    """``\\r\\n`` and lone ``\\r`` become ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg licence header (up to its ``*** START OF ...`` line) and footer (from its
    ``*** END OF ...`` or ``End of Project Gutenberg ...`` line); text without the markers is returned as is."""
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text


def clean_text(text: str) -> str:
    """The cleaning every prepared document goes through.

    Newlines normalised to ``\\n``, Project Gutenberg header and footer removed, trailing spaces and tabs
    stripped from every line, runs of three or more blank lines collapsed to two, and leading and trailing
    whitespace of the whole text removed. Text inside lines (including Unicode) is left untouched.
    """
    text = strip_gutenberg_boilerplate(normalize_newlines(text))
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.strip()


def _cut_point(buffer: str, max_chars: int) -> int:
    """Where to cut ``buffer`` (longer than ``max_chars``): after the last blank line, else the last newline,
    else the last space within the first ``max_chars`` characters, if that keeps at least half of them;
    otherwise exactly at ``max_chars``."""
    window = buffer[:max_chars]
    for separator in ("\n\n", "\n", " "):
        index = window.rfind(separator)
        if index >= max_chars // 2:
            return index + len(separator)
    return max_chars


def cut_blocks(blocks: Iterable[str], max_chars: int) -> Iterator[str]:
    """Consecutive parts of at most ``max_chars`` characters of the text given as ``blocks``, cut at paragraph
    (blank line), line or word boundaries where possible (see ``_cut_point``). Holds at most about
    ``max_chars`` plus one block in memory. The parts joined give the text back."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    buffer = ""
    for block in blocks:
        buffer += block
        while len(buffer) > max_chars:
            cut = _cut_point(buffer, max_chars)
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def cut_document(doc_id: str, text: str, max_chars: int | None) -> Iterator[tuple[str, str]]:
    """``(doc_id, text)`` itself if the text has at most ``max_chars`` characters (or ``max_chars`` is None),
    else its parts ``(f"{doc_id}#{k}", part)``, k = 0, 1, ..., each a document of its own. Newlines are
    normalised before cutting, as a file read in text mode is."""
    if max_chars is None or len(text) <= max_chars:
        yield doc_id, text
        return
    yield from name_parts(doc_id, cut_blocks([normalize_newlines(text)], max_chars))


def name_parts(doc_id: str, parts: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Ids for the parts of one text: ``doc_id`` alone if there is one part, ``doc_id#k`` if there are more."""
    first = next(parts, None)
    if first is None:
        return
    second = next(parts, None)
    if second is None:
        yield doc_id, first
        return
    yield f"{doc_id}#0", first
    yield f"{doc_id}#1", second
    for k, part in enumerate(parts, start=2):
        yield f"{doc_id}#{k}", part
