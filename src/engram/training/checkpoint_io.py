"""Training state on disk without pickle: tensors in safetensors, the rest in JSON, replaced atomically.

A checkpoint is a directory holding two files:

- ``tensors.safetensors``: every tensor of the tree, named by its path in the tree
  (``"model/layers.0.weight"``, ``"optimizers/adamw/state/0/exp_avg"``);
- ``state.json``: the tree with each tensor replaced by a reference to that name, plus the format name, the
  format version and the SHA-256 of ``tensors.safetensors``.

Nothing is ever unpickled: ``state.json`` is read by ``json`` and the tensors by ``safetensors``, and only after
the tensors file's hash has been checked. ``save_state`` writes a complete checkpoint into a temporary sibling
directory and renames it into place, so a crash never leaves a half-written checkpoint at the path.

In ``state.json`` every JSON object inside ``"tree"`` is one of these tagged nodes, so the encoding is unambiguous:

    {"tensor": "model/0.weight"}        a tensor, by its name in tensors.safetensors
    {"dict": [[key, value], ...]}       a mapping; keys are strings or integers, type and order kept
    {"tuple": [value, ...]}             a tuple (a list is a plain JSON array)
    {"float": "inf" | "-inf" | "nan"}   a non-finite float (other floats, ints, bools, None, strings: plain JSON)

Tensor names join the path's steps with ``/``. A step is a list index or an integer key in decimal, or a string
key with ``~`` written ``~0`` and ``/`` written ``~1`` (as in JSON Pointer); a string key that would read as an
integer, or that is safetensors' reserved ``__metadata__``, is prefixed with ``~2``. Distinct paths therefore
always give distinct names.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engram._files import fsync_dir, fsync_file, sha256_file, swap_into_place

FORMAT = "engram-checkpoint"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_INT_LIKE = re.compile(r"-?[0-9]+")


def save_state(directory: str | os.PathLike, tree: Mapping[str | int, Any]) -> Path:
    """Write ``tree`` as a checkpoint at ``directory``, replacing any checkpoint already there, atomically.

    ``tree`` nests mappings (str or int keys), lists, tuples, tensors and JSON scalars (int, float including
    inf and nan, bool, None, str). Tensors are saved detached, on the CPU, contiguous; tensors that share memory
    are each saved in full (the sharing is not restored on load). Anything else raises ``TypeError`` before the
    disk is touched.

    Both files are written into ``.tmp-<name>-<random>`` next to ``directory`` and fsynced with it. Then an
    existing ``directory`` is renamed to ``.old-<name>-<random>``, the new one is renamed into place, the parent
    directory is fsynced and the old one deleted. On any error the temporary directory is removed and the
    previous checkpoint is left (or put back) where it was. A crash between the two renames leaves the previous,
    complete checkpoint under its ``.old-`` name; a crash before them leaves a ``.tmp-`` directory behind. Neither
    is cleaned up automatically. Concurrent saves to the same ``directory`` are not supported.

    Returns the absolute path of the checkpoint.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"a checkpoint tree must be a mapping, got {type(tree).__name__}")
    target = Path(directory).absolute()
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": FORMAT, "version": VERSION, "tensors_sha256": None, "tree": _encode(tree, (), tensors, set())}

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a checkpoint directory")
    tmp = parent / f".tmp-{target.name}-{secrets.token_hex(8)}"
    tmp.mkdir()
    try:
        save_file(tensors, tmp / TENSORS_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
        document["tensors_sha256"] = sha256_file(tmp / TENSORS_FILE)
        fsync_file(tmp / TENSORS_FILE)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(document, f, allow_nan=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_state(directory: str | os.PathLike, map_location: str | int | torch.device = "cpu") -> dict[Any, Any]:
    """Read the checkpoint at ``directory`` back into the tree given to ``save_state``.

    Mappings come back as plain ``dict`` (integer keys as ``int``, order kept), tuples as tuples (tuple
    subclasses such as ``torch.Size`` or named tuples as plain tuples), lists as lists, and tensors as ordinary
    tensors on ``map_location``, each with its own memory (read into memory, not memory-mapped from the file).

    Raises ``FileNotFoundError`` (naming the path) if the directory or one of its files is missing, and
    ``ValueError`` for an unknown format or version, a tensors file whose SHA-256 differs from the recorded one
    or that does not parse, or a reference to a tensor absent from the file. Never uses pickle or ``torch.load``.
    """
    directory = Path(directory)
    document = _verified_document(directory)
    try:
        # "pread" reads the verified file into memory; the default mmap would keep reading it lazily after the check.
        tensors = load_file(directory / TENSORS_FILE, device=str(torch.device(map_location)), backend="pread")
    except SafetensorError as e:
        raise ValueError(f"corrupt checkpoint {directory}: {TENSORS_FILE} does not parse ({e})") from e
    return _decode(document["tree"], tensors, directory)


def checkpoint_complete(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds a complete checkpoint of a known format and version whose tensors file matches
    its recorded SHA-256 and holds every tensor ``state.json`` refers to. Reads only the header of the tensors
    file besides hashing it; never raises for a missing or damaged checkpoint."""
    directory = Path(directory)
    try:
        document = _verified_document(directory)
        with safe_open(directory / TENSORS_FILE, framework="pt") as f:
            names = dict.fromkeys(f.keys())
        _decode(document["tree"], names, directory)
    except (OSError, ValueError, RecursionError, SafetensorError):
        return False
    return True


def _encode(value: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """The JSON node of ``value``; its tensors are added to ``tensors`` under their path names."""
    if isinstance(value, torch.Tensor):
        name = "/".join(path)
        tensors[name] = _storable(value, storages)
        return {"tensor": name}
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint keys must be str or int, got {key!r} at '{'/'.join(path)}'")
            items.append([key, _encode(item, (*path, _step(key)), tensors, storages)])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        encoded = [_encode(item, (*path, str(i)), tensors, storages) for i, item in enumerate(value)]
        return {"tuple": encoded} if isinstance(value, tuple) else encoded
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a checkpoint (at '{'/'.join(path)}')")


def _step(key: str | int) -> str:
    """One step of a tensor name (see the module docstring)."""
    if isinstance(key, int):
        return str(key)
    escaped = key.replace("~", "~0").replace("/", "~1")
    return "~2" + escaped if _INT_LIKE.fullmatch(escaped) or escaped == "__metadata__" else escaped


def _storable(tensor: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """``tensor`` detached, on the CPU, contiguous and sharing memory with no tensor collected so far."""
    stored = tensor.detach().cpu().contiguous()
    pointer = stored.untyped_storage().data_ptr()
    if pointer in storages:
        stored = stored.clone()
        pointer = stored.untyped_storage().data_ptr()
    if pointer:  # empty tensors have no storage to share
        storages.add(pointer)
    return stored


def _decode(node: Any, tensors: Mapping[str, Any], directory: Path) -> Any:
    """The value of a JSON node written by ``_encode``, its tensor references looked up in ``tensors``."""
    if isinstance(node, list):
        return [_decode(item, tensors, directory) for item in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, payload),) = node.items()
        if tag == "tensor" and isinstance(payload, str):
            if payload not in tensors:
                raise ValueError(f"corrupt checkpoint {directory}: no tensor {payload!r} in {TENSORS_FILE}")
            return tensors[payload]
        if tag == "dict" and isinstance(payload, list) and all(_is_pair(pair) for pair in payload):
            return {key: _decode(value, tensors, directory) for key, value in payload}
        if tag == "tuple" and isinstance(payload, list):
            return tuple(_decode(item, tensors, directory) for item in payload)
        if tag == "float" and payload in _NON_FINITE:
            return _NON_FINITE[payload]
    raise ValueError(f"corrupt checkpoint {directory}: unexpected node in {STATE_FILE}: {str(node)[:100]}")


def _is_pair(pair: Any) -> bool:
    """A ``[key, value]`` entry of a mapping node, its key a string or an integer."""
    return isinstance(pair, list) and len(pair) == 2 and type(pair[0]) in (str, int)


def _verified_document(directory: Path) -> dict[str, Any]:
    """``state.json`` of ``directory``, once its format, its version and the tensors file's hash are checked."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    for name in (STATE_FILE, TENSORS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"incomplete checkpoint: {directory / name} is missing")
    try:
        document = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"corrupt checkpoint {directory}: {STATE_FILE} is not valid JSON ({e})") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{directory / STATE_FILE} is not an {FORMAT} state file")
    version = document.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"{directory / STATE_FILE} has format version {version!r}; this code reads version {VERSION}")
    digest = sha256_file(directory / TENSORS_FILE)
    if digest != document.get("tensors_sha256"):
        raise ValueError(
            f"corrupt checkpoint {directory}: {TENSORS_FILE} has SHA-256 {digest}, "
            f"{STATE_FILE} records {document.get('tensors_sha256')!r}"
        )
    tree = document.get("tree")
    if not isinstance(tree, dict) or list(tree) != ["dict"]:
        raise ValueError(f"corrupt checkpoint {directory}: the tree in {STATE_FILE} is not a mapping")
    return document
