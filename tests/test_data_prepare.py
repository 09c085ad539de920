"""Preparing a dataset (tsvd/data/prepare.py): prepare → load round trip, document-level split on disk,
the tokenizer trained on training documents only, reuse / refusal, atomic writes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from data_common import cfg_for, corpus, decoded_docs, expected_texts  # noqa: F401  (fixtures)

import tsvd.data.prepare as prepare
from tsvd import UserError
from tsvd.config import DataConfig
from tsvd.data import load_data, prepare_data, unigram_loss
from tsvd.tokenizer import EOT


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_load_round_trip(tmp_path, corpus, tokenizer):  # noqa: F811
    meta = prepare_data(cfg_for(tmp_path, corpus, tokenizer=tokenizer, vocab_size=300), progress=False)
    ds = load_data(tmp_path / "ds")
    assert ds.meta == meta and meta.tokenizer == tokenizer
    assert ds.train.dtype == np.uint16 and len(ds.train) == meta.train_tokens and len(ds.val) == meta.val_tokens
    assert meta.train_docs + meta.val_docs == 6 and meta.val_docs >= 1
    texts = decoded_docs(ds)
    assert sorted(texts) == sorted(expected_texts())
    assert int(max(ds.train.max(), ds.val.max())) < meta.vocab_size
    if tokenizer == "byte":
        assert meta.train_tokens + meta.val_tokens == meta.corpus_bytes + 6  # one token per byte + one eot per doc
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(
        ["meta.json", "train.bin", "val.bin", "tokenizer.json" if tokenizer == "bpe" else "byte_tokenizer.json"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_prepare_stdlib_with_byte_cap(tmp_path):
    cfg = DataConfig(dir=str(tmp_path / "ds"), corpus=["stdlib"], tokenizer="byte", max_bytes=300_000)
    meta = prepare_data(cfg, progress=False)
    docs = meta.train_docs + meta.val_docs
    assert meta.corpus_bytes == 300_000 and meta.train_tokens + meta.val_tokens == 300_000 + docs
    assert meta.val_docs >= 1 and "Python" in meta.sources[0]
    ds = load_data(tmp_path / "ds")
    assert unigram_loss(ds.train, ds.val, meta.vocab_size) < math.log(meta.vocab_size) - 1.0  # text is not uniform


def test_test_split_written_and_loaded(tmp_path):
    docs = tmp_path / "many"
    docs.mkdir()
    for i in range(300):
        (docs / f"doc{i:03d}.txt").write_text(f"document number {i}: " + "lorem ipsum dolor " * (1 + i % 7))
    cfg = DataConfig(dir=str(tmp_path / "ds"), corpus=[str(docs)], tokenizer="byte", val_fraction=0.1,
                     test_fraction=0.1)
    meta = prepare_data(cfg, progress=False)
    ds = load_data(tmp_path / "ds")
    assert ds.test is not None and len(ds.test) == meta.test_tokens
    assert meta.val_docs >= 50 and meta.test_docs >= 50 and meta.train_docs == 300 - meta.val_docs - meta.test_docs
    total = meta.train_tokens + meta.val_tokens + meta.test_tokens
    assert meta.val_tokens >= 0.1 * total and meta.test_tokens >= 0.1 * total
    texts = {name: set(ds.tokenizer.decode(getattr(ds, name).tolist()).split(EOT)[:-1]) for name in ("train", "val", "test")}
    assert sum(map(len, texts.values())) == 300  # every document once, on one side
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"]) and not (texts["val"] & texts["test"])
    # without a test split: no test.bin, Dataset.test is None, and val is the same documents
    plain = prepare_data(DataConfig(dir=str(tmp_path / "plain"), corpus=[str(docs)], tokenizer="byte",
                                    val_fraction=0.1), progress=False)
    ds2 = load_data(tmp_path / "plain")
    assert ds2.test is None and not (tmp_path / "plain" / "test.bin").exists() and plain.test_docs == 0
    assert np.array_equal(np.asarray(ds2.val), np.asarray(ds.val))


def test_bpe_tokenizer_never_sees_held_out_documents(tmp_path, monkeypatch):
    docs = tmp_path / "many"
    docs.mkdir()
    for i in range(80):
        (docs / f"doc{i:03d}.txt").write_text(f"text {i} " * (5 + i))
    seen = []
    real = prepare.BPETokenizer.train

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen.append(set(texts))
        return real(iter(texts), *args, **kwargs)

    monkeypatch.setattr(prepare.BPETokenizer, "train", staticmethod(spy))
    prepare_data(DataConfig(dir=str(tmp_path / "ds"), corpus=[str(docs)], tokenizer="bpe", vocab_size=300,
                            val_fraction=0.2), progress=False)
    ds = load_data(tmp_path / "ds")
    held_out = set(ds.tokenizer.decode(ds.val.tolist()).split(EOT)[:-1])
    assert held_out and seen and not (held_out & seen[-1])


def test_prepare_reuses_matching_and_refuses_different(tmp_path, corpus):  # noqa: F811
    cfg = cfg_for(tmp_path, corpus)
    meta = prepare_data(cfg, progress=False)
    mtime = (tmp_path / "ds" / "train.bin").stat().st_mtime_ns
    assert prepare_data(cfg, progress=False) == meta
    assert (tmp_path / "ds" / "train.bin").stat().st_mtime_ns == mtime  # not rewritten
    other = cfg_for(tmp_path, corpus, max_bytes=2000)
    with pytest.raises(UserError, match="data.dir: .* different dataset"):
        prepare_data(other, progress=False)
    assert load_data(tmp_path / "ds").meta == meta  # untouched
    new = prepare_data(other, progress=False, overwrite=True)
    assert new.corpus_bytes == 2000 and load_data(tmp_path / "ds").meta == new


def test_prepare_refuses_a_folder_of_other_files(tmp_path, corpus):  # noqa: F811
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a tsvd dataset"):
        prepare_data(cfg_for(tmp_path, corpus), progress=False)


def test_interrupted_prepare_leaves_no_dataset(tmp_path, corpus, monkeypatch):  # noqa: F811
    cfg = cfg_for(tmp_path, corpus)
    meta = prepare_data(cfg, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg_for(tmp_path, corpus, dir=str(tmp_path / "new")), progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds"]  # no "new", no temp folders
    assert load_data(tmp_path / "ds").meta == meta  # the old dataset survived


def test_a_bad_corpus_writes_nothing(tmp_path):
    with pytest.raises(UserError, match=r"data\.corpus.*does not exist"):
        prepare_data(cfg_for(tmp_path, tmp_path / "missing"), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match=r"data\.corpus.*0 usable"):
        prepare_data(cfg_for(tmp_path, tmp_path / "empty"), progress=False)
    assert not (tmp_path / "ds").exists()
