"""Tokenizer compression on the real DeepSeek-V3 tokenizer and on small hand-made ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

import engram.indexing.compression as compression
from engram import CompressedTokenizer
from engram.indexing.compression import default_tokenizer_path
from tests.reference import reference_compression


def test_deepseek_v3_figures_match_the_paper(deepseek):
    """docs/definition.md ("Tokenizer compression"): 128,815 raw ids fold to 98,627 canonical ids, a 23.43% cut."""
    assert deepseek.raw_vocab_size == 128_815
    assert len(deepseek) == 98_627
    reduction = 100 * (1 - len(deepseek) / deepseek.raw_vocab_size)
    assert 23.43 <= reduction < 23.44  # 23.435%; the appendix's 23.43% truncates
    top = [(deepseek.canonical_key(c), len(raw)) for c, raw in deepseek.merge_groups(top=4)]
    assert top == [(" ", 163), ("a", 54), ("o", 40), ("e", 35)]


def test_deepseek_v3_table_equals_independent_reference(deepseek):
    """Every entry of the table against a unicodedata-based transcription of the definition."""
    tok = deepseek.tokenizer
    ids = range(deepseek.raw_vocab_size)
    decoded = tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
    raw = [tok.id_to_token(i) for i in ids]
    np.testing.assert_array_equal(deepseek.lookup_table, reference_compression(decoded, raw))
    # The partial-UTF-8 branch is exercised: such tokens keep their raw string as key.
    partial = [i for i, text in enumerate(decoded) if "\ufffd" in text]
    assert len(partial) > 100
    assert deepseek.canonical_key(int(deepseek.lookup_table[partial[0]])) == raw[partial[0]]


def test_transformers_tokenizer_gives_the_same_table(deepseek):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(default_tokenizer_path().parent))
    via_hf = CompressedTokenizer(hf, cache_dir=False)
    np.testing.assert_array_equal(via_hf.lookup_table, deepseek.lookup_table)


def _word_level(vocab: list[str]) -> Tokenizer:
    return Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=vocab[0]))


def test_small_tokenizer_folds_case_accents_width_and_whitespace(tmp_path):
    vocab = ["<pad>", "Hello", "hello", "HÉLLO", "ｈｅｌｌｏ", " ", "\n\n", "\t \r", "World", " world", "x"]
    ct = CompressedTokenizer(_word_level(vocab), cache_dir=False)
    #          <pad> Hello hello HÉLLO ｈｅｌｌｏ " " "\n\n" "\t \r" World " world" x
    expected = [0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4]
    assert ct.lookup_table.tolist() == expected
    assert len(ct) == 5 and ct.raw_vocab_size == len(vocab)
    assert [ct.canonical_key(i) for i in range(5)] == ["<pad>", "hello", " ", "world", "x"]
    # The same tokenizer from a file and from its folder.
    _word_level(vocab).save(str(tmp_path / "tokenizer.json"))
    assert CompressedTokenizer(tmp_path / "tokenizer.json", cache_dir=False).lookup_table.tolist() == expected
    assert CompressedTokenizer(str(tmp_path), cache_dir=False).lookup_table.tolist() == expected


def test_mapping_keeps_type_device_shape_and_passes_negatives(deepseek):
    ids = torch.tensor([[0, 1, 2, -1], [128_814, 5, -100, 7]])
    out = deepseek(ids)
    assert out.dtype == torch.int64 and out.shape == ids.shape
    expected = [[int(deepseek.lookup_table[i]) if i >= 0 else i for i in row] for row in ids.tolist()]
    assert out.tolist() == expected
    assert torch.equal(deepseek(ids.int()), out)
    as_numpy = deepseek(ids.numpy())
    assert isinstance(as_numpy, np.ndarray) and as_numpy.tolist() == expected
    assert deepseek([[0, 1, 2, -1]]).tolist() == [expected[0]]


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.tensor([[1, 128_815]]), ValueError, "id 128815, outside"),
        (torch.tensor([1.0]), TypeError, "integer ids"),
        (np.array([129_279]), ValueError, "id 129279"),
        (np.array([0.5]), TypeError, "integer ids"),
    ],
)
def test_bad_raw_ids_are_refused(deepseek, ids, error, message):
    with pytest.raises(error, match=message):
        deepseek(ids)


def test_bad_tokenizer_arguments_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        CompressedTokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON file"):
        CompressedTokenizer(tmp_path / "broken.json")
    with pytest.raises(TypeError, match="tokenizer must be"):
        CompressedTokenizer(42)


def test_cache_is_reused_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    vocab = ["<pad>", "A", "a", "b", " B"]
    first = CompressedTokenizer(_word_level(vocab), cache_dir=tmp_path)
    (cached,) = tmp_path.glob("compression-*.npy")
    assert first.fingerprint and cached.name.startswith(f"compression-{first.fingerprint[:24]}")

    def refuse_to_build(*args):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(compression, "_build_table", refuse_to_build)
    assert CompressedTokenizer(_word_level(vocab), cache_dir=tmp_path).lookup_table.tolist() == [
        0,
        1,
        1,
        2,
        2,
    ]
    monkeypatch.undo()

    np.save(cached, np.array([0, 5, 1, 2, 2], dtype=np.int64))  # not first-seen numbering
    with pytest.warns(UserWarning, match="damaged compression cache"):
        rebuilt = CompressedTokenizer(_word_level(vocab), cache_dir=tmp_path)
    assert rebuilt.lookup_table.tolist() == [0, 1, 1, 2, 2]
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged compression cache"):
        assert CompressedTokenizer(_word_level(vocab), cache_dir=tmp_path).lookup_table.tolist() == [
            0,
            1,
            1,
            2,
            2,
        ]
    # A different tokenizer gets its own entry.
    CompressedTokenizer(_word_level([*vocab, "c"]), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("compression-*.npy"))) == 2


def test_from_table_maps_like_the_original_and_needs_no_tokenizer(compressor):
    """An exported model rebuilds its compressor from the saved table alone (engram.hf)."""
    rebuilt = CompressedTokenizer.from_table(torch.from_numpy(compressor.lookup_table), compressor.fingerprint)
    ids = torch.arange(compressor.raw_vocab_size).view(2, -1)
    assert torch.equal(rebuilt(ids), compressor(ids))
    assert (rebuilt.raw_vocab_size, len(rebuilt), rebuilt.fingerprint) == (
        compressor.raw_vocab_size,
        len(compressor),
        compressor.fingerprint,
    )
    with pytest.raises(RuntimeError, match="from its lookup table alone"):
        rebuilt.encode("Shall I compare thee")
    with pytest.raises(ValueError, match="first appearance"):
        CompressedTokenizer.from_table(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="1-D integer"):
        CompressedTokenizer.from_table(np.zeros((2, 2), dtype=np.int64))
