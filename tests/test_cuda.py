"""The library on a CUDA device against the CPU: hashing, the Engram layer, the tiers, prefetch on a side stream.

Every test needs a CUDA device and is skipped without one. ``ENGRAM_CUDA_TESTS_ON_CPU=1`` runs them
with the CPU standing in for the device (``benchmarks/gpu_check.sh --cpu-dry-run``): that checks the
tests' own code on a machine without a GPU and says nothing about CUDA; the tests of CUDA streams
skip then.

Tolerances, where a comparison is not exact:

- the Engram layer in float64: 1e-10 (CUDA and CPU kernels sum in other orders; float64 rounding is
  ~1e-16 per operation); in float32: rtol 1e-4, atol 1e-5 (a weight gradient sums ~100 terms of
  up to ~10, whose float32 rounding is ~6e-8 each; an element that cancels to near zero keeps
  their absolute error).
- the tiers after training steps: a device table's row gradient is summed by ``coalesce`` of the
  sparse embedding gradient, an off-device table's by ``index_put`` with accumulation (atomics on
  CUDA), in other orders: rows and Adam state agree to rtol 1e-5, atol 1e-6, logits to 1e-5.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from engram import EngramIndexer, NgramHasher
from engram.model import EngramLM
from engram.storage import DiskTable, HostTable, StorageConfig, place_tables
from engram.training import RowAdam, seed_everything
from tests.test_hashing import _random_config, _reference_for
from tests.test_layer import _hash_ids, _layer
from tests.test_tiers import _batch, _same_weights
from tests.test_training import MODEL as TRAINING_MODEL

ON_CPU = os.environ.get("ENGRAM_CUDA_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not ON_CPU,
    reason="needs a CUDA device (ENGRAM_CUDA_TESTS_ON_CPU=1 runs these tests' code on the CPU instead)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_streams = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 matmuls and convolutions on the device (cuDNN allows TF32 by default), as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# A model without MoE: its forward and backward use no atomics, so two tiers differ only in the tables.
MODEL = dataclasses.replace(TRAINING_MODEL, moe=None)


# -- hashing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_hashing_on_the_device_equals_the_reference_bit_for_bit(seed):
    rng = np.random.default_rng(1000 + seed)  # the configurations of test_hashing's random test
    cfg = _random_config(rng)
    vocab = cfg["compressed_vocab_size"]
    pad_id = int(rng.integers(0, vocab))
    hasher = NgramHasher(pad_id=pad_id, **cfg)
    ids = rng.integers(0, vocab, size=(3, 257))
    ids[:, :100] = vocab - 1  # the largest products the multiplier bound allows
    for layer_id in cfg["layer_ids"]:
        got = hasher.hash(torch.from_numpy(ids).to(DEVICE), layer_id)
        assert got.device.type == DEVICE.type and got.dtype == torch.int64
        np.testing.assert_array_equal(got.cpu().numpy(), _reference_for(cfg, ids, layer_id, pad_id))


def test_the_indexer_on_the_device_equals_the_cpu(compressor):
    indexer = EngramIndexer(MODEL.engram, compressor)
    ids, _ = _batch(0, batch=4, length=64)
    on_cpu = indexer(ids)
    on_device = indexer(ids.to(DEVICE))
    for layer_id, expected in on_cpu.items():
        assert torch.equal(on_device[layer_id].cpu(), expected), layer_id


# -- the Engram layer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, dict(rtol=1e-10, atol=1e-10)),
                                                  (torch.float32, dict(rtol=1e-4, atol=1e-5))])  # fmt: skip
@pytest.mark.parametrize("branches", [1, 4])
def test_layer_forward_and_backward_on_the_device_equal_the_cpu(dtype, tolerance, branches):
    cpu_layer = _layer(branches).to(dtype)
    device_layer = _layer(branches).to(dtype).to(DEVICE)
    hash_ids = _hash_ids(cpu_layer, batch=2, length=33)
    hidden = torch.randn(2, 33, branches, cpu_layer.hidden_size, dtype=dtype)
    outputs, grads = [], []
    for layer, device in ((cpu_layer, torch.device("cpu")), (device_layer, DEVICE)):
        x = hidden.to(device).requires_grad_()
        out = layer(x, hash_ids=hash_ids.to(device))
        (out.square().sum() + out.sum()).backward()
        outputs.append(out.detach().cpu())
        grads.append([x.grad.cpu()] + [p.grad.cpu() for p in layer.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
    names = ["hidden", *(name for name, _ in cpu_layer.named_parameters())]
    for name, on_device, on_cpu in zip(names, grads[1], grads[0], strict=True):
        torch.testing.assert_close(on_device, on_cpu, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


# -- the tiers -------------------------------------------------------------------------------------------------


def _tier_models(compressor, tmp_path) -> dict[str, EngramLM]:
    """The same float32 model with its tables on the device, in host memory and on disk; the rest on DEVICE."""
    models = {}
    for tier in ("device", "host", "disk"):
        seed_everything(0)
        directory = None if tier != "disk" else str(tmp_path / "disk")
        model = EngramLM(MODEL, indexer=EngramIndexer(MODEL.engram, compressor))
        models[tier] = place_tables(model, StorageConfig(tier=tier, directory=directory))
    for tier in ("host", "disk"):
        _same_weights(models[tier], models["device"])
    return {tier: model.to(DEVICE) for tier, model in models.items()}


def test_every_tier_gives_the_same_logits_and_rows_after_training_on_the_device(compressor, tmp_path):
    models = _tier_models(compressor, tmp_path)
    ids = _batch(0, batch=4, length=48)[0].to(DEVICE)
    with torch.no_grad():
        logits = {tier: model.eval()(ids).logits for tier, model in models.items()}
    for tier in ("host", "disk"):  # a lookup copies rows: the same kernels read the same numbers
        assert torch.equal(logits[tier], logits["device"]), tier

    for model in models.values():  # two steps of the tables' RowAdam, float32, no autocast
        model.train()
        optimizer = RowAdam(model.engram_tables(), lr=1e-2)
        for step in range(2):
            batch, target = (t.to(DEVICE) for t in _batch(step, batch=4, length=48))
            model(batch, targets=target).loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
    tables = {tier: model.engram_tables()[0] for tier, model in models.items()}
    rows = torch.arange(tables["device"].num_rows)
    stepped = tables["device"].row_states()["row_step"].cpu()
    assert (stepped > 0).sum() > 100  # the steps really touched rows
    expected = tables["device"].read_rows(rows).cpu()
    with torch.no_grad():
        after = {tier: model.eval()(ids).logits.cpu() for tier, model in models.items()}
    for tier in ("host", "disk"):
        torch.testing.assert_close(tables[tier].read_rows(rows).cpu(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(tables[tier].row_states()["row_step"].cpu(), stepped), tier
        for name in ("exp_avg", "exp_avg_sq"):
            got, want = tables[tier].row_states()[name].cpu(), tables["device"].row_states()[name].cpu()
            where = f"{tier} {name}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}")
        torch.testing.assert_close(after[tier], after["device"], rtol=1e-5, atol=1e-5)


# -- prefetch -------------------------------------------------------------------------------------------------


@needs_streams
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_prefetch_copies_from_pinned_memory_on_a_side_stream(tmp_path, tier):
    table = HostTable(20_000, 16, init_std=1.0) if tier == "host" else DiskTable(tmp_path / "t", 20_000, 16)
    if tier == "disk":
        table.write_rows(torch.arange(20_000), torch.randn(20_000, 16))
    reference = table.read_rows(torch.arange(20_000)).cuda()
    seen: list[dict[str, bool]] = []
    fetch, read_weight = table.fetch, table._read_weight

    def watched_fetch(indices: torch.Tensor):
        stream = torch.cuda.current_stream()
        seen.append({"side stream": stream != torch.cuda.default_stream(), "pinned": False})
        return fetch(indices)

    def watched_read(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None and seen:
            seen[-1]["pinned"] = out.is_pinned()
        return read_weight(rows, out=out)

    table.fetch, table._read_weight = watched_fetch, watched_read  # instance attributes: what prefetch calls
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 20_000, (8, 256, 4), generator=generator).cuda() for _ in range(4)]
    pending = [table.prefetch(indices) for indices in batches]  # all in flight at once
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):  # keep the default stream busy while the rows are copied
        busy = busy @ busy / 64
    with torch.no_grad():
        for indices, handle in zip(batches, pending, strict=True):
            fetched = handle.result(indices)
            assert isinstance(fetched.ready, torch.cuda.Event)  # the copy's stream, not the host, is waited for
            assert torch.equal(table.lookup(indices, handle), reference[indices])
    assert seen == [{"side stream": True, "pinned": True}] * len(batches)
    torch.cuda.synchronize()


def test_a_host_tier_model_with_prefetch_equals_one_without(compressor, tmp_path):
    models = _tier_models(compressor, tmp_path)
    ids = _batch(1, batch=4, length=48)[0].to(DEVICE)
    table = models["host"].engram_tables()[0]
    with torch.no_grad():
        table.prefetch_enabled = True
        with_prefetch = models["host"].eval()(ids).logits
        table.prefetch_enabled = False
        without = models["host"].eval()(ids).logits
    assert torch.equal(with_prefetch, without)


def test_a_disk_model_on_the_device_reads_the_next_batch_ahead(compressor, tmp_path):
    """Ids on the device: the next batch is hashed there and its rows go to the host table's read-ahead."""
    model = _tier_models(compressor, tmp_path)["disk"].eval()
    ids, following = (_batch(seed, batch=4, length=48)[0].to(DEVICE) for seed in (2, 3))
    with torch.no_grad():
        plain = model(ids).logits
        tasks = model.read_ahead(following)
        ahead = model(ids, read_ahead=following).logits
    assert len(tasks) == len(model.engram_layers())
    assert all(isinstance(task.result(timeout=20), bool) for task in tasks)  # ran, and raised nothing
    assert torch.equal(ahead, plain)
