"""Training checkpoints: one safetensors file per rank, read back at any world size by torch.distributed.checkpoint.

A checkpoint is a folder ``step_00001234``:

    shard_00000_of_00002.safetensors    rank 0: the dense state (``model/<key>``: the weights except the Engram
                                        tables; ``optimizers/<name>/<param>/<key>``: the dense optimizers' tensors;
                                        ``rng/torch``, ``rng/cuda/<i>``) and its rows of every Engram table
                                        (``tables/<layer>/weight``, ``tables/<layer>/exp_avg``, ...)
    shard_00001_of_00002.safetensors    rank 1's rows of every table
    manifest.json                       written last: step, configs, run facts, trainer state, the tables, the
                                        optimizers' hyper-parameters, each file's size and SHA-256, and the
                                        SHA-256 of the manifest itself

A rank file is in the layout of DCP's ``HuggingFaceStorageWriter(save_distributed=True)``: plain safetensors whose
header records where each tensor starts in its whole array (a rank's table rows start at its first row). It is
written with ``safetensors.torch.save_file``, which streams the tensors to the file (DCP's writer builds the file in
memory first, twice its size). Loading is ``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader``:
it reads the headers (JSON) and copies into each process's own tensors, in place, the rows it holds from every file
that has them; a sharded table is handed to it as a DTensor (``Shard(0)`` is the split of ``shard_ranges``). That is
the re-sharding: a checkpoint written by 2 ranks resumes on 4 or on one process. Nothing is unpickled; non-tensors
live in the manifest.

What DCP does not do is kept here: the folder is written as ``.partial-step_...`` and renamed into place by rank 0
(``_files.swap_into_place``); every file is checked against the manifest (present, size, SHA-256; no file it does
not list) before anything is loaded, so a damaged checkpoint leaves the model as it was; older checkpoints beyond
``keep_last`` are pruned only after a new one is complete; non-finite values are never written.

Tables that persist themselves (the disk tier) are not copied: their files are the checkpoint, made consistent by
two phases around the folder (prepare, write the folder, commit). They can only be restored to the newest
checkpoint, at the world size that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from engram._files import fsync_dir, fsync_file, sha256_file, swap_into_place
from engram.model.lm import EngramLM
from engram.storage.base import TableStorage, durable
from engram.storage.config import StorageConfig
from engram.storage.sharded import ShardedTable
from engram.training.config import TrainConfig
from engram.training.distributed import all_ranks_agree, barrier, gather_bytes, rank, world_size
from engram.training.errors import CheckpointVersionError, DamagedCheckpointError, NonFiniteError
from engram.training.row_optim import RowOptimizer

FORMAT = "engram-checkpoint-manifest"
VERSION = 2  # version 1: dense/ (safetensors and tagged JSON) and tables/ shard files, read by engram's own code
MANIFEST = "manifest.json"
RANK_FILE = "shard_{rank:05d}_of_{world:05d}.safetensors"
# The header of DCP's HuggingFaceStorageWriter (torch/distributed/checkpoint/_hf_utils.py), read by its reader.
_DCP_HEADER = {"DCP_VERSION": "1.0", "format": "pt"}
_DCP_OFFSETS = "DCP_SHARDING_INFO"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
Optimizers = dict[str, torch.optim.Optimizer | RowOptimizer]


# -- the tables: the only part of this module that knows the table interface (engram.storage) ---------------------
def _tables(model: EngramLM) -> dict[int, TableStorage]:
    """The Engram tables by layer."""
    return {layer: engram.table for layer, engram in model.engram_layers().items()}


def _is_durable(table: TableStorage) -> bool:
    """Whether the table's own files are its checkpoint (the disk tier): never copied, checkpointed in two phases."""
    return durable(table) is not None


def _prepare(table: TableStorage, step: int) -> None:
    durable(table).prepare_checkpoint(step)


def _commit(table: TableStorage, step: int) -> None:
    durable(table).commit_checkpoint(step)


def _restore(table: TableStorage, step: int) -> None:
    durable(table).restore_checkpoint(step)


def _row_range(table: TableStorage) -> tuple[int, int]:
    """The global rows [start, end) this process holds of ``table`` (all of them unless it is sharded)."""
    if isinstance(table, ShardedTable):
        return table.start, table.end
    return 0, table.num_rows


def _local_arrays(table: TableStorage, with_state: bool = True) -> dict[str, torch.Tensor]:
    """This process's rows of ``table`` (``weight``) and of its row optimizer state: the tensors themselves,
    which a load writes into."""
    shard = table.local_shard()
    arrays = {"weight": shard.weight.detach()}
    if with_state:
        arrays.update(shard.row_states())
    return arrays


def _state_names(table: TableStorage) -> list[str]:
    """The row optimizer state arrays the table holds."""
    return sorted(table.local_shard().row_states())


def _rows_written(table: TableStorage) -> None:
    """After a load wrote into ``_local_arrays``: forget the rows a hot-row cache kept of the old values."""
    cache = getattr(table.local_shard(), "cache", None)
    if cache is not None:
        cache.clear()


def _as_loaded_by_dcp(table: TableStorage, array: torch.Tensor) -> torch.Tensor:
    """``array`` as DCP loads into it: itself on one process; as a DTensor of the whole array, row-sharded like the
    table, when the table is sharded (DCP then copies into ``array`` the rows of this rank)."""
    if not isinstance(table, ShardedTable):
        return array
    mesh = DeviceMesh.from_group(table.group or dist.group.WORLD, array.device.type)
    shape = torch.Size((table.num_rows, *array.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    tensor = DTensor.from_local(array, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
    first = tensor.__create_chunk_list__()[0].offsets[0]  # where DCP will put these rows
    if first != table.start:
        raise RuntimeError(f"DTensor's Shard(0) places rank {table.rank}'s rows at {first}, the table at {table.start}")
    return tensor


def placement(model: EngramLM) -> StorageConfig:
    """The storage config the model's tables were placed with (``place_tables``); device if never placed."""
    return model.placement or StorageConfig()


def _table_state_keys(model: EngramLM) -> set[str]:
    """The ``state_dict`` keys that belong to Engram tables (saved as ``tables/...``, not ``model/...``)."""
    table_ids = {id(table) for table in model.engram_tables()}
    prefixes = tuple(name + "." for name, module in model.named_modules() if id(module) in table_ids)
    return {key for key in model.state_dict(keep_vars=True) if key.startswith(prefixes)}


# -- writing --------------------------------------------------------------------------------------------------------
def write_rank_file(path: Path, tensors: dict[str, torch.Tensor], first_rows: dict[str, int]) -> dict[str, Any]:
    """Write one rank's ``tensors`` to ``path`` (fsynced) in the layout DCP's ``HuggingFaceStorageReader`` reads:
    the header records each tensor's offset in its whole array, ``first_rows[name]`` rows (0 if absent) and 0 in
    the other dimensions. Returns the file's manifest record."""
    stored, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors sharing memory (tied weights)
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        stored[name] = tensor
    offsets = {
        name: {"saved_offsets": [first_rows.get(name, 0), *[0] * (t.dim() - 1)] if t.dim() else []}
        for name, t in stored.items()
    }
    save_file(stored, path, metadata={**_DCP_HEADER, _DCP_OFFSETS: json.dumps(offsets)})
    fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _digest(manifest: dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_checkpoint_folder(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    first_rows: dict[str, int],
    manifest: dict[str, Any] | None,
) -> None:
    """Write this rank's file into ``folder``; rank 0 then writes ``manifest`` (only rank 0's is used), completed
    with the format, every rank's file record and its own SHA-256, as the last file. Collective."""
    name = RANK_FILE.format(rank=rank(), world=world_size())
    record = {name: write_rank_file(folder / name, tensors, first_rows)}
    files = {}
    for raw in gather_bytes(json.dumps(record).encode()):
        files.update(json.loads(raw))
    if rank() != 0:
        return
    fsync_dir(folder)  # the other ranks' files are complete and durable: they fsynced before the gather
    body = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **(manifest or {}), "files": files}))
    body["sha256"] = _digest(body)  # over the body as it reads back (string keys, lists for tuples)
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: EngramLM,
    optimizers: Optimizers,
    train_config: TrainConfig,
    run_info: dict[str, Any] | None = None,
    keep_last: int = 2,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/step_<step>`` and prune older checkpoints; returns the new folder.

    ``trainer_state`` (JSON-able) comes back in the ``meta`` that ``load_checkpoint`` returns.
    Collective in a distributed run: every rank calls it and writes its own rows of the tables.

    Raises:
        NonFiniteError: a weight, optimizer state or table row in memory is NaN or infinite (on every
            rank, when any rank found one); nothing is written. Disk tables are not scanned: the
            trainer never applies an update computed from a non-finite gradient.
    """
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    staging = directory / f".partial-step_{step:08d}"
    tables = _tables(model)
    tensors, first_rows = {}, {}
    for layer, table in tables.items():
        if not _is_durable(table):
            for name, array in _local_arrays(table).items():
                tensors[f"tables/{layer}/{name}"] = array
                first_rows[f"tables/{layer}/{name}"] = _row_range(table)[0]
    manifest = None
    if rank() == 0:  # the dense state is the same on every rank
        dense, optimizer_json = _dense_state(model, optimizers)
        tensors.update(dense)
        manifest = {
            "world_size": world_size(),
            "meta": {
                "step": step,
                "model_config": model.config.to_dict(),
                "train_config": train_config.to_dict(),
                "run_info": run_info or {},
                "storage": placement(model).to_dict(),
                "trainer": trainer_state or {},
            },
            "tables": {
                str(layer): {
                    "num_rows": table.num_rows,
                    "dim": table.dim,
                    "persisted": _is_durable(table),
                    "states": _state_names(table),
                }
                for layer, table in tables.items()
            },
            "optimizers": optimizer_json,
        }
    non_finite = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not all_ranks_agree(not non_finite):
        where = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
        raise NonFiniteError(
            f"the checkpoint of step {step} was not written: the state holds NaN or infinite values "
            f"({where or 'on another rank'})"
        )
    in_place = [table for table in tables.values() if _is_durable(table)]
    for table in in_place:
        _prepare(table, step)
    if rank() == 0:
        for partial in directory.glob(".partial-step_*"):  # left by a crash during an earlier save
            shutil.rmtree(partial, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    write_checkpoint_folder(staging, tensors, first_rows, manifest)
    if rank() == 0:
        swap_into_place(staging, final)
        complete = [p for _, p in _checkpoints(directory) if _prunable(p)]
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()  # the folder is in place on every rank before the disk tables count it as their restore point
    for table in in_place:
        _commit(table, step)
    return final


def _prunable(path: Path) -> bool:
    """A complete checkpoint of this format (one of another version is never deleted here)."""
    try:
        return checkpoint_damage(path) is None
    except CheckpointVersionError:
        return False


def _dense_state(model: EngramLM, optimizers: Optimizers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything but the tables: the tensors by name, and the optimizers' hyper-parameters and other non-tensors."""
    in_tables = _table_state_keys(model)
    tensors = {f"model/{key}": value for key, value in model.state_dict().items() if key not in in_tables}
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    described = {}
    for name, optimizer in optimizers.items():
        saved = optimizer.state_dict()
        scalars: dict[int, dict[str, Any]] = {}
        if not isinstance(optimizer, RowOptimizer):  # a row optimizer's arrays are saved with the table rows
            for index, entries in saved["state"].items():
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizers/{name}/{index}/{key}"] = value
                    else:
                        scalars.setdefault(index, {})[key] = value
        described[name] = {"param_groups": saved["param_groups"], "state": scalars}
    return tensors, described


# -- reading --------------------------------------------------------------------------------------------------------
def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, checked for format, version and its own SHA-256.

    Raises:
        FileNotFoundError: no manifest (not a checkpoint, or one that was never completed).
        CheckpointVersionError: a checkpoint of another format version (written by an older or newer engram).
        ValueError: not JSON, not a checkpoint manifest, or changed since it was written.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"corrupt checkpoint {path}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not an {FORMAT} file")
    version = manifest.get("version")
    if version != VERSION and ("sha256" not in manifest or manifest["sha256"] == _digest(manifest)):
        written = "an earlier engram, one with engram/training/checkpoint_io.py" if version == 1 else "another engram"
        raise CheckpointVersionError(
            f"checkpoint {path} is in checkpoint format version {version!r}, written by {written}; this engram reads "
            f"version {VERSION} only. Resume, evaluate or convert that run with the engram that wrote it, or train a "
            "new run into another folder; nothing was changed"
        )
    if manifest.get("sha256") != _digest(manifest):
        raise ValueError(f"corrupt checkpoint {path}: {MANIFEST} was changed after it was written (SHA-256 differs)")
    return manifest


def _files_damage(path: Path, manifest: dict[str, Any], names: Iterable[str], hashes: bool) -> str | None:
    """What is wrong with the files ``names`` of checkpoint ``path`` (missing, size, with ``hashes`` the SHA-256),
    or with the folder (a safetensors file the manifest does not list); None if nothing."""
    files = manifest["files"]
    strangers = sorted({p.name for p in path.glob("*.safetensors")} - set(files))
    if strangers:
        return f"{path / strangers[0]} is not a file of this checkpoint ({MANIFEST} does not list it)"
    for name in names:
        file, record = path / name, files[name]
        if not file.is_file():
            writers = manifest["world_size"]
            return (
                f"checkpoint {path} lacks its file {name}: it was written by {writers} ranks and every one of their "
                f"{writers} files is needed; restore the file or use an older checkpoint"
            )
        size = file.stat().st_size
        if size != record["bytes"] or (hashes and sha256_file(file) != record["sha256"]):
            found = f"{size} bytes" + (" and another hash" if size == record["bytes"] else "")
            return (
                f"checkpoint file {file} does not match {MANIFEST} (recorded {record['bytes']} bytes, SHA-256 "
                f"{record['sha256'][:12]}..., found {found}): it is damaged or belongs to another checkpoint; "
                "restore the file or use an older checkpoint"
            )
    return None


def checkpoint_damage(path: str | Path, hashes: bool = False) -> str | None:
    """What is wrong with checkpoint ``path`` (manifest, which files, their sizes and, with ``hashes``, their
    SHA-256), or None. With ``hashes`` in a distributed run, each rank hashes its share of the files and every
    rank returns what any rank found (collective).

    Raises:
        CheckpointVersionError: not damage; a checkpoint of another format version.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
        names = sorted(manifest["files"])
        damage = _files_damage(path, manifest, names[rank() :: world_size()] if hashes else names, hashes)
    except CheckpointVersionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        damage = str(e)
    if hashes:
        found = [d for raw in gather_bytes(json.dumps(damage).encode()) if (d := json.loads(raw)) is not None]
        damage = damage or (found[0] if found else None)
    return damage


def _saved(path: Path) -> dict[str, Any]:
    """Name -> DCP's description (shape, dtype) of every tensor of checkpoint ``path``, from the files' headers.

    Raises:
        DamagedCheckpointError: a file is not safetensors (its recorded hash was rewritten with it).
    """
    try:
        return HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    except SafetensorError as e:
        raise DamagedCheckpointError(path, f"a file does not parse as safetensors ({e})") from e


def _dcp_load(path: Path, targets: dict[str, torch.Tensor], one_process: bool) -> None:
    """Fill ``targets`` in place from checkpoint ``path``; collective unless ``one_process``."""
    with warnings.catch_warnings():  # DCP warns that it runs without a process group, which is what one process does
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=one_process)


def read_tensors(path: str | Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``path`` whose names start with one of ``prefixes`` (default: all), whole (table
    arrays assembled from every rank's file), on the CPU. In this process only; check the files with
    ``checkpoint_damage(path, hashes=True)`` first."""
    path = Path(path)
    saved = _saved(path)
    names = [name for name in saved if name.startswith(prefixes)]
    tensors = {name: torch.empty(saved[name].size, dtype=saved[name].properties.dtype) for name in names}
    _dcp_load(path, tensors, one_process=True)
    return tensors


def step_folders(directory: str | Path) -> list[Path]:
    """The ``step_*`` checkpoint folders in ``directory``, newest first, complete or not."""
    return [path for _, path in reversed(_checkpoints(Path(directory)))]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``; damaged ones are skipped with a warning.

    Raises:
        CheckpointVersionError: the newest checkpoint is in another format version.
    """
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


def load_checkpoint(
    path: str | Path,
    model: EngramLM,
    optimizers: Optimizers | None = None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` (and ``optimizers``); returns its ``meta`` (``step``, configs, ...).

    Every file is verified (``checkpoint_damage(path, hashes=True)``) before anything is changed, so a damaged
    checkpoint leaves the model as it was. Any world size can load a checkpoint of device or host tables: DCP copies
    each process's rows into its tables in place. Collective in a distributed run.

    Raises:
        DamagedCheckpointError: a file of the checkpoint is missing, cut short, changed or unreadable
            (on every rank, when any rank found damage).
        CheckpointVersionError: a checkpoint of another format version (nothing is changed).
        ValueError: the checkpoint was written for a different model config, different run facts
            (e.g. another tokenizer), different optimizers or another table tier (the message lists the
            differences).
    """
    path = Path(path)
    damage = checkpoint_damage(path, hashes=True)
    if damage is not None:
        raise DamagedCheckpointError(path, damage)
    manifest = read_manifest(path)
    _check_fits(path, manifest, model, optimizers, run_info)

    with_state = optimizers is not None
    saved = _saved(path)
    wanted = ("model/", "rng/", "optimizers/") if with_state else ("model/", "rng/")
    dense = {name for name in saved if name.startswith(wanted)}
    expected = {f"model/{key}" for key in model.state_dict()} - {f"model/{key}" for key in _table_state_keys(model)}
    saved_model = {name for name in dense if name.startswith("model/")}
    if saved_model != expected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {sorted(expected - saved_model)}, "
            f"extra {sorted(saved_model - expected)}"
        )
    targets = {name: torch.empty(saved[name].size, dtype=saved[name].properties.dtype) for name in dense}
    tables = _tables(model)
    step = int(manifest["meta"]["step"])
    for layer, table in tables.items():
        if _is_durable(table):
            _restore(table, step)
            continue
        for name, array in _local_arrays(table, with_state).items():
            targets[f"tables/{layer}/{name}"] = _as_loaded_by_dcp(table, array)
    _dcp_load(path, targets, one_process=world_size() == 1)
    for table in tables.values():
        if not _is_durable(table):
            _rows_written(table)
    _load_dense(targets, manifest, model, optimizers)
    return manifest["meta"]


def _load_dense(
    tensors: dict[str, torch.Tensor], manifest: dict[str, Any], model: EngramLM, optimizers: Optimizers | None
) -> None:
    """Put the dense state (``_dense_state``'s tensors, read back, and the manifest's part) into the model,
    the optimizers and the random generators."""
    weights = {name.removeprefix("model/"): t for name, t in tensors.items() if name.startswith("model/")}
    model.load_state_dict(weights, strict=False)  # the table keys are absent: they were loaded in place
    for name, optimizer in (optimizers or {}).items():
        described = manifest["optimizers"][name]
        tuples = {key for group in optimizer.param_groups for key, value in group.items() if isinstance(value, tuple)}
        groups = [{k: tuple(v) if k in tuples else v for k, v in group.items()} for group in described["param_groups"]]
        if isinstance(optimizer, RowOptimizer):  # its arrays were loaded with the table rows
            optimizer.load_state_dict({"param_groups": groups})
            continue
        state: dict[int, dict[str, Any]] = {int(index): dict(entries) for index, entries in described["state"].items()}
        prefix = f"optimizers/{name}/"
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                index, entry = key[len(prefix) :].split("/", 1)
                state.setdefault(int(index), {})[entry] = tensor
        optimizer.load_state_dict({"state": dict(sorted(state.items())), "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((int(name.rsplit("/", 1)[1]), t) for name, t in tensors.items() if name.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t for _, t in cuda])


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, current {b!r}")
    return diffs


def _check_fits(
    path: Path,
    manifest: dict[str, Any],
    model: EngramLM,
    optimizers: Optimizers | None,
    run_info: dict[str, Any] | None,
) -> None:
    """Refuse, before anything is loaded, a checkpoint of another model, run, tier, table layout or optimizer set."""
    meta = manifest["meta"]
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
    if optimizers is not None and set(manifest["optimizers"]) != set(optimizers):
        raise ValueError(
            f"checkpoint {path} holds optimizers {sorted(manifest['optimizers'])}, this run has {sorted(optimizers)}"
        )
    for layer, table in _tables(model).items():
        entry = manifest["tables"].get(str(layer))
        if entry is None or (entry["num_rows"], entry["dim"]) != (table.num_rows, table.dim):
            found = "no such table" if entry is None else f"a ({entry['num_rows']}, {entry['dim']}) table"
            raise ValueError(f"checkpoint {path} holds {found} for layer {layer}; the model has {table}")
        if _is_durable(table):
            if manifest["world_size"] != world_size():
                raise ValueError(
                    f"the disk tables of checkpoint {path} are sharded over {manifest['world_size']} ranks and "
                    f"this job has {world_size()}: resume with {manifest['world_size']} ranks (disk shards are not "
                    "re-sharded; tables in the device or host tier are)"
                )
        elif optimizers is not None and entry["states"] != _state_names(table):
            raise ValueError(
                f"checkpoint {path} holds table optimizer state {entry['states']} for layer {layer}, "
                f"this run's table optimizer keeps {_state_names(table)}"
            )
