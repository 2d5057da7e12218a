"""Placement as its own step: plain models, lazily drawn device tables, ``place_tables`` into every tier."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from engram import EngramConfig, EngramIndexer
from engram.model import EngramLM
from engram.storage import DeviceTable, DiskTable, HostTable, StorageConfig, place_tables
from engram.storage import init as table_init
from engram.storage import placement as placement_module
from engram.training import RowAdam, seed_everything
from tests.test_tiers import _batch
from tests.test_training import MODEL

SRC = Path(__file__).resolve().parents[1] / "src" / "engram"


def _plain(compressor) -> EngramLM:
    seed_everything(0)
    return EngramLM(MODEL, indexer=EngramIndexer(MODEL.engram, compressor))


def _storage(tier: str, tmp_path: Path, **options) -> StorageConfig:
    return StorageConfig(tier=tier, directory=str(tmp_path / "tables") if tier == "disk" else None, **options)


def _seed_rows(table: DeviceTable) -> torch.Tensor:
    """The rows a table of this seed starts from, drawn independently of the table."""
    expected = torch.empty(table.num_rows, table.dim)
    return table_init.fill_normal_rows(expected, table.seed, table.init_std, table.first_row)


def test_a_plain_model_allocates_no_table_until_used(compressor):
    model = _plain(compressor)
    (table,) = model.engram_tables()
    assert isinstance(table, DeviceTable) and table.sparse_grad and not table.materialized
    assert table.weight.dtype == torch.float32 and table.materialized  # reading the weight draws the rows
    assert torch.equal(table.weight.detach(), _seed_rows(table))


def test_moving_a_plain_model_records_device_and_dtype_without_drawing(compressor):
    model = _plain(compressor).double()
    (table,) = model.engram_tables()
    (placeholder,) = table.parameters()
    assert not table.materialized and placeholder.is_meta and placeholder.dtype == torch.float64
    ids, _ = _batch(0)
    model(ids)  # the lookup draws the rows, in float64, into the same parameter object
    assert table.materialized and placeholder is table.weight and not placeholder.is_meta
    assert torch.equal(table.weight.detach(), _seed_rows(table).double())


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_placing_a_fresh_model_gives_the_plain_models_logits(compressor, tmp_path, monkeypatch, tier):
    ids, _ = _batch(1)
    expected = _plain(compressor).eval()(ids).logits
    model = _plain(compressor)
    # placement builds the target from the seed: the plain table is never allocated
    monkeypatch.setattr(DeviceTable, "materialize", lambda self: pytest.fail("the plain table was drawn"))
    assert place_tables(model, _storage(tier, tmp_path)) is model
    monkeypatch.undo()
    assert model.placement.tier == tier
    tiers = {"device": DeviceTable, "host": HostTable, "disk": DiskTable}
    assert type(model.engram_tables()[0]) is tiers[tier]
    assert torch.equal(model.eval()(ids).logits, expected)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_trained_device_table_keeps_its_rows_in_another_tier(compressor, tmp_path, tier):
    model = _plain(compressor)
    (table,) = model.engram_tables()
    changed = torch.tensor([0, 7, table.num_rows - 1])
    table.write_rows(changed, torch.full((3, table.dim), 0.5))
    rows = table.read_rows(torch.arange(table.num_rows))
    ids, _ = _batch(2)
    expected = model.eval()(ids).logits
    place_tables(model, _storage(tier, tmp_path))
    (placed,) = model.engram_tables()
    assert isinstance(placed, (HostTable, DiskTable))
    assert torch.equal(placed.read_rows(torch.arange(placed.num_rows)), rows)
    assert torch.equal(model.eval()(ids).logits, expected)


def test_a_disk_table_on_disk_is_opened_and_never_overwritten(compressor, tmp_path):
    storage = _storage("disk", tmp_path)
    first = place_tables(_plain(compressor), storage)
    (table,) = first.engram_tables()
    table.write_rows(torch.tensor([3]), torch.full((1, table.dim), 2.0))
    table.close()
    reopened = place_tables(_plain(compressor), storage).engram_tables()[0]  # a fresh model opens the folder
    assert torch.equal(reopened.read_rows(torch.tensor([3])), torch.full((1, table.dim), 2.0))
    reopened.close()
    drawn = _plain(compressor)
    drawn.engram_tables()[0].materialize()  # rows of its own: which ones would win is not guessed
    with pytest.raises(ValueError, match="already holds a table"):
        place_tables(drawn, storage)
    assert isinstance(drawn.engram_tables()[0], DeviceTable)


def test_placing_twice(compressor, tmp_path):
    model = place_tables(_plain(compressor), StorageConfig(), sparse_grad=False)
    (table,) = model.engram_tables()
    assert place_tables(model, StorageConfig()).engram_tables() == [table] and table.sparse_grad  # only the flag
    place_tables(model, _storage("host", tmp_path))
    with pytest.raises(ValueError, match="already placed \\(HostTable\\)"):
        place_tables(model, StorageConfig())


def test_a_table_with_optimizer_state_is_not_placed(compressor, tmp_path):
    model = _plain(compressor)
    ids, targets = _batch(3)
    optimizer = RowAdam(model.engram_tables(), lr=1e-2)
    model(ids, targets=targets).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match="before building the optimizer"):
        place_tables(model, _storage("disk", tmp_path))
    assert not (tmp_path / "tables").exists()


def test_a_table_bigger_than_memory_is_built_and_placed_on_disk_unallocated(tmp_path, monkeypatch):
    """2**31 float32 elements (8 GiB): built and placed without drawing a row, so it never had to fit."""
    engram = EngramConfig(
        layer_ids=[1], max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=64, engram_vocab_size=[2**25], pad_id=0
    )
    config = dataclasses.replace(MODEL, engram=engram)
    seed_everything(0)
    model = EngramLM(config)
    (table,) = model.engram_tables()
    assert table.num_rows * table.dim >= 2**31 and not table.materialized
    assert sum(p.numel() for p in table.parameters()) == table.num_rows * table.dim  # counted, not allocated
    built = {}

    def disk_table(directory, num_rows, dim, **options):  # what a real DiskTable would be asked to create
        built.update(directory=directory, num_rows=num_rows, dim=dim, **options)
        return HostTable(1, dim)

    monkeypatch.setattr(placement_module, "DiskTable", disk_table)
    monkeypatch.setattr(DeviceTable, "materialize", lambda self: pytest.fail("the plain table was drawn"))
    place_tables(model, _storage("disk", tmp_path))
    assert built["directory"] == tmp_path / "tables" / "layer_01"
    assert (built["num_rows"], built["dim"]) == (table.num_rows, table.dim)
    assert (built["seed"], built["first_row"], built["init_std"]) == (table.seed, 0, engram.table_init_std)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_models_and_layers_know_nothing_of_placement():
    """No module of the model or the layer imports torch.distributed or a tier other than the device table."""
    forbidden = ("torch.distributed", "engram.storage.disk", "engram.storage.offload", "engram.storage.sharded")
    forbidden += ("engram.storage.placement", "engram.storage.place_tables", "engram.storage.StorageConfig")
    files = sorted((SRC / "model").glob("*.py")) + sorted((SRC / "memory").glob("*.py"))
    assert len(files) > 5
    for path in files:
        for name in _imports(path):
            assert not name.startswith(forbidden), f"{path.relative_to(SRC)} imports {name}"
