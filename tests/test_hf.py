"""engram.hf: EngramLM behind transformers' PreTrainedModel / GenerationMixin / Auto classes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers", minversion="5.24")

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from engram import CompressedTokenizer, EngramIndexer
from engram.hf import EngramCache, EngramForCausalLM, EngramHFConfig
from engram.hf.modeling import CACHE_ARG as CACHE_FIELD
from engram.inference import generate
from engram.model import EngramLM, ModelConfig
from engram.storage import DeviceTable, DiskTable, HostTable, StorageConfig, place_tables
from engram.training.row_optim import RowAdam
from tests.test_model import BASE, ENGRAM, MOE

# A live convolution (PyTorch's init, not zeros), so that decoding depends on the convolution state.
ENGRAM_CONV = dataclasses.replace(ENGRAM, conv_zero_init=False)
CONFIG = ModelConfig(**BASE, moe=MOE, engram=ENGRAM_CONV)  # vocabulary: the sonnets tokenizer's 1,024 ids
SRC = Path(__file__).resolve().parents[1] / "src"


def _lm(compressor, config: ModelConfig = CONFIG, dtype: torch.dtype = torch.float32) -> EngramLM:
    torch.manual_seed(0)
    indexer = EngramIndexer(config.engram, compressor) if config.engram else None
    return EngramLM(config, indexer=indexer).to(dtype).eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_save_and_load_give_bit_identical_logits(compressor, tmp_path):
    lm = _lm(compressor)
    hf = EngramForCausalLM.from_engram(lm)
    assert hf.lm is lm  # wrapped, not copied
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("compression_table"), torch.from_numpy(compressor.lookup_table))
    assert "lm.blocks.1.engram.table.weight" in keys

    loaded = EngramForCausalLM.from_pretrained(tmp_path)
    assert not loaded.training and loaded.lm is not lm
    ids = _ids(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lm(ids).logits)
    assert loaded.config.model_config == CONFIG
    assert loaded.config.compression == hf.config.compression
    assert loaded.config.engram_table_sizes == hf.config.engram_table_sizes
    assert torch.equal(loaded.indexer().compressor(ids), compressor(ids))
    # the loaded model's indexer came from the file's table, not from the tokenizer
    assert loaded.indexer().compressor is not compressor


def test_config_round_trip_and_checks(compressor, tmp_path):
    config = EngramHFConfig.from_engram(CONFIG, compressor)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "engram"
    assert saved["compression"]["raw_vocab_size"] == 1024
    sizes = saved["engram_table_sizes"]["1"]  # distinct primes from the base size up, one per head
    assert len(sizes) == ENGRAM.n_heads == len(set(sizes)) and min(sizes) >= ENGRAM.engram_vocab_size[0]
    loaded = EngramHFConfig.from_pretrained(tmp_path)
    assert loaded.model_config == CONFIG
    assert (loaded.vocab_size, loaded.hidden_size, loaded.num_hidden_layers) == (1024, 48, 2)

    saved["engram_table_sizes"]["1"][0] += 2
    with pytest.raises(ValueError, match="hashes differently"):
        EngramHFConfig.from_dict(saved)
    with pytest.raises(ValueError, match="compression"):
        EngramHFConfig(engram_model=CONFIG.to_dict())


def test_damaged_compression_table_is_refused(compressor, tmp_path):
    EngramForCausalLM.from_engram(_lm(compressor)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["compression"]["table_sha256"] = "0" * 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="SHA-256"):
        EngramForCausalLM.from_pretrained(tmp_path)


def test_sharded_and_tied_round_trip(compressor, tmp_path):
    config = dataclasses.replace(CONFIG, tie_embeddings=True, n_branches=2)
    lm = _lm(compressor, config)
    EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = EngramForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm.head.weight is loaded.lm.embed.weight
    ids = _ids(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lm(ids).logits)


def test_auto_classes_resolve_the_model_type(compressor, tmp_path):
    lm = _lm(compressor)
    EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is EngramHFConfig
    assert type(AutoConfig.for_model("engram")) is EngramHFConfig
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is EngramForCausalLM
    ids = _ids(1, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm(ids).logits)


def test_dense_model_without_engram(tmp_path):
    lm = _lm(None, ModelConfig(**BASE))
    EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path)
    loaded = EngramForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.compression is None and not hasattr(loaded, "compression_table")
    ids = _ids(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lm(ids).logits)


def test_greedy_generate_with_cache_equals_recomputation(compressor):
    lm = _lm(compressor, dtype=torch.float64)
    hf = EngramForCausalLM.from_engram(lm)
    prompt, new = _ids(2, 5, seed=3), 12
    lengths: list[int] = []
    hook = lm.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        cached = hf.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True)
        cached_lengths, lengths[:] = list(lengths), []
        uncached = hf.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=False)
        uncached_lengths = list(lengths)
    finally:
        hook.remove()
    # with the cache each step feeds one new id; without it the whole sequence every time
    assert cached_lengths == [5] + [1] * (new - 1)
    assert uncached_lengths == list(range(5, 5 + new))

    ids = prompt
    with torch.no_grad():
        for _ in range(new):  # the reference: a full forward pass over the sequence at every step
            ids = torch.cat([ids, lm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (2, 5 + new)
    assert torch.equal(cached, ids)
    assert torch.equal(uncached, ids)
    assert torch.equal(cached, generate(lm, prompt, new, temperature=0))


def test_trimmed_vocabulary_generates_tokenizer_ids(compressor, tmp_path):
    """A trimmed model (as engram train builds) predicts model ids; generate must feed back tokenizer ids."""
    kept = torch.tensor([5, 17, 99, 1000, 3, 250, 640, 801])
    config = dataclasses.replace(CONFIG, vocab_size=len(kept) + 1, input_vocab_size=1024)
    lm = _lm(compressor, config, dtype=torch.float64)
    lm.set_vocabulary(kept)
    EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path)
    hf = EngramForCausalLM.from_pretrained(tmp_path)
    assert hf.config.vocab_size == 1024
    prompt = _ids(2, 4, seed=5)
    with torch.no_grad():
        logits = hf(prompt).logits
        model_logits = lm(prompt).logits
    assert logits.shape == (2, 4, 1024)
    assert torch.equal(logits[..., kept], model_logits[..., 1:])
    outside = torch.ones(1024, dtype=torch.bool)
    outside[kept] = False
    assert bool(torch.isneginf(logits[..., outside]).all())
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, generate(lm, prompt, 6, temperature=0))
    assert bool(torch.isin(out[:, 4:], kept).all())


def test_cache_is_the_decoding_state(compressor):
    lm = _lm(compressor, dtype=torch.float64)
    hf = EngramForCausalLM.from_engram(lm)
    ids = _ids(1, 10)
    with torch.no_grad():
        first = hf(ids[:, :6], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert isinstance(cache, EngramCache) and cache.get_seq_length() == 6
        rest = hf(ids[:, 6:], cache=cache, use_cache=True)
        full = hf(ids)
    assert cache.get_seq_length() == 10 and cache.state.history is not None
    torch.testing.assert_close(rest.logits, full.logits[:, 6:], rtol=0, atol=1e-10)


def test_loss_with_labels_is_engrams_loss(compressor):
    lm = _lm(compressor)
    hf = EngramForCausalLM.from_engram(lm)
    ids = _ids(2, 16)
    labels = ids.clone()
    labels[0, :4] = -100
    out = hf(ids, labels=labels)
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    assert torch.equal(out.loss, lm(ids, targets=targets).loss)
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert hf.lm.embed.weight.grad is not None


def test_loss_adds_the_moe_balance_loss_as_engrams_trainer_does(compressor):
    config = dataclasses.replace(CONFIG, moe=dataclasses.replace(MOE, aux_loss_weight=0.01))
    lm = _lm(compressor, config).train()
    hf = EngramForCausalLM.from_engram(lm)
    ids = _ids(2, 16)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    reference = lm(ids, targets=targets)
    assert reference.aux_loss is not None and float(reference.aux_loss.detach()) > 0
    out = hf(ids, labels=ids)
    assert torch.equal(out.aux_loss, reference.aux_loss)
    assert torch.equal(out.loss, reference.loss + reference.aux_loss)  # Trainer.train_step's composition
    hf.config.include_aux_loss = False
    assert torch.equal(hf(ids, labels=ids).loss, reference.loss)
    saved = EngramHFConfig.from_dict(hf.config.to_dict())
    assert saved.include_aux_loss is False


def test_unsupported_inputs_are_refused(compressor):
    hf = EngramForCausalLM.from_engram(_lm(compressor))
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(2, 6, 48))
    with pytest.raises(OSError, match="not a folder"):
        EngramForCausalLM.from_pretrained("no/such/folder")


def test_engram_imports_without_transformers():
    """transformers is optional: only engram.hf imports it, and says how to install it."""
    code = """
import sys

class BlockTransformers:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("blocked " + name)
        return None

sys.meta_path.insert(0, BlockTransformers())
import engram, engram.model, engram.inference, engram.storage, engram.training
assert not [m for m in sys.modules if m.split(".")[0] == "transformers"]
try:
    import engram.hf
except ImportError as exc:
    print("refused:", exc)
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "pip install 'engram[hf]'" in result.stdout


def test_export_hf_command_converts_a_trained_run_in_every_tier(tmp_path, monkeypatch):
    """One run, trained with device tables, exported; then its tables converted to host and to disk, exported again."""
    from transformers import pipeline

    from engram.cli.main import main
    from engram.training.convert import convert_run_tables
    from engram.training.run import load_run
    from tests.cli_runs import make_workspace, run_engram

    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws = make_workspace(tmp_path)
    run = tmp_path / "run"
    sets = ["train.steps=3", "train.batch_size=2", "train.seq_len=32", "train.eval_every=3", "train.eval_batches=1"]
    sets += ["train.checkpoint_every=3", "train.warmup_steps=1"]
    trained = run_engram(
        "train", "--data", ws["data"], "--model", ws["model"], "--out", run, "--tokenizer", ws["tokenizer"],
        "--no-progress", *[a for s in sets for a in ("--set", s)], cache=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    text = "Shall I compare thee to a summer's day?"
    for tier in ("device", "host", "disk"):
        out = tmp_path / f"hf-{tier}"
        if tier == "device":  # the command line as a user runs it
            exported = run_engram("export-hf", run, out, "--max-shard-size", "200KB", cache=tmp_path)
            assert exported.returncode == 0, exported.stderr
            again = run_engram("export-hf", run, out, cache=tmp_path)
            assert again.returncode == 2 and "not an empty folder" in again.stderr
        else:
            convert_run_tables(run, StorageConfig(tier=tier))
            assert main(["export-hf", str(run), str(out), "--max-shard-size", "200KB"]) == 0
        assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
        assert (out / "tables" / "layer_01" / "weight.table").is_file() == (tier == "disk")

        model, _, tokenizer, _ = load_run(run, "cpu")  # also proves export-hf let go of a disk run's lock
        try:
            loaded = AutoModelForCausalLM.from_pretrained(out)
            assert (
                type(_table(loaded))
                is type(model.blocks[1].engram.table)
                is {"device": DeviceTable, "host": HostTable, "disk": DiskTable}[tier]
            )
            loaded.check_tokenizer(out / "tokenizer.json")  # the exported tokenizer compresses as the saved table
            with pytest.raises(ValueError, match="not the tokenizer the model was built with"):
                loaded.check_tokenizer(CompressedTokenizer.from_table(np.arange(1024)))
            prompt = torch.tensor([tokenizer.encode(text)])
            with torch.no_grad():
                assert torch.equal(loaded(prompt).logits, EngramForCausalLM.from_engram(model)(prompt).logits)
            reference = generate(model, prompt, 8, temperature=0)
            assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False), reference)
            generator = pipeline("text-generation", model=str(out))  # the folder's tokenizer, as saved
            out_ids = generator(text, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
            assert out_ids == reference[0].tolist()
            _close_disk_tables(loaded.lm)
            _close_disk_tables(generator.model.lm)
        finally:
            if model.run_lock is not None:
                model.run_lock.release()
            _close_disk_tables(model)


# -- tables in the host and disk tiers ------------------------------------------------------------------------


def _placed_lm(compressor, tier: str, directory: Path, config: ModelConfig = CONFIG) -> EngramLM:
    """``_lm`` with its tables placed in ``tier`` (disk tables under ``directory``)."""
    lm = _lm(compressor, config)
    return place_tables(lm, StorageConfig(tier=tier, directory=str(directory)))


def _table(model: EngramForCausalLM):
    return model.lm.blocks[1].engram.table


@pytest.mark.parametrize("saved", ["device", "host", "disk"])
def test_every_tier_round_trips_bit_for_bit_into_every_tier(compressor, tmp_path, saved):
    lm = _placed_lm(compressor, saved, tmp_path / "run-tables")
    folder = tmp_path / "saved"
    EngramForCausalLM.from_engram(lm).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["engram_storage"]["tier"] == saved
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        in_weights = "lm.blocks.1.engram.table.weight" in set(f.keys())
    assert in_weights == (saved != "disk")  # disk rows are never in the safetensors
    assert (folder / "tables" / "layer_01" / "weight.table").is_file() == (saved == "disk")
    ids = _ids(2, 20)
    with torch.no_grad():
        reference = lm(ids).logits

    kinds = {"device": DeviceTable, "host": HostTable, "disk": DiskTable}
    targets = {"saved": None, **{t: StorageConfig(tier=t, directory=str(tmp_path / f"to-{t}")) for t in kinds}}
    for name, storage in targets.items():
        loaded = AutoModelForCausalLM.from_pretrained(folder, storage=storage)  # passed on to EngramForCausalLM
        tier = saved if storage is None else storage.tier
        assert type(_table(loaded)) is kinds[tier], name
        assert loaded.config.engram_storage["tier"] == tier
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, reference), name
        if tier == "disk" and storage is not None:  # copied into the new folder, writable, for training
            assert _table(loaded).directory == tmp_path / "to-disk" / "layer_01" and _table(loaded).writable
        _close_disk_tables(loaded.lm)
    _close_disk_tables(lm)


def test_a_disk_model_reads_the_next_batch_ahead_through_forward(compressor, tmp_path, monkeypatch):
    hf = EngramForCausalLM.from_engram(_placed_lm(compressor, "disk", tmp_path / "tables"))
    announced = []
    read_ahead = EngramLM.read_ahead

    def recorded(lm, ids, **options):
        announced.append(ids)
        return read_ahead(lm, ids, **options)

    monkeypatch.setattr(EngramLM, "read_ahead", recorded)
    ids, following = _ids(2, 24), _ids(2, 24, seed=2)
    with torch.no_grad():
        plain = hf(ids).logits
        assert announced == []
        ahead = hf(ids, read_ahead=following).logits
    assert len(announced) == 1 and torch.equal(announced[0], following)
    assert torch.equal(ahead, plain)
    _close_disk_tables(hf.lm)


def _close_disk_tables(lm: EngramLM) -> None:
    for layer in lm.engram_layers().values():
        if isinstance(layer.table, DiskTable):
            layer.table.close()


def _train_step(model: EngramForCausalLM, ids: torch.Tensor) -> None:
    """One RowAdam step on the Engram tables (what engram's Trainer does for them)."""
    tables = [layer.table for layer in model.lm.engram_layers().values()]
    optimizer = RowAdam(tables, lr=0.1)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def test_saved_disk_tables_open_read_only_in_place_or_copied_for_training(compressor, tmp_path):
    lm = _placed_lm(compressor, "disk", tmp_path / "run-tables")
    folder = tmp_path / "saved"
    EngramForCausalLM.from_engram(lm).save_pretrained(folder)
    saved_file = folder / "tables" / "layer_01" / "weight.table"
    ids = _ids(2, 16)
    with torch.no_grad():
        reference = lm(ids).logits

    loaded = EngramForCausalLM.from_pretrained(folder)  # in place: memory-mapped, read-only
    table = _table(loaded)
    assert isinstance(table, DiskTable) and table.directory == folder / "tables" / "layer_01"
    assert not table.writable and "lm.blocks.1.engram.table.weight" not in loaded.state_dict()
    with pytest.raises(RuntimeError, match="read-only"):
        _train_step(loaded, ids)  # nothing may change the saved model
    assert sorted(p.name for p in saved_file.parent.iterdir()) == ["weight.table"]  # no optimizer state written
    inode = saved_file.stat().st_ino
    loaded.save_pretrained(folder)  # into its own folder: the tables are already there, kept as they are
    assert saved_file.stat().st_ino == inode
    loaded.save_pretrained(tmp_path / "again")  # elsewhere: copied
    assert (tmp_path / "again" / "tables" / "layer_01" / "weight.table").is_file()
    _close_disk_tables(loaded.lm)

    storage = StorageConfig(tier="disk", directory=str(tmp_path / "finetune"))
    tuned = EngramForCausalLM.from_pretrained(folder, storage=storage)
    assert _table(tuned).directory == tmp_path / "finetune" / "layer_01" and _table(tuned).writable
    _train_step(tuned, ids)
    with torch.no_grad():
        assert not torch.equal(tuned(ids).logits, reference)  # the copy trained
    with pytest.raises(ValueError, match="already holds a table"):
        EngramForCausalLM.from_pretrained(folder, storage=storage)
    _close_disk_tables(tuned.lm)
    again = EngramForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, reference)  # the saved tables did not change
    _close_disk_tables(again.lm)

    (folder / "tables" / "layer_01" / "weight.table").unlink()
    with pytest.raises(FileNotFoundError, match=r"weight\.table is missing"):
        EngramForCausalLM.from_pretrained(folder)
    _close_disk_tables(lm)


_FRESH_PROCESS_LOAD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from engram.hf import EngramForCausalLM

def memory_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

folder, warm_folder, ids_file, out_file = sys.argv[1:]
ids = load_file(ids_file)["ids"]
with torch.no_grad():  # a small model first: what loading and a forward pass cost besides the table
    EngramForCausalLM.from_pretrained(warm_folder)(ids)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets the peak (VmHWM) to the resident memory now, so that it measures the loading
before, anon_before = memory_kib("VmRSS"), memory_kib("RssAnon")
model = EngramForCausalLM.from_pretrained(folder)
load_peak = memory_kib("VmHWM") - before
with torch.no_grad():
    logits = model(ids).logits
# Pages of the mapped file that lookups touch count as RssFile (page cache, reclaimable); rows read into
# memory (a copy) would be RssAnon.
anon = memory_kib("RssAnon") - anon_before
table = model.lm.blocks[1].engram.table
save_file({"logits": logits}, out_file)
keys = [k for k in model.state_dict() if "engram.table" in k]
report = {"load_peak_mib": load_peak / 1024, "anon_mib": anon / 1024, "table": type(table).__name__}
print(json.dumps({**report, "directory": str(table.directory), "writable": table.writable, "table_keys": keys}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through Linux's /proc")
def test_disk_tables_load_in_a_fresh_process_without_reading_the_rows(compressor, tmp_path):
    """A ~60 MiB disk table: a new process loads the saved folder, and its peak memory grows by far less."""
    config = dataclasses.replace(CONFIG, engram=dataclasses.replace(ENGRAM_CONV, engram_vocab_size=[260_000] * 2))
    lm = _placed_lm(compressor, "disk", tmp_path / "run-tables", config)
    table_mib = _table(EngramForCausalLM.from_engram(lm)).weight.nbytes / 2**20
    assert table_mib > 50
    folder = tmp_path / "saved"
    EngramForCausalLM.from_engram(lm).save_pretrained(folder)
    ids = _ids(2, 20)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    with torch.no_grad():
        reference = lm(ids).logits
    _close_disk_tables(lm)

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    EngramForCausalLM.from_engram(_lm(compressor)).save_pretrained(tmp_path / "warm")
    args = [folder, tmp_path / "warm", tmp_path / "ids.safetensors", tmp_path / "logits.safetensors"]
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_LOAD, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["table"] == "DiskTable" and not report["writable"] and not report["table_keys"]
    assert Path(report["directory"]) == folder / "tables" / "layer_01"
    assert report["load_peak_mib"] < table_mib / 4, report  # loading maps the rows, reads none
    assert report["anon_mib"] < table_mib / 4, report  # looking rows up copies no table into memory
    assert torch.equal(load_file(str(tmp_path / "logits.safetensors"))["logits"], reference)


# -- beam search and pipelines ---------------------------------------------------------------------------------


def test_beam_search_with_cache_equals_beam_search_without(compressor):
    lm = _lm(compressor, dtype=torch.float64)
    hf = EngramForCausalLM.from_engram(lm)
    prompt = _ids(2, 5, seed=3)
    options = dict(max_new_tokens=10, num_beams=3, do_sample=False)
    cached = hf.generate(prompt, use_cache=True, **options)
    uncached = hf.generate(prompt, use_cache=False, **options)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, hf.generate(prompt, max_new_tokens=10, do_sample=False))  # beams mattered


def test_reordered_cache_continues_the_reordered_sequences(compressor):
    """reorder_cache(beam_idx) leaves the state of the sequences beam_idx picks, as if they had been decoded."""
    lm = _lm(compressor, dtype=torch.float64)
    hf = EngramForCausalLM.from_engram(lm)
    ids = _ids(3, 9)
    with torch.no_grad():
        cache = getattr(hf(ids[:, :6], use_cache=True), CACHE_FIELD)
        beam_idx = torch.tensor([2, 2, 0])
        cache.reorder_cache(beam_idx)
        picked = ids[beam_idx]
        rest = hf(picked[:, 6:], use_cache=True, **{CACHE_FIELD: cache}).logits
        full = hf(picked).logits
    torch.testing.assert_close(rest, full[:, 6:], rtol=0, atol=1e-10)


def test_text_generation_pipeline_with_the_saved_tokenizer(compressor, tmp_path, monkeypatch):
    from transformers import pipeline

    from tests.corpus import sonnets_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    lm = _placed_lm(compressor, "disk", tmp_path / "run-tables")
    hf = EngramForCausalLM.from_engram(lm)
    hf.save_pretrained(tmp_path / "saved")
    hf.save_tokenizer(sonnets_tokenizer(), tmp_path / "saved")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    with pytest.raises(ValueError, match="not the tokenizer the model was built with"):
        hf.save_tokenizer(CompressedTokenizer.from_table(np.arange(1024)), tmp_path / "other")

    generator = pipeline("text-generation", model=str(tmp_path / "saved"))
    assert isinstance(_table(generator.model), DiskTable)
    text = "Shall I compare thee to a summer's day?"
    out = generator(text, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = torch.tensor([compressor.encode(text)])
    assert out == generate(lm, prompt, 8, temperature=0)[0].tolist()
    assert generator(text, max_new_tokens=8, do_sample=False)[0]["generated_text"].startswith(text)
    _close_disk_tables(generator.model.lm)
    _close_disk_tables(lm)


@pytest.mark.slow
def test_the_demos_models_export_and_generate_through_a_pipeline(tmp_path, monkeypatch):
    """`engram demo --quick`, then `engram export-hf` of both of its runs (about a minute on 2 cores)."""
    from transformers import pipeline

    from engram.training.run import load_run
    from tests.cli_runs import run_engram

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo = run_engram("demo", "--quick", "--out", tmp_path / "demo", "--no-progress", cache=tmp_path)
    assert demo.returncode == 0, demo.stderr
    text = "To be, or not to be"
    for name in ("moe", "engram-moe"):
        exported = run_engram("export-hf", tmp_path / "demo" / name, tmp_path / name, cache=tmp_path)
        assert exported.returncode == 0, exported.stderr
        generator = pipeline("text-generation", model=str(tmp_path / name))
        out = generator(text, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        model, _, tokenizer, _ = load_run(tmp_path / "demo" / name, "cpu")
        assert out == generate(model, torch.tensor([tokenizer.encode(text)]), 6, temperature=0)[0].tolist()


def test_bfloat16_host_tables_keep_their_dtype(compressor, tmp_path):
    lm = place_tables(_lm(compressor), StorageConfig(tier="host", dtype="bfloat16"))
    EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["engram_storage"]["dtype"] == "bfloat16"
    ids = _ids(2, 12)
    with torch.no_grad():
        reference = lm(ids).logits
    for storage in (None, StorageConfig(tier="device")):
        loaded = EngramForCausalLM.from_pretrained(tmp_path / "saved", storage=storage)
        assert _table(loaded).dtype == (torch.bfloat16 if storage is None else torch.float32)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, reference)  # bfloat16 rows are exact in float32


def test_a_damaged_saved_disk_table_is_refused_not_loaded(compressor, tmp_path):
    from engram.storage.table_file import DATA_OFFSET

    lm = _placed_lm(compressor, "disk", tmp_path / "run-tables")
    folder = tmp_path / "saved"
    EngramForCausalLM.from_engram(lm).save_pretrained(folder)
    _close_disk_tables(lm)
    weight_file = folder / "tables" / "layer_01" / "weight.table"
    with open(weight_file, "r+b") as f:  # one flipped bit in row 0, as a disk error would leave it
        f.seek(DATA_OFFSET)
        byte = f.read(1)[0]
        f.seek(DATA_OFFSET)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(ValueError, match=r"weight\.table"):  # RowChecksumError names the file and the row
        EngramForCausalLM.from_pretrained(folder, storage=StorageConfig(tier="device"))
    with pytest.raises(ValueError, match="not copied"):
        EngramForCausalLM.from_pretrained(folder, storage=StorageConfig(tier="disk", directory=str(tmp_path / "x")))
    in_place = EngramForCausalLM.from_pretrained(folder)  # opening reads no row, so it cannot tell yet
    with pytest.raises(ValueError, match="not saved"):
        in_place.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy" / "tables").exists() and not list((tmp_path / "copy").glob(".tables*"))
    _close_disk_tables(in_place.lm)
