"""Checkpoints without pickle: exact round trip of real training state, atomic replacement, corruption, pickles."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import random
from collections.abc import Mapping

import pytest
import torch
from safetensors import safe_open
from torch import nn

from engram.training import checkpoint_io
from engram.training.checkpoint_io import checkpoint_complete, load_state, save_state


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 4))
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "weight_decay": 0.0},
            {"params": model[1].parameters()},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        weight_decay=0.1,
    )
    return model, optimizer


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 11, (3, 5), generator=generator)
    target = torch.randn(3, 5, 4, generator=generator)
    optimizer.zero_grad()
    loss = (model(ids) - target).pow(2).mean()
    loss.backward()
    optimizer.step()


def _trained() -> tuple[nn.Module, torch.optim.AdamW]:
    model, optimizer = _model_and_optimizer()
    for step in range(2):
        _train_step(model, optimizer, step)
    return model, optimizer


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(saved, loaded, where: str = "") -> None:
    """Bit-for-bit equality, with the types load_state promises (mappings come back as dicts)."""
    if isinstance(saved, torch.Tensor):
        assert type(loaded) is torch.Tensor, where
        assert loaded.dtype == saved.dtype and loaded.shape == saved.shape, where
        assert loaded.device.type == "cpu", where
        # Compare bytes, so that NaN payloads and -0.0 count too.
        assert torch.equal(_bytes(saved), _bytes(loaded)), where
    elif isinstance(saved, Mapping):
        assert isinstance(loaded, dict), where
        assert list(saved) == list(loaded), where
        assert [type(k) for k in saved] == [type(k) for k in loaded], where
        for key in saved:
            _assert_same(saved[key], loaded[key], f"{where}/{key!r}")
    elif isinstance(saved, (list, tuple)):
        assert type(loaded) is (tuple if isinstance(saved, tuple) else list), where
        assert len(saved) == len(loaded), where
        for i, (a, b) in enumerate(zip(saved, loaded, strict=True)):
            _assert_same(a, b, f"{where}/{i}")
    elif isinstance(saved, float) and math.isnan(saved):
        assert type(loaded) is float and math.isnan(loaded), where
    else:
        assert type(loaded) is type(saved) and loaded == saved, where
        if isinstance(saved, float):
            assert math.copysign(1.0, saved) == math.copysign(1.0, loaded), where


def _leaves(value):
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _full_tree() -> tuple[dict, nn.Module, torch.optim.AdamW]:
    model, optimizer = _trained()
    base = torch.arange(12, dtype=torch.float32)
    tree = {
        "model": model.state_dict(),
        "optimizers": {"adamw": optimizer.state_dict()},
        "extra": {
            "bf16": torch.randn(3, 5).to(torch.bfloat16),
            "mask": torch.tensor([[True, False], [False, True]]),
            "int64": torch.tensor([-(2**62), 0, 2**62 + 1]),
            "special": torch.tensor([math.inf, -math.inf, math.nan, -0.0]),
            "transposed": torch.randn(4, 3).t(),  # non-contiguous
            "base": base,
            "slice": base[2:6],  # shares storage with base
            "strided": base.view(3, 4)[:, ::2],  # shares storage and is non-contiguous
            "empty": torch.zeros(0, 3),
            "empty2": torch.zeros(0),
            "scalar": torch.tensor(7, dtype=torch.int32),
        },
        "loader": {"epoch": 3, "position": 1234567890123, "shuffle": True, "files": ["a.bin", "b.bin"]},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "meta": {
            "inf": math.inf,
            "ninf": -math.inf,
            "nan": math.nan,
            "neg_zero": -0.0,
            "third": 1 / 3,
            "none": None,
            "text": "naïve ~/path",
            "nested": [[1, [2.5, None]], (3, "x"), [], {}],
        },
        # Keys that would collide if int keys, string keys and separators were not told apart.
        "keys": {
            0: torch.tensor([0]),
            "0": torch.tensor([1]),
            "a/b": torch.tensor([2]),
            "a~1b": torch.tensor([3]),
            "": torch.tensor([4]),
            -1: torch.tensor([5]),
            "~20": torch.tensor([6]),
        },
        "__metadata__": torch.tensor([8]),
    }
    return tree, model, optimizer


def test_round_trip_of_real_training_state(tmp_path):
    tree, _, _ = _full_tree()
    expected = copy.deepcopy(tree)
    path = save_state(tmp_path / "ckpt", tree)
    assert path == tmp_path / "ckpt"
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    _assert_same(tree, expected)  # saving leaves the tree untouched
    loaded = load_state(path)
    _assert_same(expected, loaded)
    assert isinstance(loaded["optimizers"]["adamw"]["state"][0]["step"], torch.Tensor)
    assert loaded["optimizers"]["adamw"]["state"][0]["step"].shape == ()
    assert loaded["optimizers"]["adamw"]["param_groups"][1]["betas"] == (0.9, 0.95)

    # Loaded tensors are independent: shared storage is not recreated, and the file is not memory-mapped behind them.
    loaded["extra"]["base"].zero_()
    assert torch.equal(loaded["extra"]["slice"], torch.arange(2, 6, dtype=torch.float32))
    assert load_state(path)["extra"]["base"].sum() == 66

    # The random states restore the same draws.
    torch.set_rng_state(loaded["rng"]["torch"])
    random.setstate(loaded["rng"]["python"])
    draws = torch.rand(4), random.random()
    torch.set_rng_state(expected["rng"]["torch"])
    random.setstate(expected["rng"]["python"])
    assert torch.equal(draws[0], torch.rand(4)) and draws[1] == random.random()


def test_loaded_tensors_do_not_read_the_file_later(tmp_path):
    """Tensors are read when loaded, after the hash check: later changes to the file cannot reach them."""
    path = save_state(tmp_path / "ckpt", {"w": torch.arange(1000, dtype=torch.float32)})
    loaded = load_state(path)
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-4000:] = bytes(4000)
    with open(path / "tensors.safetensors", "r+b") as f:  # in place, same inode
        f.write(data)
    assert torch.equal(loaded["w"], torch.arange(1000, dtype=torch.float32))


def test_state_file_and_tensor_names(tmp_path):
    tree, _, _ = _full_tree()
    path = save_state(tmp_path / "ckpt", tree)
    state = json.loads((path / "state.json").read_text())
    assert state["format"] == "engram-checkpoint" and state["version"] == 1
    assert state["tensors_sha256"] == hashlib.sha256((path / "tensors.safetensors").read_bytes()).hexdigest()
    with safe_open(path / "tensors.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert {"model/0.weight", "model/1.bias", "optimizers/adamw/state/0/exp_avg", "rng/torch"} <= names
    assert {"keys/0", "keys/~20", "keys/a~1b", "keys/a~01b", "keys/", "keys/-1", "keys/~020", "~2__metadata__"} <= names
    assert len(names) == sum(isinstance(v, torch.Tensor) for v in _leaves(tree))  # one distinct name per tensor


def test_loaded_optimizer_continues_bit_identically(tmp_path):
    model, optimizer = _trained()
    save_state(tmp_path / "ckpt", {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    loaded = load_state(tmp_path / "ckpt")

    fresh_model, fresh_optimizer = _model_and_optimizer(seed=1)  # different initial weights
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    for step in (2, 3):
        _train_step(model, optimizer, step)
        _train_step(fresh_model, fresh_optimizer, step)
    _assert_same(model.state_dict(), fresh_model.state_dict())
    _assert_same(optimizer.state_dict(), fresh_optimizer.state_dict())
    assert optimizer.state_dict()["state"][0]["step"].item() == 4


def test_map_location_and_trees_without_tensors(tmp_path):
    save_state(tmp_path / "a", {"x": torch.ones(2, dtype=torch.float16)})
    assert load_state(tmp_path / "a", map_location=torch.device("cpu"))["x"].dtype == torch.float16
    save_state(tmp_path / "b", {"meta": {"step": 5}})
    assert load_state(tmp_path / "b") == {"meta": {"step": 5}}
    assert checkpoint_complete(tmp_path / "b")


@pytest.mark.parametrize(
    "tree",
    [{"x": object()}, {(1, 2): 3}, {"x": {True: 1}}, {"x": [1, {2.5: "a"}]}, {"x": b"bytes"}, [torch.zeros(1)]],
)
def test_unsupported_values_write_nothing(tmp_path, tree):
    with pytest.raises(TypeError):
        save_state(tmp_path / "ckpt", tree)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_previous_checkpoint(tmp_path):
    save_state(tmp_path / "ckpt", {"name": "A", "w": torch.zeros(3)})
    save_state(tmp_path / "ckpt", {"name": "B", "w": torch.ones(2, 2)})
    loaded = load_state(tmp_path / "ckpt")
    assert loaded["name"] == "B" and torch.equal(loaded["w"], torch.ones(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _save_b(tmp_path):
    save_state(tmp_path / "ckpt", {"name": "A", "w": torch.zeros(3)})
    save_state(tmp_path / "ckpt", {"name": "B", "w": torch.ones(2, 2)})
    return {"name": "C", "w": torch.full((5,), 2.0)}


def _assert_b_intact(tmp_path):
    loaded = load_state(tmp_path / "ckpt")
    assert loaded["name"] == "B" and torch.equal(loaded["w"], torch.ones(2, 2))
    assert checkpoint_complete(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_crash_while_writing_tensors_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tree_c = _save_b(tmp_path)

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a partial file, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path / "ckpt", tree_c)
    _assert_b_intact(tmp_path)


def test_failed_rename_into_place_restores_previous_checkpoint(tmp_path, monkeypatch):
    tree_c = _save_b(tmp_path)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError("simulated failure renaming the new checkpoint into place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated failure"):
        save_state(tmp_path / "ckpt", tree_c)
    monkeypatch.undo()
    # The old checkpoint was moved aside, the rename failed, and it was put back.
    assert len(calls) == 3 and calls[0][0] == "ckpt" and calls[0][1].startswith(".old-ckpt-")
    assert calls[1][0].startswith(".tmp-ckpt-") and calls[2] == (calls[0][1], "ckpt")
    _assert_b_intact(tmp_path)


def test_interrupted_save_leftovers_are_not_checkpoints(tmp_path, monkeypatch):
    """A process killed mid-save leaves a .tmp- directory (no cleanup runs): it is never taken for a good one."""
    tree_c = _save_b(tmp_path)
    monkeypatch.setattr(checkpoint_io.shutil, "rmtree", lambda *args, **kwargs: None)  # cleanup never runs

    def killed(tensors, filename, metadata=None):
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint_io, "save_file", killed)
    with pytest.raises(SystemExit):
        save_state(tmp_path / "ckpt", tree_c)
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-ckpt-")
    assert not checkpoint_complete(leftovers[0])
    assert checkpoint_complete(tmp_path / "ckpt")
    assert load_state(tmp_path / "ckpt")["name"] == "B"


@pytest.fixture
def good(tmp_path):
    tree, _, _ = _full_tree()
    path = save_state(tmp_path / "ckpt", tree)
    assert checkpoint_complete(path)
    return path


def _edit_state(path, edit):
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))


def test_truncated_tensors_file_is_corrupt(good):
    data = (good / "tensors.safetensors").read_bytes()
    (good / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt checkpoint .* SHA-256"):
        load_state(good)
    assert not checkpoint_complete(good)


def test_modified_tensor_bytes_are_corrupt(good):
    data = bytearray((good / "tensors.safetensors").read_bytes())
    data[-1] ^= 1
    (good / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_state(good)
    assert not checkpoint_complete(good)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(version=2), "version 2"),
        (lambda s: s.update(version="1"), "version '1'"),
        (lambda s: s.update(format="something-else"), "not an engram-checkpoint"),
        (lambda s: s["tree"]["dict"][0][1]["dict"][0][1].update(tensor="nope"), "no tensor 'nope'"),
        (lambda s: s["tree"]["dict"].append(["x", {"pickle": "..."}]), "unexpected node"),
        (lambda s: s.update(tree=[1, 2]), "not a mapping"),
    ],
)
def test_edited_state_file_is_refused(good, edit, message):
    _edit_state(good, edit)
    with pytest.raises(ValueError, match=message):
        load_state(good)
    assert not checkpoint_complete(good)


def test_state_file_that_is_not_json(good):
    (good / "state.json").write_bytes(b"\x80\x04not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_state(good)
    assert not checkpoint_complete(good)


@pytest.mark.parametrize("missing", ["state.json", "tensors.safetensors"])
def test_missing_file(good, missing):
    (good / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_state(good)
    assert not checkpoint_complete(good)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_state(tmp_path / "nowhere")
    assert not checkpoint_complete(tmp_path / "nowhere")


class _Exploit:
    """Unpickling this creates a directory: the proof that something unpickled the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("hash_updated", [False, True])
def test_pickle_in_place_of_tensors_is_never_unpickled(good, tmp_path, monkeypatch, hash_updated):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"w": _Exploit(str(marker))}, protocol=4)
    (good / "tensors.safetensors").write_bytes(payload)
    if hash_updated:  # an attacker who also rewrites the recorded hash
        _edit_state(good, lambda s: s.update(tensors_sha256=hashlib.sha256(payload).hexdigest()))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ValueError, match="does not parse" if hash_updated else "SHA-256"):
        load_state(good)
    assert not checkpoint_complete(good)
    assert not marker.exists()
