"""The memory tiers: device, host and disk tables give the same lookups, training and checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engram import DeviceTable, EngramIndexer
from engram.eval import token_byte_lengths
from engram.model import EngramLM
from engram.storage import DiskTable, HostTable, StorageConfig, TableStateError, place_tables
from engram.storage.table_file import TableFileError
from engram.training import RowAdagrad, Trainer, seed_everything
from engram.training.checkpoint import latest_checkpoint, read_manifest, read_tensors
from tests.corpus import sonnets_tokens
from tests.test_training import MODEL, TRAIN


def _model(compressor, tier: str, directory=None, **storage) -> EngramLM:
    seed_everything(0)
    config = StorageConfig(tier=tier, directory=None if directory is None else str(directory), **storage)
    return place_tables(EngramLM(MODEL, indexer=EngramIndexer(MODEL.engram, compressor)), config)


def _same_weights(model: EngramLM, reference: EngramLM) -> EngramLM:
    """Give ``model`` the weights of ``reference`` (whose tables are on the device)."""
    model.load_state_dict(reference.state_dict(), strict=False)  # a disk model has no table keys
    for table, source in zip(model.engram_tables(), reference.engram_tables(), strict=True):
        if isinstance(table, DiskTable):
            rows = torch.arange(table.num_rows)
            table.write_rows(rows, source.read_rows(rows))
    return model


def _three_models(compressor, tmp_path, **storage) -> dict[str, EngramLM]:
    reference = _model(compressor, "device")
    models = {"device": reference}
    for tier in ("host", "disk"):
        models[tier] = _same_weights(_model(compressor, tier, tmp_path / tier, **storage), reference)
    return models


def _batch(seed: int, batch: int = 3, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = sonnets_tokens()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(train) - length - 1, batch)
    ids = torch.from_numpy(np.stack([train[s : s + length + 1] for s in starts]).astype(np.int64))
    return ids[:, :-1], ids[:, 1:]


def test_host_table_starts_like_a_device_table():
    torch.manual_seed(3)
    torch.nn.Embedding(1, 1)  # something drawn before the table, as in a model
    device = DeviceTable(500, 8, init_std=0.02)
    torch.manual_seed(3)
    torch.nn.Embedding(1, 1)
    host = HostTable(500, 8, init_std=0.02)
    assert torch.equal(host.weight, device.weight.detach())
    assert not any(p is host.weight for p in host.parameters())  # never moved by model.to(), never on AdamW
    assert torch.equal(host.state_dict()["weight"], device.state_dict()["weight"])


@pytest.mark.parametrize("cache_mb", [0.0, 0.05])
def test_every_tier_gives_the_same_logits(compressor, tmp_path, cache_mb):
    models = _three_models(compressor, tmp_path, cache_mb=cache_mb)
    for seed in range(3):  # repeated batches exercise the hot-row cache's hits
        ids, _ = _batch(seed)
        expected = models["device"].eval()(ids).logits
        for tier in ("host", "disk"):
            assert torch.equal(models[tier].eval()(ids).logits, expected), tier
    if cache_mb:
        cache = models["disk"].engram_tables()[0].cache
        assert cache.hits > 0 and cache.misses > 0


@pytest.mark.parametrize("prefetch", [True, False])
def test_every_tier_trains_to_the_same_rows(compressor, tmp_path, prefetch):
    """Three training steps: same losses, same updated table rows and Adam state, same dense weights."""
    models = _three_models(compressor, tmp_path, prefetch=prefetch, cache_mb=0.02)
    train, val = sonnets_tokens()
    config = dataclasses.replace(TRAIN, steps=3, eval_every=0, checkpoint_every=0)
    losses = {}
    for tier, model in models.items():
        seed_everything(1)
        trainer = Trainer(model, config, train, val, progress=False)
        losses[tier] = trainer.train()
    assert losses["host"] == losses["disk"] == losses["device"]
    rows = torch.arange(models["device"].engram_tables()[0].num_rows)
    device_table, host_table, disk_table = (m.engram_tables()[0] for m in models.values())
    updated = (device_table.row_state("row_step", (), torch.int64) > 0).sum()
    assert updated > 100  # the steps really touched rows
    expected = device_table.read_rows(rows)
    assert torch.equal(host_table.read_rows(rows), expected) and torch.equal(disk_table.read_rows(rows), expected)
    for name in ("exp_avg", "exp_avg_sq", "row_step"):
        expected = device_table.row_states()[name]
        assert torch.equal(host_table.row_states()[name], expected), name
        assert torch.equal(disk_table.row_states()[name], expected), name
    dense = models["device"].state_dict()
    for key, value in models["disk"].state_dict().items():
        assert torch.equal(value, dense[key]), key


def test_row_adagrad_matches_a_float64_loop(tmp_path):
    """Row-wise Adagrad on a disk table, against a plain per-row loop."""
    table = DiskTable(tmp_path / "t", 40, 6, init_std=0.5, seed=4)
    start = table.read_rows(torch.arange(40)).double()
    optimizer = RowAdagrad([table], lr=0.1, eps=1e-8)
    expected, sum_sq = start.clone(), torch.zeros(40, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        indices = torch.randint(0, 40, (5, 3), generator=generator)
        target = torch.randn(5, 3, 6, generator=generator)
        table.train()
        (table(indices) * target).sum().backward()
        optimizer.step()
        grad = torch.zeros(40, 6, dtype=torch.float64)
        grad.index_add_(0, indices.flatten(), target.double().flatten(0, 1))
        for row in indices.unique().tolist():
            sum_sq[row] += grad[row].square().mean()
            expected[row] -= 0.1 * grad[row] / (sum_sq[row].sqrt() + 1e-8)
    torch.testing.assert_close(table.read_rows(torch.arange(40)).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.row_states()["sum_sq"].double(), sum_sq, rtol=1e-5, atol=1e-7)


def _disk_trainer(compressor, run_dir, seed=0, journal=True, write_buffer_mb=0.01) -> Trainer:
    # A write buffer of a few dozen rows: most updates reach the files between checkpoints.
    model = _model(compressor, "disk", run_dir / "tables", journal=journal, write_buffer_mb=write_buffer_mb)
    train, val = sonnets_tokens()
    config = dataclasses.replace(TRAIN, checkpoint_every=4, eval_every=0)
    seed_everything(seed)
    return Trainer(
        model, config, train, val, out_dir=run_dir, byte_lengths=token_byte_lengths(compressor), progress=False
    )


@pytest.mark.parametrize("write_buffer_mb", [0.0, 0.01])
def test_disk_checkpoints_copy_nothing_and_a_crash_between_them_loses_nothing(compressor, tmp_path, write_buffer_mb):
    straight = _disk_trainer(compressor, tmp_path / "a", write_buffer_mb=write_buffer_mb)
    expected = straight.train()  # 12 steps, checkpoints at 4, 8, 12

    crashed = _disk_trainer(compressor, tmp_path / "b", write_buffer_mb=write_buffer_mb)
    losses = crashed.train(until=8) + [crashed.train_step() for _ in range(2)]  # two steps after the checkpoint
    assert losses == expected[:10]
    table = crashed.model.engram_tables()[0]
    assert table.metadata["committed_step"] == 8 and table.metadata["dirty"]
    del crashed, table  # a crash: nothing is flushed or committed after step 8

    checkpoint = latest_checkpoint(tmp_path / "b" / "checkpoints")
    saved = read_tensors(checkpoint)
    assert not any("table" in name for name in saved)  # the tables and their state stay in their files
    assert read_manifest(checkpoint)["tables"]["1"]["persisted"]

    resumed = _disk_trainer(compressor, tmp_path / "b", seed=7, write_buffer_mb=write_buffer_mb)
    assert resumed.resume() and resumed.step == 8  # rolls the journal back to step 8
    assert resumed.train() == expected[8:]
    rows = torch.arange(straight.model.engram_tables()[0].num_rows)
    assert torch.equal(
        resumed.model.engram_tables()[0].read_rows(rows), straight.model.engram_tables()[0].read_rows(rows)
    )


def test_disk_table_without_journal_refuses_a_resume_it_cannot_make_exact(compressor, tmp_path):
    crashed = _disk_trainer(compressor, tmp_path, journal=False)
    crashed.train(until=4)
    crashed.train_step(), crashed.train_step()  # two unjournaled steps after the checkpoint, then a crash
    del crashed
    resumed = _disk_trainer(compressor, tmp_path, journal=False)
    with pytest.raises(TableStateError, match="changed after checkpoint step 4 and keeps no undo journal"):
        resumed.resume()


def test_damaged_table_files_are_refused(tmp_path):
    table = DiskTable(tmp_path / "t", 100, 4, init_std=0.1)
    table.close()
    path = tmp_path / "t" / "weight.table"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(TableFileError, match="truncated"):
        DiskTable(tmp_path / "t")
    path.write_bytes(b"not a table" * 1000)
    with pytest.raises(TableFileError):
        DiskTable(tmp_path / "t")
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"holds a \(100, 4\)"):
        DiskTable(tmp_path / "t", 100, 8)
    assert DiskTable(tmp_path / "t").read_rows(torch.tensor([0, 99])).shape == (2, 4)  # the intact file opens


def test_prefetched_rows_are_never_served_to_another_batch(tmp_path):
    table = DiskTable(tmp_path / "t", 5000, 8, init_std=1.0, seed=1)
    reference = table.weight.clone()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 5000, (4, 16, 3), generator=generator) for _ in range(6)]
    pending = [table.prefetch(indices) for indices in batches]  # all in flight at once
    for indices, handle in zip(batches, pending, strict=True):
        assert torch.equal(table.lookup(indices, handle), reference[indices])
    # A handle given with other indices is refused, even for indices of the same shape.
    handle = table.prefetch(batches[0])
    with pytest.raises(RuntimeError, match="another batch"):
        table.lookup(batches[1], handle)
    # The same values in a fresh tensor are the same batch.
    assert torch.equal(table.lookup(batches[0].clone(), handle), reference[batches[0]])


def test_device_and_host_checkpoints_are_interchangeable(compressor):
    device = _model(compressor, "device")
    host = _model(compressor, "host")
    with torch.no_grad():
        host.engram_tables()[0].weight.zero_()
    host.load_state_dict(device.state_dict())  # strict: the same keys
    assert torch.equal(host.engram_tables()[0].weight, device.engram_tables()[0].weight.detach())
    assert set(host.state_dict()) == set(device.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        host.load_state_dict({**device.state_dict(), "blocks.1.engram.table.weight": torch.zeros(3, 3)})
    # model.to() leaves a host table where it is, and dense optimizers never see it.
    assert all(p.data_ptr() != host.engram_tables()[0].weight.data_ptr() for p in host.parameters())


def test_gradient_accumulation_sums_like_a_device_table(tmp_path):
    device = DeviceTable(300, 4, init_std=0.1, sparse_grad=True)
    disk = DiskTable(tmp_path / "t", 300, 4, init_std=0.0)
    disk.write_rows(torch.arange(300), device.read_rows(torch.arange(300)))
    disk.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # three micro-batches, one optimizer step
        indices = torch.randint(0, 300, (8, 5), generator=generator)
        target = torch.randn(8, 5, 4, generator=generator)
        (device(indices) * target).sum().backward()
        (disk(indices) * target).sum().backward()
    (rows_d, grad_d), (rows_h, grad_h) = device.take_row_grad(), disk.take_row_grad()
    assert torch.equal(rows_d, rows_h) and torch.equal(grad_d, grad_h)
    assert disk.take_row_grad() is None  # taken


def test_bfloat16_tables_off_the_device(compressor, tmp_path):
    host = _model(compressor, "host", dtype="bfloat16")
    disk = _model(compressor, "disk", tmp_path, dtype="bfloat16")
    disk.load_state_dict(host.state_dict(), strict=False)
    tables = [host.engram_tables()[0], disk.engram_tables()[0]]
    rows = torch.arange(tables[0].num_rows)
    tables[1].write_rows(rows, tables[0].read_rows(rows))
    train, val = sonnets_tokens()
    config = dataclasses.replace(TRAIN, steps=2, eval_every=0, checkpoint_every=0)
    losses = []
    for model, table in zip((host, disk), tables, strict=True):
        assert table.dtype == torch.bfloat16 and table.read_rows(rows[:1]).dtype == torch.bfloat16
        seed_everything(1)
        losses.append(Trainer(model, config, train, val, progress=False).train())
    assert losses[0] == losses[1] and np.isfinite(losses[0]).all()
    assert torch.equal(tables[0].read_rows(rows), tables[1].read_rows(rows))
    assert tables[1].row_states()["exp_avg"].dtype == torch.bfloat16


def test_storage_config_is_validated():
    with pytest.raises(ValueError, match="'device', 'host' or 'disk'"):
        StorageConfig(tier="ssd")
    with pytest.raises(ValueError, match="storage dtype"):
        StorageConfig(dtype="int8")
    with pytest.raises(ValueError, match="cache_mb"):
        StorageConfig(cache_mb=-1)
    with pytest.raises(ValueError, match=r"needs storage\.directory"):
        StorageConfig(tier="disk").layer_directory(1)
    with pytest.raises(ValueError, match="unknown StorageConfig keys"):
        StorageConfig.from_dict({"tier": "disk", "path": "x"})


def test_row_optimizer_state_round_trips_and_checks(tmp_path):
    from engram.training import RowAdam

    host = HostTable(50, 3, init_std=0.1)
    optimizer = RowAdam([host], lr=0.1)
    host.train()
    (host(torch.tensor([[1, 2, 2]])) ** 2).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    other = HostTable(50, 3, init_std=0.1)
    restored = RowAdam([other], lr=0.5)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == 0.1
    for name, value in host.row_states().items():
        assert torch.equal(other.row_states()[name], value), name
    assert int(other.row_states()["row_step"][2]) == 1
    with pytest.raises(ValueError, match="holds tables"):
        RowAdam([other, HostTable(5, 3)]).load_state_dict(saved)
    disk = DiskTable(tmp_path / "t", 50, 3)
    assert RowAdam([disk]).state_dict()["state"] == {}  # a disk table's state is its files
    with pytest.raises(TypeError, match="TableStorage"):
        RowAdam([torch.zeros(3, 3)])


def test_the_metrics_report_each_cache_hit_rate(compressor, tmp_path):
    import json

    model = _model(compressor, "host", cache_mb=0.05)
    train, val = sonnets_tokens()
    config = dataclasses.replace(TRAIN, steps=4, log_every=2, eval_every=0, checkpoint_every=0)
    Trainer(model, config, train, val, out_dir=tmp_path, progress=False).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [r["table1_cache_hit_rate"] for r in records]
    assert len(rates) == 2 and all(0.0 < rate < 1.0 for rate in rates)


def test_a_crash_before_the_first_checkpoint_is_not_trained_over(compressor, tmp_path):
    crashed = _disk_trainer(compressor, tmp_path)
    crashed.train_step(), crashed.train_step()  # no checkpoint yet, then a crash
    crashed.model.engram_tables()[0].flush()
    del crashed
    again = _disk_trainer(compressor, tmp_path)
    assert not again.resume()
    with pytest.raises(TableStateError, match="already been trained"):
        again.train()


def test_table_file_rows_written_with_pwrite_are_seen_by_the_mapping(tmp_path):
    from engram.storage.table_file import TableFile

    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        table = TableFile.create(tmp_path / f"{dtype}.table", 50, 3, dtype)
        rows = torch.tensor([2, 3, 4, 9, 40])  # a run of three and two single rows
        values = torch.arange(15).view(5, 3).to(dtype)
        table.write_rows(rows, values)
        assert torch.equal(table.tensor[rows], values)
        assert int((table.tensor != 0).any(dim=1).sum()) == 5  # no other row changed
        raw = (tmp_path / f"{dtype}.table").read_bytes()[8192:]
        itemsize = values.element_size()
        record = {4: 16, 2: 12, 8: 32}[itemsize]  # 3 elements, a 4-byte checksum, padding (table_file.py)
        on_disk = torch.frombuffer(bytearray(raw[9 * record : 9 * record + 3 * itemsize]), dtype=dtype)
        assert torch.equal(on_disk, values[3])
        table.close()
