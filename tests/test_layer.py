"""The Engram layer against a float64 transcription of docs/definition.md ("The layer"); gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from engram import DeviceTable, Engram, EngramConfig, EngramIndexer, NgramHasher

SMALL = dict(layer_ids=[1, 4], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, engram_vocab_size=[31, 37])


def _layer(n_branches: int, hidden: int = 6, **overrides) -> Engram:
    torch.manual_seed(0)
    config = EngramConfig(**{**SMALL, "conv_zero_init": False, **overrides})
    layer = Engram(config, layer_id=4, hidden_size=hidden, n_branches=n_branches).double()
    with torch.no_grad():  # move every parameter away from its init so each term matters
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _hash_ids(layer: Engram, batch: int, length: int) -> torch.Tensor:
    hasher = NgramHasher(layer.config.layer_ids, 3, 2, layer.config.engram_vocab_size, 90, pad_id=0)
    return hasher.hash(torch.randint(0, 90, (batch, length)), layer.layer_id)


def _rms(x: list[float], weight: list[float], eps: float) -> list[float]:
    scale = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    return [v * scale * w for v, w in zip(x, weight, strict=True)]


def _reference(layer: Engram, hidden: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
    """Loops over batch, position, branch and channel; nothing vectorised, nothing shared."""
    cfg, d, m_count = layer.config, layer.hidden_size, layer.n_branches
    table = layer.table.weight.tolist()
    wv, bv = layer.value_proj.weight.tolist(), layer.value_proj.bias.tolist()
    wk, bk = layer.key_proj.weight.tolist(), layer.key_proj.bias.tolist()
    qn, kn = layer.query_norm.weight.tolist(), layer.key_norm.weight.tolist()
    cn, conv = layer.short_conv.norm.weight.tolist(), layer.short_conv.conv.weight[:, 0, :].tolist()
    eps_gate = torch.finfo(torch.float64).eps if cfg.gate_norm_eps is None else cfg.gate_norm_eps
    batch, length = hash_ids.shape[:2]
    gated = [[[None] * m_count for _ in range(length)] for _ in range(batch)]
    for b in range(batch):
        for t in range(length):
            e = []
            offset = 0
            for head, size in enumerate(layer.head_sizes):
                e += table[offset + int(hash_ids[b, t, head])]
                offset += size
            v = [sum(w * x for w, x in zip(wv[i], e, strict=True)) + bv[i] for i in range(d)]
            for m in range(m_count):
                k = [sum(w * x for w, x in zip(wk[m * d + i], e, strict=True)) + bk[m * d + i] for i in range(d)]
                s = sum(
                    a * c
                    for a, c in zip(
                        _rms(k, kn[m], eps_gate), _rms(hidden[b, t, m].tolist(), qn[m], eps_gate), strict=True
                    )
                )
                s /= math.sqrt(d)
                if cfg.gate_activation == "signed_sqrt":
                    s = math.copysign(math.sqrt(max(abs(s), 1e-6)), s) if s != 0 else 0.0
                alpha = 1.0 / (1.0 + math.exp(-s))
                gated[b][t][m] = [alpha * x for x in v]
    out = torch.zeros(batch, length, m_count, d, dtype=torch.float64)
    taps, dilation = cfg.kernel_size, cfg.max_ngram_size
    for b in range(batch):
        normed = [[_rms(gated[b][t][m], cn[m], cfg.conv_norm_eps) for m in range(m_count)] for t in range(length)]
        for t in range(length):
            for m in range(m_count):
                for i in range(d):
                    c = m * d + i
                    # PyTorch's tap j reads lag (taps-1-j)*dilation; lags before the start read zero.
                    acc = sum(
                        conv[c][j] * normed[t - lag][m][i]
                        for j in range(taps)
                        if (lag := (taps - 1 - j) * dilation) <= t
                    )
                    out[b, t, m, i] = gated[b][t][m][i] + acc / (1.0 + math.exp(-acc))
    return out


@pytest.mark.parametrize(("branches", "gate"), [(1, "signed_sqrt"), (4, "signed_sqrt"), (2, "plain")])
def test_forward_equals_direct_transcription(branches, gate):
    layer = _layer(branches, gate_activation=gate)
    hash_ids = _hash_ids(layer, batch=2, length=11)  # 11 > (kernel-1)*dilation = 9: every tap used
    hidden = torch.randn(2, 11, branches, layer.hidden_size, dtype=torch.float64)
    got = layer(hidden, hash_ids=hash_ids)
    torch.testing.assert_close(got, _reference(layer, hidden, hash_ids), rtol=1e-12, atol=1e-12)


def test_three_dimensional_hidden_states_for_a_single_branch():
    layer = _layer(1)
    hash_ids = _hash_ids(layer, 2, 5)
    hidden = torch.randn(2, 5, layer.hidden_size, dtype=torch.float64)
    out = layer(hidden, hash_ids=hash_ids)
    assert out.shape == hidden.shape
    torch.testing.assert_close(out, layer(hidden.unsqueeze(2), hash_ids=hash_ids).squeeze(2), rtol=0, atol=0)


def test_zero_initialised_conv_makes_the_output_the_gated_value():
    torch.manual_seed(1)
    layer = Engram(EngramConfig(**SMALL), layer_id=1, hidden_size=6, n_branches=2).double()
    assert not layer.short_conv.conv.weight.any()
    hash_ids = _hash_ids(layer, 1, 7)
    hidden = torch.randn(1, 7, 2, 6, dtype=torch.float64)
    memory = layer.table.weight[hash_ids + layer.offsets].flatten(-2)
    value = layer.value_proj(memory)
    out = layer(hidden, hash_ids=hash_ids)
    # Y = alpha * v, with 0 < alpha < 1 per branch: the ratio is constant across channels.
    ratio = out / value.unsqueeze(2)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-10, atol=0)
    assert bool(((ratio > 0) & (ratio < 1)).all())


def test_output_is_causal():
    layer = _layer(2)
    hash_ids = _hash_ids(layer, 1, 12)
    hidden = torch.randn(1, 12, 2, layer.hidden_size, dtype=torch.float64)
    base = layer(hidden, hash_ids=hash_ids)
    changed_hidden, changed_ids = hidden.clone(), hash_ids.clone()
    changed_hidden[:, 8:] += 1.0
    changed_ids[:, 8:] = (changed_ids[:, 8:] + 1) % torch.tensor(layer.head_sizes)
    out = layer(changed_hidden, hash_ids=changed_ids)
    torch.testing.assert_close(out[:, :8], base[:, :8], rtol=0, atol=0)
    assert not torch.allclose(out[:, 8:], base[:, 8:])


def test_raw_ids_and_precomputed_hashes_agree(deepseek):
    config = EngramConfig(**SMALL)
    indexer = EngramIndexer(config, deepseek)
    torch.manual_seed(0)
    layer = Engram(config, layer_id=1, hidden_size=6, indexer=indexer)
    raw = torch.tensor([deepseek.encode("Only Alexander the Great could tame the horse Bucephalus.")])
    hidden = torch.randn(1, raw.shape[1], 6)
    from_raw = layer(hidden, input_ids=raw)
    assert torch.equal(from_raw, layer(hidden, hash_ids=indexer(raw)[1]))


def test_gradients_reach_table_rows_projections_norms_and_conv():
    torch.manual_seed(0)
    layer = Engram(EngramConfig(**SMALL), layer_id=1, hidden_size=6, n_branches=2)  # conv zero-initialised
    hash_ids = _hash_ids(layer, 2, 9)
    hidden = torch.randn(2, 9, 2, 6, requires_grad=True)
    (layer(hidden, hash_ids=hash_ids) ** 2).sum().backward()
    # With the conv at zero, the norm in front of it cannot matter yet; everything else learns,
    # the conv weight included (SiLU'(0) = 1/2).
    for name, param in layer.named_parameters():
        assert (param.grad.abs().sum() > 0) == (name != "short_conv.norm.weight"), name
    assert hidden.grad.abs().sum() > 0
    with torch.no_grad():
        for param in layer.parameters():
            param -= 0.1 * param.grad
    layer.zero_grad()
    (layer(hidden, hash_ids=hash_ids) ** 2).sum().backward()
    assert all(param.grad.abs().sum() > 0 for param in layer.parameters())
    touched = torch.zeros(layer.table.num_rows, dtype=torch.bool)
    touched[(hash_ids + layer.offsets).flatten()] = True
    row_has_grad = layer.table.weight.grad.abs().sum(1) > 0
    assert torch.equal(row_has_grad, touched)  # exactly the looked-up rows


def test_sparse_table_gradient_holds_only_looked_up_rows():
    config = EngramConfig(**SMALL)
    torch.manual_seed(0)
    dense = Engram(config, layer_id=1, hidden_size=6)
    sparse_table = DeviceTable(dense.table.num_rows, dense.table.dim, sparse_grad=True)
    sparse = Engram(config, layer_id=1, hidden_size=6, storage=sparse_table)
    sparse.load_state_dict(dense.state_dict())
    hash_ids = _hash_ids(dense, 2, 9)
    hidden = torch.randn(2, 9, 6)
    for layer in (dense, sparse):
        layer(hidden, hash_ids=hash_ids).square().sum().backward()
    grad = sparse.table.weight.grad
    assert grad.is_sparse
    assert torch.equal(grad.coalesce().indices()[0].unique(), (hash_ids + dense.offsets).flatten().unique())
    torch.testing.assert_close(grad.to_dense(), dense.table.weight.grad)


# -- errors ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused():
    layer = _layer(2)
    ids = _hash_ids(layer, 1, 4)
    good = torch.randn(1, 4, 2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(B, T, 2, 6\)"):
        layer(torch.randn(1, 4, 6, dtype=torch.float64), hash_ids=ids)
    with pytest.raises(ValueError, match=r"hidden_states must have shape"):
        layer(torch.randn(1, 4, 2, 5, dtype=torch.float64), hash_ids=ids)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 4, 2, 6, dtype=torch.long), hash_ids=ids)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        layer(good)
    with pytest.raises(ValueError, match="needs an EngramIndexer"):
        layer(good, input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hash_ids must have shape \(B, T, H\) = \(1, 4, 4\)"):
        layer(good, hash_ids=ids[..., :3])
    bad = ids.clone()
    bad[0, 2, 3] = layer.head_sizes[3]
    with pytest.raises(ValueError, match=rf"hash_ids\[0, 2, 3\] = {layer.head_sizes[3]} is outside head 3"):
        layer(good, hash_ids=bad)
    with pytest.raises(TypeError, match="integer ids"):
        layer(good, hash_ids=ids.double())


def test_bad_construction_is_refused():
    config = EngramConfig(**SMALL)
    with pytest.raises(ValueError, match=r"layer_id 2 is not in config\.layer_ids"):
        Engram(config, layer_id=2, hidden_size=6)
    with pytest.raises(ValueError, match="storage has shape"):
        Engram(config, layer_id=1, hidden_size=6, storage=DeviceTable(10, 4))
    with pytest.raises(ValueError, match="must be a positive multiple of n_head_per_ngram"):
        EngramConfig(**{**SMALL, "n_embed_per_ngram": 7})
