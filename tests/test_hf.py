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
from transformers import AutoConfig, AutoModelForCausalLM

from engram import CompressedTokenizer, EngramIndexer
from engram.hf import EngramCache, EngramForCausalLM, EngramHFConfig
from engram.inference import generate
from engram.model import EngramLM, ModelConfig
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


def test_export_hf_command_converts_a_trained_run(tmp_path, monkeypatch):
    from engram.training.run import load_run
    from tests.cli_runs import make_workspace, run_engram

    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    ws = make_workspace(tmp_path)
    run = tmp_path / "run"
    sets = ["train.steps=3", "train.batch_size=2", "train.seq_len=32", "train.eval_every=3", "train.eval_batches=1"]
    sets += ["train.checkpoint_every=3", "train.warmup_steps=1"]
    trained = run_engram(
        "train", "--data", ws["data"], "--model", ws["model"], "--out", run, "--tokenizer", ws["tokenizer"],
        "--no-progress", *[a for s in sets for a in ("--set", s)], cache=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "hf"
    exported = run_engram("export-hf", run, out, "--max-shard-size", "200KB", cache=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
    again = run_engram("export-hf", run, out, cache=tmp_path)
    assert again.returncode == 2 and "not an empty folder" in again.stderr

    model, _, tokenizer, _ = load_run(run, "cpu")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded.check_tokenizer(out / "tokenizer.json")  # the exported tokenizer compresses as the saved table
    with pytest.raises(ValueError, match="not the tokenizer the model was built with"):
        loaded.check_tokenizer(CompressedTokenizer.from_table(np.arange(1024)))
    prompt = torch.tensor([tokenizer.encode("Shall I compare thee to a summer's day?")])
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, EngramForCausalLM.from_engram(model)(prompt).logits)
    out_ids = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out_ids, generate(model, prompt, 8, temperature=0))
