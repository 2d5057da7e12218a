"""Ids are checked once, at the boundary: a training step reads the host only where documented, compiles
without graph breaks, the debug flag brings the inner checks back, and bad ids still fail at the boundary.

docs/benchmarks.md ("Host reads and graph breaks of a training step") lists the reads that remain;
``tests/host_reads.py`` counts them (a read of a tensor's value, or an operator whose output shape
depends on values: each a device-to-host sync on a GPU).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch._dynamo

import engram
from engram import Engram, EngramConfig, EngramIndexer
from engram.data.batches import RandomWindows
from engram.inference import generate
from engram.model import EngramLM, ModelConfig, MoEConfig
from engram.training import TrainConfig, Trainer, seed_everything
from tests.corpus import sonnets_tokens
from tests.host_reads import HostReads, format_reads

ENGRAM = EngramConfig(
    layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=32, engram_vocab_size=[3001, 3001], pad_id=0
)
DENSE = ModelConfig(vocab_size=1024, d_model=32, n_layers=3, n_heads=2, ffn_hidden=64, max_seq_len=64, engram=ENGRAM)
MOE = dataclasses.replace(DENSE, moe=MoEConfig(n_routed_experts=4, top_k=2, expert_hidden=32), n_dense_layers=1)
TRAIN = TrainConfig(
    steps=10, batch_size=2, seq_len=16, warmup_steps=2, log_every=0, eval_every=0, checkpoint_every=0, device="cpu"
)

# The reads a device-tier training step still makes in the library's own code (docs/benchmarks.md):
# the trainer's one status read (loss, finite checks, stop request) and the coalesce of the table's
# sparse gradient (nnz is data-dependent), plus one read of the expert counts per MoE layer.
READS_OF_A_STEP = 2


@pytest.fixture(autouse=True)
def no_debug_checks():
    before = engram.debug_checks()
    engram.set_debug_checks(False)
    yield
    engram.set_debug_checks(before)


def _trainer(compressor, config: ModelConfig) -> Trainer:
    seed_everything(0)
    model = EngramLM(config, indexer=EngramIndexer(config.engram, compressor))
    return Trainer(model, TRAIN, sonnets_tokens()[0], out_dir=None, progress=False)


def _reads_of_a_step(trainer: Trainer) -> HostReads:
    trainer.train_step()  # the optimizers' state is allocated in the first step
    with HostReads() as seen:
        trainer.train_step()
    return seen


# -- the hot path -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_a_training_step_reads_the_host_only_where_documented(compressor, config):
    seen = _reads_of_a_step(_trainer(compressor, config))
    ours = seen.ours()
    report = "\n".join(format_reads(ours))
    n_moe = sum(1 for i in range(config.n_layers) if config.uses_moe(i))
    assert len(ours) <= READS_OF_A_STEP + n_moe, report
    # Nothing on the way from the ids to the table reads: model, indexer, compressor, hasher, layer.
    for path in ("engram/_checks.py", "engram/indexing/", "engram/memory/", "engram/model/lm.py"):
        assert not [r for r in ours if r.site.startswith(path)], report
    moe_reads = [r for r in ours if r.site.startswith("engram/model/moe.py")]
    assert len(moe_reads) == n_moe and all("(forward)" in r.site for r in moe_reads), report
    # Whatever torch reads itself is its optimizers' step counts, kept on the CPU (no device sync).
    assert all(r.torch_site.startswith("torch/optim/") for r in seen.reads if not r.ours), report


def test_debug_checks_add_the_inner_reads_back(compressor):
    trainer = _trainer(compressor, DENSE)
    plain = len(_reads_of_a_step(trainer).ours())
    engram.set_debug_checks(True)
    debug = _reads_of_a_step(trainer).ours()
    sites = {r.site.split(" ")[0].rsplit(":", 1)[0] for r in debug}
    assert {"engram/model/lm.py", "engram/indexing/compression.py", "engram/indexing/ngram.py"} <= sites
    assert "engram/memory/layer.py" in sites and len(debug) > plain


def test_generate_reads_the_host_once_for_the_prompt(compressor):
    model = _trainer(compressor, DENSE).model.eval()
    prompt = torch.tensor([[5, 17, 99], [3, 250, 640]])
    with HostReads() as seen:
        generate(model, prompt, max_new_tokens=6, seed=0)
    assert len(seen.ours()) == 1, "\n".join(format_reads(seen))  # prompt_ids' range, then nothing per token


# -- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("check_ids", [False, True])
def test_the_training_forward_compiles_without_graph_breaks(compressor, check_ids):
    """Dynamo finds breaks whatever the backend: ``explain`` with the eager one, as fast as it gets."""
    trainer = _trainer(compressor, DENSE)  # the trainer draws the table rows before any compiled step
    inputs, targets = trainer.batches.batch(0)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(trainer.model)(inputs, targets=targets, check_ids=check_ids)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_the_moe_compiles_without_graph_breaks_when_dynamo_captures_scalars(compressor):
    trainer = _trainer(compressor, MOE)
    inputs, targets = trainer.batches.batch(0)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            explained = torch._dynamo.explain(trainer.model)(inputs, targets=targets, check_ids=False)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


# -- the debug flag -----------------------------------------------------------------------------------------


def test_inner_components_trust_their_internal_callers_unless_debugging(compressor):
    """``check_ids=False`` (what the model passes inside) skips the value checks; the debug flag restores them."""
    indexer = EngramIndexer(ENGRAM, compressor)
    layer = Engram(ENGRAM, 1, 32, indexer=indexer)
    negative = torch.tensor([[3, -1, 7]])
    hash_ids = indexer(torch.tensor([[3, 5, 7]]))[1]
    beyond = hash_ids.clone()
    beyond[0, 1, 0] = layer.head_sizes[0]  # a row of head 1's table, not head 0's: no index error either
    hidden = torch.randn(1, 3, 32)

    indexer.hasher.hash(negative, 1, check_ids=False)  # unchecked: garbage in, garbage out
    indexer(negative, check_ids=False)
    layer(hidden, hash_ids=beyond, check_ids=False)

    engram.set_debug_checks(True)
    with pytest.raises(ValueError, match="compressed_ids contains id -1, outside the valid range"):
        indexer.hasher.hash(negative, 1, check_ids=False)
    with pytest.raises(ValueError, match="input_ids contains id -1, outside the valid range"):
        indexer(negative, check_ids=False)
    with pytest.raises(ValueError, match=rf"hash_ids\[0, 1, 0\] = {layer.head_sizes[0]} is outside head 0"):
        layer(hidden, hash_ids=beyond, check_ids=False)


def test_the_debug_flag_is_read_from_the_environment(monkeypatch):
    import importlib

    import engram._checks as checks

    try:
        for value, expected in (("1", True), ("0", False), ("", False)):
            monkeypatch.setenv("ENGRAM_DEBUG_CHECKS", value)
            assert importlib.reload(checks).debug_checks() is expected
    finally:
        monkeypatch.delenv("ENGRAM_DEBUG_CHECKS")
        importlib.reload(checks)


# -- the boundary ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.tensor([[1, 1024]]), ValueError, r"input_ids contains id 1024, outside the valid range \[0, 1024\)"),
        (torch.tensor([[1, -1]]), ValueError, r"input_ids contains id -1, outside the valid range \[0, 1024\)"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "input_ids must hold integer ids"),
        (torch.tensor([1, 2]), ValueError, "input_ids must have 2 dimensions"),
    ],
)
def test_the_model_still_refuses_bad_ids_at_its_boundary(compressor, ids, error, message):
    model = EngramLM(MOE, indexer=EngramIndexer(ENGRAM, compressor))
    with pytest.raises(error, match=message):
        model(ids)
    with pytest.raises(error, match=message.replace("input_ids", "prompt_ids")):
        generate(model, ids, max_new_tokens=1)


def test_the_model_reads_no_more_ids_than_its_tokenizer_has(compressor):
    """A vocabulary padded beyond the tokenizer's: the ids Engram cannot hash are refused at the boundary."""
    model = EngramLM(dataclasses.replace(DENSE, vocab_size=1100), indexer=EngramIndexer(ENGRAM, compressor))
    assert model.num_input_ids == 1024
    with pytest.raises(ValueError, match=r"input_ids contains id 1050, outside .* of the tokenizer's 1024 raw ids"):
        model(torch.tensor([[1, 1050]]))
    with pytest.raises(ValueError, match="contains id 1050"):  # one rule, whether Engram is switched on or off
        model(torch.tensor([[1, 1050]]), engram_enabled=False)
    out = generate(model, torch.tensor([[1, 2]]), max_new_tokens=20, seed=0)
    assert int(out.max()) < 1024  # never samples an id it could not feed back


def test_training_batches_are_checked_on_the_host(compressor):
    tokens = np.arange(200, dtype=np.int64) % 1024
    tokens[150] = 1024
    windows = RandomWindows(tokens, batch_size=4, seq_len=16, seed=0, vocab_size=1024)
    with pytest.raises(ValueError, match=r"the training tokens hold id 1024 at position 150, outside the valid range"):
        for step in range(50):
            windows.batch(step)
    model = EngramLM(DENSE, indexer=EngramIndexer(ENGRAM, compressor))
    trainer = Trainer(model, TRAIN, tokens, out_dir=None, progress=False)
    assert trainer.batches.vocab_size == model.num_input_ids == 1024
    with pytest.raises(ValueError, match="the training tokens hold id 1024"):
        for _ in range(50):
            trainer.train_step()
