"""Training checkpoints: dense state, table shards and a manifest, written atomically by one or many ranks.

A checkpoint is a folder ``step_00001234``:

    dense/                      model weights except the Engram tables, every optimizer's state except
                                the tables' rows, random generators, step and configs
                                (``checkpoint_io.save_state``: safetensors plus JSON, no pickle)
    tables/shard_00001_of_00004.safetensors
                                rank 1's rows of every Engram table and of their row optimizer state:
                                ``layer_03/weight`` (rows [start, end) of ``shard_ranges``), ``layer_03/exp_avg``, ...
    manifest.json               written last: the world size, each table's shape, dtype and state arrays,
                                each shard file's row ranges, size and SHA-256

A single process writes one shard holding every row. Every rank writes its shard into
``.partial-step_...`` (each file under a temporary name, fsynced, renamed); rank 0 then writes the
dense state and the manifest and renames the folder into place, so a ``step_...`` folder is always
complete. Older checkpoints beyond ``keep_last`` are removed only after that.

Loading re-shards: each rank reads the rows of its own range from the shard files that hold them
(safetensors slices, not whole files), so a checkpoint written by 2 ranks resumes on 4 or on one
process. A missing shard, or one whose size or SHA-256 differs from the manifest, is refused.

``Durable`` tables (the disk tier; ``engram.storage.durable``) are not copied: their files are the
checkpoint, made consistent by two phases around the folder (``prepare_checkpoint``, write the folder,
``commit_checkpoint``). They can only be restored to the newest checkpoint, at the world size that
wrote it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engram._files import fsync_dir, fsync_file, sha256_file, swap_into_place
from engram.model.lm import EngramLM
from engram.storage.base import TableStorage, durable
from engram.storage.config import StorageConfig
from engram.storage.sharded import ShardedTable
from engram.training.checkpoint_io import checkpoint_complete, load_state, save_state
from engram.training.config import TrainConfig
from engram.training.distributed import all_ranks_agree, barrier, gather_bytes, rank, world_size
from engram.training.errors import DamagedCheckpointError, NonFiniteError
from engram.training.row_optim import RowOptimizer

DENSE = "dense"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "engram-checkpoint-manifest"
MANIFEST_VERSION = 1
SHARD_FILE = "tables/shard_{rank:05d}_of_{world:05d}.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_READ_BYTES = 64 << 20  # rows are copied out of shard files about this many bytes at a time


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


# -- the tables of a model ------------------------------------------------------------------------------
def _tables(model: EngramLM) -> dict[int, TableStorage]:
    """The Engram tables by layer."""
    return {layer: engram.table for layer, engram in model.engram_layers().items()}


def placement(model: EngramLM) -> StorageConfig:
    """The storage config the model's tables were placed with (``place_tables``); device if never placed."""
    return model.placement or StorageConfig()


def _row_range(table: TableStorage) -> tuple[int, int]:
    """The global rows [start, end) this process holds of ``table`` (all of them unless it is sharded)."""
    if isinstance(table, ShardedTable):
        return table.start, table.end
    return 0, table.num_rows


def shard_key(layer: int, name: str) -> str:
    """The name of array ``name`` (``weight`` or a row state) of table ``layer`` in a shard file."""
    return f"layer_{layer:02d}/{name}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _table_state_keys(model: EngramLM) -> set[str]:
    """The ``state_dict`` keys that belong to Engram tables (saved in the shards, not in ``dense/``)."""
    table_ids = {id(table) for table in model.engram_tables()}
    prefixes = tuple(name + "." for name, module in model.named_modules() if id(module) in table_ids)
    return {key for key in model.state_dict(keep_vars=True) if key.startswith(prefixes)}


def _shard_tensors(tables: dict[int, TableStorage]) -> dict[str, torch.Tensor]:
    """This process's rows of every table that is not ``Durable``, and of its row optimizer state."""
    tensors = {}
    for layer, table in tables.items():
        if durable(table) is not None:
            continue
        shard = table.local_shard()
        tensors[shard_key(layer, "weight")] = shard.weight.detach().cpu().contiguous()
        for name, state in shard.row_states().items():
            tensors[shard_key(layer, name)] = state.detach().cpu().contiguous()
    return tensors


def _table_entries(tables: dict[int, TableStorage]) -> dict[str, Any]:
    """The manifest's description of each table."""
    entries = {}
    for layer, table in tables.items():
        states = {
            name: {"row_shape": list(state.shape[1:]), "dtype": _dtype_name(state.dtype)}
            for name, state in table.local_shard().row_states().items()
        }
        entries[str(layer)] = {
            "num_rows": table.num_rows,
            "dim": table.dim,
            "dtype": _dtype_name(table.dtype),
            "persisted": durable(table) is not None,
            "states": states,
        }
    return entries


# -- writing --------------------------------------------------------------------------------------------
def write_shard(folder: Path, shard_rank: int, world: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write one shard file into checkpoint ``folder`` atomically; returns its manifest record (no row ranges)."""
    name = SHARD_FILE.format(rank=shard_rank, world=world)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (the last file of a checkpoint) durably."""
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def new_manifest(step: int, world: int, tables: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A manifest: ``tables`` as ``_table_entries`` gives them, ``shards`` with their ``rows`` per layer."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "world_size": world,
        "tables": tables,
        "shards": shards,
    }


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: EngramLM,
    optimizers: dict[str, torch.optim.Optimizer | RowOptimizer],
    train_config: TrainConfig,
    run_info: dict[str, Any] | None = None,
    keep_last: int = 2,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/step_<step>`` and prune older checkpoints; returns the new folder.

    ``trainer_state`` (JSON-able) comes back in the ``meta`` that ``load_checkpoint`` returns.
    Collective in a distributed run: every rank calls it and writes its own shard of the tables.

    Raises:
        NonFiniteError: a weight, optimizer state or table row in memory is NaN or infinite (on every
            rank, when any rank found one); nothing is written. Disk tables are not scanned: the
            trainer never applies an update computed from a non-finite gradient.
    """
    directory = Path(directory)
    world, me = world_size(), rank()
    final = directory / f"step_{step:08d}"
    staging = directory / f".partial-step_{step:08d}"
    tables = _tables(model)
    shard_tensors = _shard_tensors(tables)
    dense = _dense_tree(step, model, optimizers, train_config, run_info, trainer_state) if me == 0 else {}
    non_finite = _non_finite(shard_tensors) + _non_finite(dense)
    if not all_ranks_agree(not non_finite):
        where = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
        raise NonFiniteError(
            f"the checkpoint of step {step} was not written: the state holds NaN or infinite values "
            f"({where or 'on another rank'})"
        )
    persisted = [shard for shard in map(durable, tables.values()) if shard is not None]
    for table in persisted:
        table.prepare_checkpoint(step)
    if me == 0:
        for partial in directory.glob(".partial-step_*"):  # left by a crash during an earlier save
            shutil.rmtree(partial, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()

    record = write_shard(staging, me, world, shard_tensors)
    records = [json.loads(raw) for raw in gather_bytes(json.dumps(record).encode())]
    if me == 0:
        for shard_rank, shard in enumerate(records):
            shard["rows"] = {str(layer): _shard_rows(table, shard_rank) for layer, table in tables.items()}
        save_state(staging / DENSE, dense)
        write_manifest(staging, new_manifest(step, world, _table_entries(tables), records))
        swap_into_place(staging, final)
        complete = [p for _, p in _checkpoints(directory) if checkpoint_damage(p) is None]
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()  # the folder is in place on every rank before the disk tables count it as their restore point
    for table in persisted:
        table.commit_checkpoint(step)
    return final


def _non_finite(tree: Any, prefix: str = "") -> list[str]:
    """The names of the floating-point tensors in a nested dict/list ``tree`` that hold NaN or infinity."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for key, value in items for name in _non_finite(value, f"{prefix}/{key}" if prefix else str(key))]


def _shard_rows(table: TableStorage, shard_rank: int) -> list[int]:
    """The rows [start, end) of ``table`` that rank ``shard_rank`` holds."""
    if isinstance(table, ShardedTable):
        start, end = table.ranges[shard_rank]
        return [start, end]
    return [0, table.num_rows]


def _dense_tree(
    step: int,
    model: EngramLM,
    optimizers: dict[str, torch.optim.Optimizer | RowOptimizer],
    train_config: TrainConfig,
    run_info: dict[str, Any] | None,
    trainer_state: dict[str, Any] | None,
) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    in_shards = _table_state_keys(model)
    states = {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        if isinstance(optimizer, RowOptimizer):  # the row state is in the shards
            state = {"param_groups": state["param_groups"]}
        states[name] = state
    return {
        "meta": {
            "step": step,
            "model_config": model.config.to_dict(),
            "train_config": train_config.to_dict(),
            "run_info": run_info or {},
            "storage": placement(model).to_dict(),
            "trainer": trainer_state or {},
        },
        "model": {key: value for key, value in model.state_dict().items() if key not in in_shards},
        "optimizers": states,
        "rng": rng,
    }


# -- reading --------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, checked for format and consistency.

    Raises:
        FileNotFoundError: no manifest (not a checkpoint, or one that was never completed).
        ValueError: an unknown format or version, or shards whose row ranges do not tile each table.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"corrupt checkpoint {path}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file} is not an {MANIFEST_FORMAT} file")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{file} has version {manifest.get('version')!r}; this code reads version {MANIFEST_VERSION}")
    shards = manifest["shards"]
    if len(shards) != manifest["world_size"]:
        raise ValueError(f"corrupt checkpoint {path}: {len(shards)} shards listed for {manifest['world_size']} ranks")
    for layer, entry in manifest["tables"].items():
        covered = 0
        for shard in shards:
            start, end = shard["rows"][layer]
            if start != covered or end < start:
                raise ValueError(f"corrupt checkpoint {path}: the shards' rows of table {layer} do not tile it")
            covered = end
        if covered != entry["num_rows"]:
            raise ValueError(f"corrupt checkpoint {path}: the shards hold {covered} rows of the {entry['num_rows']}")
    return manifest


def checkpoint_damage(path: str | Path) -> str | None:
    """What is wrong with checkpoint ``path`` at a glance (manifest, dense state, shard sizes), or None.

    Shard files are checked for presence and size only; their SHA-256 is checked when they are loaded.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
        for shard in manifest["shards"]:
            size = (path / shard["file"]).stat().st_size
            if size != shard["bytes"]:
                return f"{shard['file']} has {size} bytes, {MANIFEST} records {shard['bytes']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return str(e)
    if not checkpoint_complete(path / DENSE):
        return f"its dense state ({DENSE}/) is missing, cut short or changed"
    return None


def step_folders(directory: str | Path) -> list[Path]:
    """The ``step_*`` checkpoint folders in ``directory``, newest first, complete or not."""
    return [path for _, path in reversed(_checkpoints(Path(directory)))]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``; damaged ones are skipped with a warning."""
    for path in step_folders(directory):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        warnings.warn(f"skipping the damaged or incomplete checkpoint {path}: {damage}", stacklevel=2)
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder so that it is never loaded, pruned or overwritten; returns the new path."""
    aside = path.with_name(f"{path.name}.damaged-{secrets.token_hex(3)}")
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


class ShardReader:
    """Rows of the table shards of one checkpoint, whatever world size wrote them.

    Each shard file is checked against the manifest (present, size, SHA-256) the first time it is read.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any] | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path) if manifest is None else manifest
        self._verified: set[str] = set()

    def _open(self, shard: dict[str, Any]) -> Path:
        file = self.path / shard["file"]
        if shard["file"] in self._verified:
            return file
        writers = self.manifest["world_size"]
        if not file.is_file():
            raise FileNotFoundError(
                f"checkpoint {self.path} lacks its table shard {shard['file']}: it was written by {writers} ranks "
                f"and every one of their {writers} shard files is needed; restore the file or use an older checkpoint"
            )
        size = file.stat().st_size
        if size != shard["bytes"] or sha256_file(file) != shard["sha256"]:
            raise ValueError(
                f"table shard {file} does not match {MANIFEST} of its checkpoint (recorded {shard['bytes']} bytes, "
                f"SHA-256 {shard['sha256'][:12]}..., found {size} bytes and another hash): it is damaged or belongs "
                "to another checkpoint; restore the file or use an older checkpoint"
            )
        self._verified.add(shard["file"])
        return file

    def verify(self, ranges: dict[int, tuple[int, int]]) -> None:
        """Check (presence, size, SHA-256) every shard file holding rows of ``ranges`` (layer -> [start, end)).

        Raises:
            FileNotFoundError, ValueError: as the first read of a damaged shard would.
        """
        for shard in self.manifest["shards"]:
            if any(
                shard["rows"][str(layer)][0] < end and start < shard["rows"][str(layer)][1]
                for layer, (start, end) in ranges.items()
                if str(layer) in shard["rows"]
            ):
                self._open(shard)

    def iter_rows(self, layer: int, name: str, start: int, end: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows [start, end) of array ``name`` of table ``layer``, in chunks ``(offset from start, values)``."""
        entry = self.manifest["tables"][str(layer)]
        row_shape = [entry["dim"]] if name == "weight" else entry["states"][name]["row_shape"]
        row_bytes = 8 * math.prod(row_shape)  # at most 8 bytes an element: a bound for the chunk size
        chunk = max(1, _READ_BYTES // row_bytes)
        for shard in self.manifest["shards"]:
            first, last = shard["rows"][str(layer)]
            lo, hi = max(first, start), min(last, end)
            if lo >= hi:
                continue
            file = self._open(shard)
            try:
                with safe_open(str(file), framework="pt") as f:
                    piece = f.get_slice(shard_key(layer, name))
                    if list(piece.get_shape()) != [last - first, *row_shape]:
                        raise ValueError(
                            f"table shard {file} holds {shard_key(layer, name)} with shape {piece.get_shape()}, "
                            f"its manifest says {[last - first, *row_shape]}"
                        )
                    for a in range(lo, hi, chunk):
                        b = min(hi, a + chunk)
                        yield a - start, piece[a - first : b - first]
            except SafetensorError as e:
                raise ValueError(f"table shard {file} does not parse ({e})") from e

    def read_rows(self, layer: int, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of array ``name`` of table ``layer`` as one tensor."""
        return torch.cat([values for _, values in self.iter_rows(layer, name, start, end)])


def _load_tables(reader: ShardReader, model: EngramLM, with_state: bool) -> None:
    """Fill every table (and, ``with_state``, its row optimizer state) with this process's rows."""
    step = int(reader.manifest["step"])
    for layer, table in _tables(model).items():
        in_place = durable(table)
        if in_place is not None:
            in_place.restore_checkpoint(step)
            continue
        shard = table.local_shard()
        start, end = _row_range(table)
        for first, values in reader.iter_rows(layer, "weight", start, end):
            shard.write_rows(torch.arange(first, first + len(values)), values)
        if not with_state:
            continue
        for name, state in shard.row_states().items():
            for first, values in reader.iter_rows(layer, name, start, end):
                rows = torch.arange(first, first + len(values), device=state.device)
                shard.write_state(name, rows, values.to(state.device))


def _check_tables_fit(path: Path, manifest: dict[str, Any], model: EngramLM, with_state: bool) -> None:
    """Refuse a checkpoint whose tables (shapes, optimizer state, sharding of disk tables) do not fit ``model``."""
    for layer, table in _tables(model).items():
        entry = manifest["tables"].get(str(layer))
        if entry is None or (entry["num_rows"], entry["dim"]) != (table.num_rows, table.dim):
            found = "no such table" if entry is None else f"a ({entry['num_rows']}, {entry['dim']}) table"
            raise ValueError(f"checkpoint {path} holds {found} for layer {layer}; the model has {table}")
        if durable(table) is not None:
            if manifest["world_size"] != world_size():
                raise ValueError(
                    f"the disk tables of checkpoint {path} are sharded over {manifest['world_size']} ranks and "
                    f"this job has {world_size()}: resume with {manifest['world_size']} ranks (disk shards are not "
                    "re-sharded; tables in the device or host tier are)"
                )
            continue
        allocated = table.local_shard().row_states()
        if with_state and set(allocated) != set(entry["states"]):
            raise ValueError(
                f"checkpoint {path} holds table optimizer state {sorted(entry['states'])} for layer {layer}, "
                f"this run's table optimizer keeps {sorted(allocated)}"
            )


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, current {b!r}")
    return diffs


def load_checkpoint(
    path: str | Path,
    model: EngramLM,
    optimizers: dict[str, torch.optim.Optimizer | RowOptimizer] | None = None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` (and ``optimizers``); returns its ``meta`` (``step``, configs, ...).

    Every file this process needs is verified (sizes, SHA-256) before anything is changed, so a
    damaged checkpoint leaves the model as it was. Any world size can load a checkpoint of device
    or host tables: each process reads its own rows. Collective in a distributed run: the ranks
    agree whether the checkpoint is usable.

    Raises:
        DamagedCheckpointError: a file of the checkpoint is missing, cut short, changed or unreadable
            (on every rank, when any rank found damage).
        ValueError: the checkpoint was written for a different model config, different run facts
            (e.g. another tokenizer), different optimizers or another table tier (the message lists the
            differences).
    """
    path = Path(path)
    device = next(model.parameters()).device
    damage = None
    try:
        manifest = read_manifest(path)
        tree = load_state(path / DENSE, map_location=device)
    except (OSError, ValueError) as e:
        damage = str(e)
    if damage is None:
        _check_fits(path, tree, manifest, model, optimizers, run_info)
        reader = ShardReader(path, manifest)
        try:
            reader.verify({layer: _row_range(table) for layer, table in _tables(model).items()})
        except (OSError, ValueError) as e:
            damage = str(e)
    if not all_ranks_agree(damage is None):
        raise DamagedCheckpointError(path, damage or "another rank found a damaged table shard")

    _load_tables(reader, model, with_state=optimizers is not None)
    missing, unexpected = model.load_state_dict(tree["model"], strict=False)
    missing = set(missing) - _table_state_keys(model)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {sorted(missing)}, extra {unexpected}")
    for name, optimizer in (optimizers or {}).items():
        optimizer.load_state_dict(tree["optimizers"][name])
    torch.set_rng_state(tree["rng"]["torch"].cpu())
    if "cuda" in tree["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in tree["rng"]["cuda"]])
    return tree["meta"]


def _check_fits(
    path: Path,
    tree: dict[str, Any],
    manifest: dict[str, Any],
    model: EngramLM,
    optimizers: dict[str, torch.optim.Optimizer | RowOptimizer] | None,
    run_info: dict[str, Any] | None,
) -> None:
    """Refuse, before anything is loaded, a checkpoint of another model, run, tier or set of optimizers."""
    meta = tree["meta"]
    diffs = _differences(meta["model_config"], model.config.to_dict())
    if diffs:
        raise ValueError(f"checkpoint {path} was written for another model config: " + "; ".join(diffs))
    if run_info:
        diffs = _differences({k: meta["run_info"].get(k) for k in run_info}, run_info)
        if diffs:
            raise ValueError(f"checkpoint {path} belongs to another run: " + "; ".join(diffs))
    saved_tier = meta.get("storage", {}).get("tier", "device")
    tier = placement(model).tier
    if (saved_tier == "disk") != (tier == "disk"):
        raise ValueError(
            f"checkpoint {path} keeps its Engram tables in the {saved_tier!r} tier and this model in the "
            f"{tier!r} tier; convert the tables with `engram tables convert` or place the model's tables in "
            f"storage tier {saved_tier!r} (engram.storage.place_tables)"
        )
    if optimizers is not None and set(tree["optimizers"]) != set(optimizers):
        raise ValueError(
            f"checkpoint {path} holds optimizers {sorted(tree['optimizers'])}, this run has {sorted(optimizers)}"
        )
    _check_tables_fit(path, manifest, model, with_state=optimizers is not None)
