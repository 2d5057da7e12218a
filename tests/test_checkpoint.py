"""The checkpoint format: rank files that DCP reads, the manifest, verification before loading, no pickle, old
checkpoints refused, interrupted saves. Re-sharding between world sizes is tested in tests/test_distributed.py."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from engram.training import checkpoint
from engram.training.checkpoint import (
    MANIFEST,
    checkpoint_damage,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    read_tensors,
    save_checkpoint,
    step_folders,
    write_checkpoint_folder,
    write_rank_file,
)
from engram.training.errors import CheckpointVersionError, DamagedCheckpointError
from tests.distributed import checkpoint_ranks
from tests.test_training import _trainer

V1_MANIFEST = Path(__file__).parent / "data" / "checkpoint-v1" / "manifest.json"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _snapshot(folder: Path) -> dict[str, str]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _assert_untouched(trainer, before: dict[str, torch.Tensor]) -> None:
    for name, value in before.items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


# -- the files --------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_rank_file_has_the_header_dcps_writer_writes(tmp_path):
    tensors = {"w": torch.randn(5, 3), "step": torch.tensor(3.0), "ids": torch.arange(4)}
    dcp.save(dict(tensors), storage_writer=HuggingFaceStorageWriter(str(tmp_path / "dcp"), save_distributed=True))
    write_rank_file(tmp_path / "ours.safetensors", tensors, {})
    write_rank_file(tmp_path / "rows.safetensors", {"w": tensors["w"]}, {"w": 7})  # rows 7..11 of a bigger array
    (theirs,) = (tmp_path / "dcp").glob("*.safetensors")
    headers = {}
    for file in (theirs, tmp_path / "ours.safetensors", tmp_path / "rows.safetensors"):
        with safe_open(file, framework="pt") as f:
            headers[file.stem] = f.metadata()
            assert set(f.keys()) == ({"w"} if file.stem == "rows" else set(tensors)), file
    ours, dcp_header = headers["ours"], headers[theirs.stem]
    assert {k: v for k, v in ours.items() if k != "DCP_SHARDING_INFO"} == {
        k: v for k, v in dcp_header.items() if k != "DCP_SHARDING_INFO"
    }
    assert json.loads(ours["DCP_SHARDING_INFO"]) == json.loads(dcp_header["DCP_SHARDING_INFO"])
    assert json.loads(headers["rows"]["DCP_SHARDING_INFO"]) == {"w": {"saved_offsets": [7, 0]}}


def test_tensors_of_every_kind_come_back_bit_exactly_and_independent_of_the_file(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(4).to(torch.float16),
        "mask": torch.tensor([[True, False], [False, True]]),
        "int64": torch.tensor([-(2**62), 0, 2**62 + 1]),
        "uint8": torch.get_rng_state(),
        "special": torch.tensor([math.inf, -math.inf, math.nan, -0.0]),
        "transposed": torch.randn(4, 3).t(),
        "base": base,
        "same/storage": base,  # tied weights: safetensors refuses shared memory, so one is copied
        "slice": base[2:6],
        "strided": base.view(3, 4)[:, ::2],
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32),
    }
    folder = tmp_path / "step"
    folder.mkdir()
    meta = {"inf": math.inf, "nan": math.nan, "text": "naïve ~/path", "nested": [[1, [2.5, None]], {"a": -0.0}]}
    write_checkpoint_folder(folder, tensors, {}, {"world_size": 1, "meta": meta})
    assert checkpoint_damage(folder, hashes=True) is None
    manifest = read_manifest(folder)
    assert sorted(manifest["files"]) == ["shard_00000_of_00001.safetensors"] and manifest["version"] == 2
    assert math.isinf(manifest["meta"]["inf"]) and math.isnan(manifest["meta"]["nan"])
    assert manifest["meta"]["nested"] == [[1, [2.5, None]], {"a": -0.0}]
    loaded = read_tensors(folder)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        assert torch.equal(_bits(loaded[name]), _bits(value)), name
    (folder / "shard_00000_of_00001.safetensors").write_bytes(b"\0" * 100)  # the tensors are copies, not views
    assert torch.equal(_bits(loaded["base"]), _bits(base))


# -- a training checkpoint, saved and loaded --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(compressor, tmp_path_factory):
    """A trainer after 2 steps, and its checkpoint of step 2 (not to be changed: see ``saved``)."""
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    trainer = _trainer(compressor, run)
    trainer.train(until=2)
    return trainer, run / "checkpoints" / "step_00000002"


@pytest.fixture
def saved(trained, tmp_path):
    """The trainer after 2 steps and a copy of its checkpoint, for the test to damage."""
    trainer, path = trained
    copy = tmp_path / "checkpoints" / path.name
    shutil.copytree(path, copy)
    return trainer, copy


def test_a_loaded_checkpoint_restores_weights_optimizers_and_random_state_exactly(compressor, saved):
    trainer, path = saved
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, "shard_00000_of_00001.safetensors"]
    fresh = _trainer(compressor, None, seed=5)
    meta = load_checkpoint(path, fresh.model, fresh.optimizers)
    assert meta["step"] == 2 and meta["trainer"] == {"skipped_steps": 0, "skipped_in_a_row": 0}
    for (name, a), b in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(_bits(a), _bits(b)), name
    for name, optimizer in trainer.optimizers.items():
        original, restored = optimizer.state_dict(), fresh.optimizers[name].state_dict()
        assert original["param_groups"] == restored["param_groups"], name  # tuples stay tuples (betas)
        assert [type(v) for g in original["param_groups"] for v in g.values()] == [
            type(v) for g in restored["param_groups"] for v in g.values()
        ]
        for index, entries in original["state"].items():
            for key, value in entries.items():
                assert torch.equal(_bits(value), _bits(restored["state"][index][key])), (name, index, key)
    assert torch.equal(torch.get_rng_state(), read_tensors(path, ("rng/torch",))["rng/torch"])


def test_loading_never_unpickles(compressor, saved, monkeypatch):
    _, path = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be used")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh = _trainer(compressor, None, seed=5)
    assert load_checkpoint(path, fresh.model, fresh.optimizers)["step"] == 2
    assert fresh.model.engram_tables()[0].weight.abs().sum() > 0


class _Exploit:
    """Unpickling this creates a directory: the proof that something unpickled the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _rewrite_manifest(path: Path, edit) -> None:
    """Change the manifest as a forger would, with a matching SHA-256 of its own."""
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    manifest["sha256"] = checkpoint._digest(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_a_pickle_in_place_of_a_rank_file_is_never_unpickled(compressor, saved, tmp_path):
    _, path = saved
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"w": _Exploit(str(marker))}, protocol=4)
    shard = "shard_00000_of_00001.safetensors"
    (path / shard).write_bytes(payload)
    fresh = _trainer(compressor, None, seed=5)
    with pytest.raises(DamagedCheckpointError, match=f"{shard} does not match manifest.json"):
        load_checkpoint(path, fresh.model, fresh.optimizers)
    # a forger who also rewrites the recorded size and hash
    record = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    _rewrite_manifest(path, lambda m: m["files"].update({shard: record}))
    with pytest.raises(DamagedCheckpointError, match="does not parse as safetensors"):
        load_checkpoint(path, fresh.model, fresh.optimizers)
    assert not marker.exists()


# -- damage: refused before anything changes --------------------------------------------------------------------------
@pytest.mark.parametrize("file", [MANIFEST, "shard_00000_of_00001.safetensors"])
@pytest.mark.parametrize("where", [0.0, 0.001, 0.5, 1.0])
def test_a_flipped_byte_anywhere_is_refused_before_the_model_changes(compressor, saved, file, where):
    _, path = saved
    data = bytearray((path / file).read_bytes())
    data[min(len(data) - 1, int(where * len(data)))] ^= 0x01
    (path / file).write_bytes(bytes(data))
    fresh = _trainer(compressor, None, seed=5)
    before = _state(fresh)
    with pytest.raises(DamagedCheckpointError):
        load_checkpoint(path, fresh.model, fresh.optimizers)
    _assert_untouched(fresh, before)


def test_missing_extra_and_cut_files_are_named(compressor, saved):
    _, path = saved
    shard = path / "shard_00000_of_00001.safetensors"
    fresh = _trainer(compressor, None, seed=5)
    before = _state(fresh)
    shutil.copy(shard, path / "shard_00000_of_00002.safetensors")  # a file of another checkpoint
    assert "shard_00000_of_00002.safetensors is not a file of this checkpoint" in checkpoint_damage(path)
    (path / "shard_00000_of_00002.safetensors").unlink()
    assert checkpoint_damage(path) is None
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "found" in checkpoint_damage(path) and "does not match manifest.json" in checkpoint_damage(path)
    with pytest.warns(UserWarning, match="skipping the damaged or incomplete checkpoint"):
        assert latest_checkpoint(path.parent) is None
    shard.unlink()
    with pytest.raises(DamagedCheckpointError, match=r"lacks its file shard_00000_of_00001\.safetensors"):
        load_checkpoint(path, fresh.model, fresh.optimizers)
    _assert_untouched(fresh, before)


# -- checkpoints of the previous format --------------------------------------------------------------------------------
def test_a_version_1_checkpoint_is_refused_with_what_to_do_and_left_as_it_is(compressor, tmp_path):
    """tests/data/checkpoint-v1/manifest.json is the manifest of a real checkpoint written by the previous format."""
    run = tmp_path / "run"
    old = run / "checkpoints" / "step_00000002"
    old.mkdir(parents=True)
    shutil.copy(V1_MANIFEST, old / MANIFEST)
    trainer = _trainer(compressor, run, seed=5)
    before = _snapshot(run)
    for attempt in (trainer.resume, lambda: latest_checkpoint(run / "checkpoints"), lambda: read_manifest(old)):
        with pytest.raises(CheckpointVersionError) as refused:
            attempt()
        message = str(refused.value)
        assert "checkpoint format version 1" in message and "reads version 2 only" in message
        assert "with the engram that wrote it" in message and "nothing was changed" in message
    with pytest.raises(CheckpointVersionError):
        load_checkpoint(old, trainer.model, trainer.optimizers)
    assert _snapshot(run) == before  # not set aside as damaged, not pruned


# -- an interrupted save -----------------------------------------------------------------------------------------------
def test_an_interrupted_save_leaves_the_previous_checkpoint_and_is_cleaned_up(trained, tmp_path, monkeypatch):
    trainer = trained[0]

    def save(step: int) -> Path:
        return save_checkpoint(tmp_path, step, trainer.model, trainer.optimizers, trainer.config)

    path = save(2)
    before = _snapshot(path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save(3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-step_00000003", "step_00000002"]
    assert step_folders(tmp_path) == [path] and latest_checkpoint(tmp_path) == path and _snapshot(path) == before
    save(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


# -- tables ---------------------------------------------------------------------------------------------------------
def test_a_loaded_host_table_forgets_the_rows_its_cache_held(tmp_path):
    model, optimizers = checkpoint_ranks.build("host", seed=0)
    whole = checkpoint_ranks.table_arrays(model)
    for name, array in checkpoint._local_arrays(model.engram_tables()[0]).items():
        array.copy_(whole[f"tables/1/{name}"])
    save_checkpoint(tmp_path, 1, model, optimizers, checkpoint_ranks.TRAIN)
    other, other_optimizers = checkpoint_ranks.build("host", seed=3)
    table = other.engram_tables()[0]
    rows = torch.arange(10)
    with torch.no_grad():
        stale = table.lookup(rows).clone()  # now in the hot-row cache
        load_checkpoint(tmp_path / "step_00000001", other, other_optimizers)
        assert not torch.equal(stale, whole["tables/1/weight"][:10])
        assert torch.equal(table.lookup(rows), whole["tables/1/weight"][:10])
