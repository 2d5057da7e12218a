"""Incremental decoding equals the full forward pass; generation (greedy, sampled, trimmed vocabulary, eos, errors)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engram import CompressedTokenizer, Engram, EngramConfig, EngramIndexer, NgramHasher
from engram.inference import generate
from engram.model import EngramLM, ModelConfig
from engram.model.layers import CausalSelfAttention, KVCache, Rotary
from tests.corpus import sonnets_tokenizer
from tests.test_model import BASE, ENGRAM, MOE

# Two Engram layers with a live convolution (PyTorch's init instead of zeros), so that decoding
# depends on the convolution state reaching (kernel_size - 1) * N = 9 positions back.
ENGRAM_CONV = dataclasses.replace(ENGRAM, layer_ids=[0, 1], conv_zero_init=False)
VARIANTS = {
    "dense": ModelConfig(**BASE),
    "moe": ModelConfig(**BASE, moe=MOE, n_dense_layers=1),
    "engram_moe": ModelConfig(**BASE, moe=MOE, engram=ENGRAM_CONV),
    "engram_moe_4_branches": ModelConfig(**BASE, moe=MOE, engram=ENGRAM_CONV, n_branches=4, tie_embeddings=True),
}
KEPT = [5, 17, 99, 1000, 3, 250, 640, 801]  # the trimmed vocabulary's tokenizer ids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding runs hundreds of tiny ops; on a busy machine, waking idle threads for each costs
    seconds (tens of seconds under load), one thread takes about 3 s for the whole module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def indexer() -> EngramIndexer:
    return EngramIndexer(ENGRAM_CONV, CompressedTokenizer(sonnets_tokenizer(), cache_dir=False))


def _model(config: ModelConfig, indexer: EngramIndexer) -> EngramLM:
    """A float64 model in eval mode, its hyper-connections moved away from their identity init."""
    torch.manual_seed(0)
    model = EngramLM(config, indexer=indexer if config.engram else None).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_hc." in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode(model: EngramLM, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ``ids`` fed through one decoding state in chunks of the given sizes."""
    state = model.new_state(ids.shape[0])
    logits, start = [], 0
    with torch.no_grad():
        for size in chunks:
            logits.append(model(ids[:, start : start + size], state=state).logits)
            start += size
    assert start == ids.shape[1] == state.position
    return torch.cat(logits, dim=1)


# -- incremental decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[5] + [1] * 19, [4, 2, 3, 1, 3, 2, 3, 2]], ids=["one_by_one", "chunks"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_logits_equal_the_full_forward(name, chunks, indexer):
    model = _model(VARIANTS[name], indexer)
    ids = _ids(2, sum(chunks))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(_decode(model, ids, chunks), full, rtol=0, atol=1e-10)


def test_the_convolution_state_matters(indexer):
    """Without its convolution state, decoding differs: the test above checks the state, not a no-op."""
    model = _model(VARIANTS["engram_moe"], indexer)
    ids = _ids(2, 16)
    state = model.new_state(2)
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :12], state=state)
        for block in state.blocks:
            block.conv = None if block.conv is None else torch.zeros_like(block.conv)
        last = model(ids[:, 12:], state=state).logits
    assert not torch.allclose(last, full[:, 12:], rtol=0, atol=1e-6)


def test_engram_step_and_short_conv_step_equal_their_forward():
    config = EngramConfig(
        layer_ids=[2], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, engram_vocab_size=[31, 37]
    )
    torch.manual_seed(0)
    layer = Engram(dataclasses.replace(config, conv_zero_init=False), layer_id=2, hidden_size=6, n_branches=2)
    layer = layer.double()
    hasher = NgramHasher([2], 3, 2, [31, 37], 90, pad_id=0)
    canonical = torch.randint(0, 90, (3, 14))
    hidden = torch.randn(3, 14, 2, 6, dtype=torch.float64)
    full = layer(hidden, hash_ids=hasher.hash(canonical, 2))
    parts, conv_state, history = [], None, hasher.initial_history(3)
    for start, end in [(0, 3), (3, 4), (4, 11), (11, 14)]:
        hash_ids, history = hasher.hash_incremental(canonical[:, start:end], history, 2)
        update, conv_state = layer.step(hidden[:, start:end], hash_ids, conv_state)
        parts.append(update)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)
    assert conv_state.shape == (3, 2 * 6, (4 - 1) * 3)
    with pytest.raises(ValueError, match=r"conv state must have shape \(3, 12, 9\)"):
        layer.short_conv.step(hidden[:, :1], torch.zeros(3, 12, 8, dtype=torch.float64))


def test_indexer_hash_step_equals_indexing_the_whole_sequence(indexer):
    ids = _ids(2, 11)
    whole = indexer(ids)
    first, history = indexer.hash_step(ids[:, :4])
    second, _ = indexer.hash_step(ids[:, 4:], history)
    for layer in ENGRAM_CONV.layer_ids:
        assert torch.equal(torch.cat([first[layer], second[layer]], dim=1), whole[layer])


def test_attention_with_a_cache_equals_attention_over_the_whole_sequence():
    torch.manual_seed(0)
    attn = CausalSelfAttention(8, 2, Rotary(4, 16, 10_000.0)).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    cache = KVCache(capacity=10)
    parts = [attn(x[:, a:b], cache) for a, b in [(0, 4), (4, 5), (5, 8), (8, 10)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), attn(x), rtol=0, atol=1e-12)
    assert cache.keys.shape == (2, 2, 10, 4) and cache.length == 10
    with pytest.raises(ValueError, match="holds 10 positions; 10 are used and 1 more do not fit"):
        attn(x[:, :1], cache)


def test_decoding_state_errors(indexer):
    model = _model(VARIANTS["engram_moe"], indexer)
    state = model.new_state(2, capacity=6)
    with pytest.raises(ValueError, match="cannot continue a decoding state of 2 sequences"):
        model(_ids(1, 3), state=state)
    with pytest.raises(ValueError, match="pass no hash_ids"):
        model(_ids(2, 3), state=state, hash_ids=indexer(_ids(2, 3)))
    with pytest.raises(ValueError, match="holds 6 positions: 0 are used, 7 more do not fit"):
        model(_ids(2, 7), state=state)
    assert state.position == 0 and state.history is None  # refused calls change nothing
    with pytest.raises(ValueError, match="capacity <= max_seq_len=64"):
        model.new_state(1, capacity=65)
    bare = _model(VARIANTS["engram_moe"], indexer)
    bare.indexer = None
    with pytest.raises(ValueError, match="needs its indexer"):
        bare(_ids(1, 3), state=bare.new_state(1))


# -- generation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_is_the_argmax_of_the_full_forward(name, indexer):
    model = _model(VARIANTS[name], indexer)
    prompt = _ids(2, 5)
    out = generate(model, prompt, max_new_tokens=10, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 15):
            assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1)), t


def test_trimmed_vocabulary_generates_kept_tokenizer_ids_only(indexer):
    config = dataclasses.replace(VARIANTS["engram_moe"], vocab_size=len(KEPT) + 1, input_vocab_size=1024)
    model = _model(config, indexer)
    with pytest.raises(ValueError, match=r"call model\.set_vocabulary"):
        generate(model, torch.tensor([[5]]), 3)
    with pytest.raises(ValueError, match="nothing to generate"):
        generate(EngramLM(dataclasses.replace(config, vocab_size=1), indexer=indexer), torch.tensor([[5]]), 3)
    model.set_vocabulary(torch.tensor(KEPT))
    with torch.no_grad():  # make the unknown id (model id 0) the most likely token at many positions
        model.head.weight[0].normal_(std=2.0)
    prompt = torch.tensor([[5, 42, 17], [1000, 3, 7]])  # 42 and 7 are outside the kept ids
    greedy = generate(model, prompt, max_new_tokens=12, temperature=0)
    sampled = generate(model, prompt, max_new_tokens=12, seed=0)
    for out in (greedy, sampled):
        assert set(out[:, 3:].flatten().tolist()) <= set(KEPT)
    # Greedy decoding fed back tokenizer ids: it is the argmax over the kept ids of a full forward.
    unknown_wins = 0
    with torch.no_grad():
        for t in range(3, 15):
            logits = model(greedy[:, :t]).logits[:, -1]
            unknown_wins += int((logits.argmax(-1) == 0).sum())
            logits[:, 0] = -math.inf
            assert torch.equal(greedy[:, t], model.to_tokenizer_ids(logits.argmax(-1))), t
    assert unknown_wins > 0  # the mask was needed


def test_seeded_sampling_is_reproducible_and_the_filters_narrow_it(indexer):
    model = _model(VARIANTS["engram_moe_4_branches"], indexer)
    prompt = _ids(2, 4)

    def sample(seed, **kwargs):
        return generate(model, prompt, max_new_tokens=12, seed=seed, **kwargs)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(3, temperature=0.7, top_k=5, top_p=0.9), sample(3, temperature=0.7, top_k=5, top_p=0.9))
    greedy = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(sample(0, top_k=1), greedy)
    assert torch.equal(sample(0, top_p=1e-9), greedy)  # the nucleus keeps the most likely token


def test_eos_ends_sequences_and_pads_them(indexer):
    model = _model(VARIANTS["engram_moe"], indexer)
    prompt = _ids(2, 4)
    free = generate(model, prompt, max_new_tokens=10, temperature=0)
    eos = int(free[0, 6])  # the third new token of the first sequence
    out = generate(model, prompt, max_new_tokens=10, temperature=0, eos_id=eos)
    expected = free.clone()
    for row in expected:
        hits = (row[4:] == eos).nonzero()
        if len(hits):
            row[4 + int(hits[0]) :] = eos
    assert torch.equal(out, expected)
    # Once every sequence has ended, decoding stops: only the prefill ran.
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    out = generate(model, prompt[:1], max_new_tokens=10, temperature=0, eos_id=int(free[0, 4]))
    handle.remove()
    assert len(calls) == 1 and out[0, 4:].tolist() == [int(free[0, 4])] * 10


def test_generation_restores_training_mode_and_leaves_moe_loads_alone(indexer):
    model = _model(VARIANTS["engram_moe"], indexer).train()
    out = generate(model, _ids(1, 3), max_new_tokens=4, seed=0)
    assert out.shape == (1, 7) and model.training
    assert all(not moe.load.any() for moe in model.moe_layers())
    assert torch.equal(generate(model, _ids(1, 3), max_new_tokens=0), _ids(1, 3))


def test_generate_refuses_bad_arguments(indexer):
    model = _model(VARIANTS["dense"], indexer)
    prompt = _ids(1, 4)
    bad = [
        (dict(max_new_tokens=61), "exceeds max_seq_len=64"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2, temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=2, temperature=math.nan), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=2, top_k=0), "top_k must be None or an integer >= 1"),
        (dict(max_new_tokens=2, top_k=2.5), "top_k must be None or an integer >= 1"),
        (dict(max_new_tokens=2, top_p=0.0), r"top_p must be None or a number in \(0, 1\]"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p must be None or a number in \(0, 1\]"),
        (dict(max_new_tokens=2, eos_id=1024), r"eos_id must be None or a tokenizer id in \[0, 1024\)"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            generate(model, prompt, **kwargs)
    with pytest.raises(ValueError, match="prompt_ids must have 2 dimensions"):
        generate(model, prompt[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, prompt[:, :0], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_ids contains id 1024"):
        generate(model, torch.tensor([[1024]]), max_new_tokens=2)
    assert generate(model, prompt, max_new_tokens=60, temperature=0).shape == (1, 64)  # exactly max_seq_len
