"""engram.hf.retrofit: Engram added to tiny transformers Llama, Qwen2, Qwen3 and GPT-2 models built here (no hub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5.24")

from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainingArguments,
)

from engram import CompressedTokenizer
from engram.hf.retrofit import RetrofitOptimizer, engram_parameters, load_retrofitted, retrofit
from tests.corpus import sonnets_tokenizer, sonnets_tokens

SRC = Path(__file__).resolve().parents[1] / "src"
VOCAB = 1024  # the sonnets BPE's ids
# Small tables and rows: 2 orders x 2 heads of 8 dims, primes above 101.
SMALL = {"n_embed_per_ngram": 16, "n_head_per_ngram": 2, "engram_vocab_size": [101, 101]}
_LLAMA_LIKE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA_LIKE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_LLAMA_LIKE, head_dim=8)),
    # 1030 embedding rows for 1024 tokenizer ids: the rounded-vocabulary case
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=1030, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                               bos_token_id=1, eos_token_id=1)),
}  # fmt: skip


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    """The sonnets BPE as a transformers tokenizer (what a user has with a hub model)."""
    return PreTrainedTokenizerFast(tokenizer_object=sonnets_tokenizer(), pad_token="<pad>", eos_token="<eos>")


def _model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _wake(model: nn.Module, seed: int = 3) -> None:
    """Give every Engram module a non-zero value projection and convolution, so that it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for engram in model.engram.layers.values():
            for weight in (engram.value_proj.weight, engram.short_conv.conv.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outputs_unchanged_at_insertion(family, hf_tokenizer):
    model = _model(family)
    ids = _ids(2, 16)
    with torch.no_grad():
        before = model(ids, labels=ids)
    returned = retrofit(model, hf_tokenizer, layers=[0, 2], **SMALL)
    assert returned is model and sorted(model.engram.layers) == ["0", "2"]
    with torch.no_grad():
        after = model(ids, labels=ids)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)  # bit for bit
    # The memory is live: the gate sees the hidden state, and a non-zero W_V changes the logits.
    _wake(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before.logits, atol=1e-3)


def test_zero_convolution_alone_does_not_preserve_outputs(hf_tokenizer):
    """Y = v~ + SiLU(conv(RMSNorm(v~))) with a zero conv is still v~ = alpha v: W_V = 0 is what makes Y = 0."""
    model = retrofit(_model("llama"), hf_tokenizer, layers=[1], **SMALL)
    engram = model.engram.layers["1"]
    assert torch.count_nonzero(engram.short_conv.conv.weight) == 0  # the paper's zero conv, as configured
    hidden = torch.randn(2, 16, 32)
    hash_ids = engram.indexer.hash_layer(_ids(2, 16), 1)
    assert torch.count_nonzero(engram(hidden, hash_ids=hash_ids)) == 0
    with torch.no_grad():
        engram.value_proj.weight.normal_()
    assert torch.count_nonzero(engram(hidden, hash_ids=hash_ids)) > 0


def test_first_step_gradient_reaches_value_projection_only(hf_tokenizer):
    model = retrofit(_model("llama"), hf_tokenizer, layers=[1], freeze_backbone=True, **SMALL).train()
    ids = _ids(2, 16)
    model(ids, labels=ids).loss.backward()
    engram = model.engram.layers["1"]
    assert torch.count_nonzero(engram.value_proj.weight.grad) > 0
    for name in ("key_proj.weight", "key_proj.bias", "key_norm.weight", "query_norm.weight", "short_conv.conv.weight"):
        assert torch.count_nonzero(engram.get_parameter(name).grad) == 0, name
    table_grad = engram.table.weight.grad.coalesce()
    assert table_grad.values().numel() > 0 and torch.count_nonzero(table_grad.values()) == 0  # touched, zero
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("engram."))


def _greedy_by_recomputation(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence at every step (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_recomputation(family, hf_tokenizer):
    plain = _model(family)
    model = retrofit(_model(family), hf_tokenizer, layers=[1, 2], **SMALL)
    _wake(model)
    prompt = _ids(2, 7)
    mask = torch.ones_like(prompt)
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, _greedy_by_recomputation(model, prompt, 12))
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # Engram changed what is generated, so the comparison above could fail.
    original = plain.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert not torch.equal(cached, original)

    # By hand: a prefill then one position at a time reproduces the full pass's logits.
    ids = _ids(2, 12, seed=5)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t : t + 1], cache=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_beam_search_reorders_engram_state(hf_tokenizer):
    model = retrofit(_model("qwen2"), hf_tokenizer, layers=[1], **SMALL)
    _wake(model)
    prompt = _ids(2, 6)
    args = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 8, "do_sample": False, "num_beams": 3}
    assert torch.equal(model.generate(prompt, use_cache=True, **args), model.generate(prompt, use_cache=False, **args))


def test_refusals(hf_tokenizer):
    with pytest.raises(TypeError, match=r"supports the causal LMs.*MistralForCausalLM"):
        retrofit(MistralForCausalLM(MistralConfig(**_LLAMA_LIKE)), hf_tokenizer)
    with pytest.raises(ValueError, match=r"each must be a decoder layer in \[0, 3\)"):
        retrofit(_model("llama"), hf_tokenizer, layers=[3], **SMALL)
    small = LlamaForCausalLM(LlamaConfig(**{**_LLAMA_LIKE, "vocab_size": 512}))
    with pytest.raises(ValueError, match="tokenizer has 1024 ids but the model's vocabulary only 512"):
        retrofit(small, hf_tokenizer, **SMALL)
    model = retrofit(_model("llama"), hf_tokenizer, layers=[1], **SMALL)
    with pytest.raises(ValueError, match="retrofitted already"):
        retrofit(model, hf_tokenizer, **SMALL)
    ids = _ids(2, 8)
    with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        model(inputs_embeds=model.get_input_embeddings()(ids))
    padded = torch.ones_like(ids)
    padded[0, :2] = 0
    with pytest.raises(ValueError, match="does not support padding"):
        model(ids, attention_mask=padded)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        model.train()(ids, labels=ids)
    model.gradient_checkpointing_disable()
    model.eval()
    with pytest.raises(ValueError, match="the cache holds"):  # a cache cropped behind Engram's back
        out = model(ids, use_cache=True)
        out.past_key_values.crop(-4)
        model(ids[:, :1], cache=out.past_key_values)


def _train(model: nn.Module, steps: int = 12, out: Path | None = None, resume: str | None = None) -> None:
    """A few real transformers.Trainer steps on sonnet windows, with its default gradient clipping (1.0).

    With ``out`` the Trainer saves a checkpoint every 4 steps there; ``resume`` continues from one.
    """
    train, _ = sonnets_tokens()
    windows = torch.from_numpy(train[: 16 * 32].astype("int64")).view(16, 32)
    data = [{"input_ids": w, "labels": w} for w in windows]
    args = TrainingArguments(
        output_dir=None if out is None else str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no" if out is None else "steps",
        save_steps=4,
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(RetrofitOptimizer.for_model(model), None))
    trainer.train(resume_from_checkpoint=resume)


def _window_loss(model: nn.Module) -> float:
    train, _ = sonnets_tokens()
    ids = torch.from_numpy(train[: 16 * 32].astype("int64")).view(16, 32)
    with torch.no_grad():
        return model.eval()(ids, labels=ids).loss.item()


def test_trainer_with_frozen_backbone_trains_engram_only(hf_tokenizer):
    model = retrofit(_model("llama"), hf_tokenizer, layers=[1], freeze_backbone=True, **SMALL)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("engram.")}
    engram = {k: v.clone() for k, v in model.engram.state_dict().items()}
    before = _window_loss(model)
    _train(model)
    after = _window_loss(model)
    assert after < before - 0.01, (before, after)
    for key, value in model.state_dict().items():
        if not key.startswith("engram."):
            assert torch.equal(value, backbone[key]), key  # bit-identical backbone
    changed = {k for k, v in model.engram.state_dict().items() if not torch.equal(v, engram[k])}
    dense, tables = engram_parameters(model)
    assert {"layers.1.value_proj.weight", "layers.1.key_proj.weight", "layers.1.table.weight"} <= changed
    assert "compression_table" not in changed and len(tables) == 1 and dense


def test_trainer_trains_everything_unfrozen(hf_tokenizer):
    model = retrofit(_model("gpt2"), hf_tokenizer, layers=[1], **SMALL)
    wte = model.transformer.wte.weight.clone()
    table = model.engram.layers["1"].table.weight.clone()
    before = _window_loss(model)
    _train(model, steps=6)
    assert _window_loss(model) < before
    assert not torch.equal(model.transformer.wte.weight, wte) and not torch.equal(
        model.engram.layers["1"].table.weight, table
    )


def test_optimizer_state_round_trip(hf_tokenizer):
    """The tables' row state (RowAdam) survives state_dict/load_state_dict with the AdamW state."""
    model = retrofit(_model("llama"), hf_tokenizer, layers=[1], **SMALL).train()
    optimizer = RetrofitOptimizer.for_model(model, lr=1e-2)
    ids = _ids(4, 16)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state_dict()
    assert state["param_groups"][-1]["lr"] == pytest.approx(5e-2) and state["param_groups"][-1]["params"] == []
    again = RetrofitOptimizer.for_model(model, lr=1e-2)
    again.load_state_dict(state)
    restored = again.state_dict()["row_state"][0]
    for name, value in state["row_state"][0].items():
        assert torch.equal(restored[name], value), name
    assert again.rows.param_groups[0] is again.param_groups[-1]
    # The newest optimizer of the model takes the tables' gradients (the first one's hook is gone).
    table = model.engram.layers["1"].table
    rows = table.weight.detach().clone()
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # has no table gradient any more: the rows stay
    assert torch.equal(table.weight, rows)
    again.step()
    assert not torch.equal(table.weight, rows)


@pytest.mark.parametrize(
    ("family", "dtype", "shard"), [("qwen3", torch.float32, None), ("gpt2", torch.bfloat16, "50KB")]
)
def test_save_and_load_bit_for_bit(family, dtype, shard, hf_tokenizer, tmp_path):
    model = retrofit(_model(family).to(dtype), hf_tokenizer, layers=[1], **SMALL)
    _wake(model)
    model.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    loaded = load_retrofitted(tmp_path)
    assert loaded.dtype == dtype and loaded.engram.layers["1"].table.weight.dtype == dtype
    assert type(loaded) is type(model) and not loaded.training
    ids = _ids(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert loaded.config.engram_retrofit == model.config.engram_retrofit
    # The compression came from the saved table, not from a tokenizer.
    assert torch.equal(loaded.engram.compression_table, model.engram.compression_table)
    with pytest.raises(ValueError, match="not a retrofitted model"):
        _model(family).save_pretrained(tmp_path / "plain") or load_retrofitted(tmp_path / "plain")


def test_tokenizers_tokenizer_and_compressor_give_the_same_compression(hf_tokenizer):
    from_hf = retrofit(_model("qwen2"), hf_tokenizer, layers=[1], **SMALL)
    from_backend = retrofit(_model("qwen2"), sonnets_tokenizer(), layers=[1], pad_id=0, **SMALL)
    compressor = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
    assert torch.equal(from_hf.engram.compression_table, torch.from_numpy(compressor.lookup_table))
    assert torch.equal(from_backend.engram.compression_table, from_hf.engram.compression_table)
    assert from_hf.engram.config.pad_id == hf_tokenizer.pad_token_id == 0


def test_a_saved_model_loads_in_a_fresh_process(hf_tokenizer, tmp_path):
    model = retrofit(_model("llama"), hf_tokenizer, layers=[0, 2], **SMALL)
    _wake(model)
    model.save_pretrained(tmp_path / "model")
    ids = _ids(2, 16)
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from engram.hf.retrofit import load_retrofitted\n"
        "model = load_retrofitted(sys.argv[1])\n"
        "ids = torch.tensor(eval(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    save_file({'logits': model(ids).logits.contiguous()}, sys.argv[3])\n"
    )
    out = tmp_path / "logits.safetensors"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model"), str(ids.tolist()), str(out)],
        check=True, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    with torch.no_grad():
        assert torch.equal(load_file(str(out))["logits"], model(ids).logits)


def test_readme_snippet_runs(hf_tokenizer, tmp_path, monkeypatch):
    """The README's retrofit snippet, with a tiny Qwen3 and the sonnets tokenizer standing in for the hub's."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("<!-- retrofit-snippet -->\n```python\n")[1].split("```")[0]
    substitutions = {
        'AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")': '_model("qwen3")',
        'AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B")': "hf_tokenizer",
        "n_embed_per_ngram=256, engram_vocab_size=[100_000, 100_000]": "**SMALL",
        "max_steps=100": "max_steps=3",
    }
    for old, new in substitutions.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ids = _ids(8, 16)
    namespace = {"_model": _model, "hf_tokenizer": hf_tokenizer, "SMALL": SMALL, "prompt_ids": ids[:1, :5],
                 "train_data": [{"input_ids": x, "labels": x} for x in ids]}  # fmt: skip
    exec(compile(code, "README.md", "exec"), namespace)
    model, out = namespace["model"], namespace["out"]
    assert out.shape == (1, 25) and sorted(model.engram.layers) == ["1"]
    assert (tmp_path / "runs/retrofit/final/config.json").is_file()


def test_table_gradients_accumulate_over_backward_calls(hf_tokenizer):
    """Two backward passes before a step hand RowAdam the sum of both table gradients (gradient accumulation)."""
    model = retrofit(_model("llama"), hf_tokenizer, layers=[1], freeze_backbone=True, **SMALL).train()
    _wake(model)
    optimizer = RetrofitOptimizer.for_model(model)
    weight = model.engram.layers["1"].table.weight
    a, b = _ids(2, 16, seed=1), _ids(2, 16, seed=2)
    model(a, labels=a).loss.backward()
    model(b, labels=b).loss.backward()
    assert weight.grad is None  # off the parameter, so clip_grad_norm_ over model.parameters() works
    accumulated = optimizer._pending[id(weight)].coalesce().to_dense()
    optimizer.zero_grad()
    assert not optimizer._pending
    (model(a, labels=a).loss + model(b, labels=b).loss).backward()
    torch.testing.assert_close(accumulated, optimizer._pending[id(weight)].coalesce().to_dense())
    assert torch.count_nonzero(accumulated) > 0


@pytest.mark.slow
def test_the_measured_example_runs_quick(tmp_path):
    """examples/retrofit_llama.py --quick: every arm trains and is recorded (docs/retrofit.md has the full run)."""
    import json
    import os

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "examples/retrofit_llama.py"), "--quick", "--out", str(tmp_path)],
        check=True, env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}, capture_output=True,
        timeout=600,
    )  # fmt: skip
    result = json.loads((tmp_path / "results.json").read_text())
    arms = {r["arm"]: r for r in result["runs"]}
    assert set(arms) == {"continue", "engram-frozen", "engram-frozen-lr3x", "engram-all"}
    start = result["pretrain"]["val"]["loss"]
    assert arms["continue"]["val"]["loss"] < start  # training moves the unfrozen model
    frozen = arms["engram-frozen"]
    assert frozen["trainable_params"] == frozen["table_params"] + frozen["engram_dense_params"]
    assert arms["continue"]["table_params"] == 0 and arms["engram-all"]["trainable_params"] == frozen["total_params"]


def test_trainer_resumes_from_its_checkpoint_exactly(hf_tokenizer, tmp_path):
    """Trainer checkpoints (weights, AdamW and the tables' RowAdam state) resume to the same weights bit for bit."""
    straight = retrofit(_model("llama"), hf_tokenizer, layers=[1], freeze_backbone=True, **SMALL)
    _train(straight, steps=8, out=tmp_path)
    resumed = retrofit(_model("llama", seed=5), hf_tokenizer, layers=[1], freeze_backbone=True, **SMALL)
    _train(resumed, steps=8, out=tmp_path / "again", resume=str(tmp_path / "checkpoint-4"))
    state = resumed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in straight.state_dict().items())


def test_ids_beyond_the_tokenizer_get_canonical_ids_of_their_own(hf_tokenizer):
    """GPT-2 here has 1030 embedding rows for the tokenizer's 1024 ids: the 6 extra ids can be hashed too."""
    model = retrofit(_model("gpt2"), hf_tokenizer, layers=[1], **SMALL)
    table = model.engram.compression_table
    compressor = CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)
    assert table.shape == (1030,) and torch.equal(table[:1024], torch.from_numpy(compressor.lookup_table))
    assert table[1024:].tolist() == list(range(len(compressor), len(compressor) + 6))
    ids = torch.tensor([[5, 1029, 1027, 7]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 4, 1030)
