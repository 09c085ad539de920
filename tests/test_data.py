"""Data pipeline: corpus reading, prepare → load round trip, document-level split, reuse/refusal,
atomic writes, shard validation, sampler determinism/resume, evaluation windows, unigram baseline."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

import tsvd.data as data
from tsvd import UserError
from tsvd.config import DataConfig
from tsvd.data import (BatchSampler, Document, load_data, prepare_data, read_corpus, split_order, split_sizes,
                       unigram_loss, val_batches)
from tsvd.tokenizer import EOT

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 30,
    "b.md": "# Überschrift\n\nGrüße — naïve café, 日本語, emoji 🎉.\n" * 20,
    "sub/c.py": "def square(x: int) -> int:\n    return x * x\n" * 25,
    "sub/deeper/d.rst": "Title\n=====\n\nSome *reST* text with ``code``.\n" * 20,
    "e.pod": "=head1 NAME\n\nperlfoo - a pod page\n" * 20,
}


@pytest.fixture()
def corpus(tmp_path):
    """A folder with the accepted documents of ``DOCS`` plus files that must be skipped."""
    root = tmp_path / "corpus"
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "f.txt.gz").write_bytes(gzip.compress(b"compressed prose, decompressed on read.\n" * 10))
    (root / "dup.txt").write_text(DOCS["a.txt"])  # exact duplicate: skipped
    (root / "binary.txt").write_bytes(b"\x00\x01\x02 not text")  # NUL bytes: skipped
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # invalid UTF-8: skipped
    (root / "page.html").write_text("<p>not an accepted suffix</p>")
    (root / ".hidden.txt").write_text("hidden files are ignored")
    return root


def expected_texts() -> set[str]:
    return set(DOCS.values()) | {"compressed prose, decompressed on read.\n" * 10}


def cfg_for(tmp_path, corpus, **kw) -> DataConfig:
    base = dict(dir=str(tmp_path / "ds"), corpus=[str(corpus)], tokenizer="byte", val_fraction=0.3)
    base.update(kw)
    return DataConfig(**base)


def decoded_docs(ds) -> list[str]:
    """Every document of both shards, via the tokenizer (each document ends with end-of-text)."""
    out = []
    for shard in (ds.train, ds.val):
        text = ds.tokenizer.decode(shard.tolist())
        assert text.endswith(EOT)
        out += text.split(EOT)[:-1]
    return out


def test_read_corpus_accepts_and_skips(corpus):
    docs, stats = read_corpus(DataConfig(corpus=[str(corpus)]))
    assert {d.text for d in docs} == expected_texts()
    assert [d.name for d in docs] == sorted(d.name for d in docs) and docs[0].name.startswith("corpus/")
    assert (stats.skipped, stats.duplicates) == (2, 1)
    assert stats.bytes == sum(len(t.encode()) for t in expected_texts())


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_load_round_trip(tmp_path, corpus, tokenizer):
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


def test_stdlib_corpus_with_byte_cap(tmp_path):
    cfg = DataConfig(dir=str(tmp_path / "ds"), corpus=["stdlib"], tokenizer="byte", max_bytes=300_000)
    docs, stats = read_corpus(cfg)
    assert stats.bytes == 300_000 and all(d.name.startswith("stdlib/") and d.name.endswith(".py") for d in docs)
    assert not any(part in data.STDLIB_SKIP_DIRS for d in docs for part in d.name.split("/"))
    meta = prepare_data(cfg, progress=False)
    assert meta.corpus_bytes == 300_000 and meta.train_tokens + meta.val_tokens == 300_000 + len(docs)
    assert meta.val_docs >= 1 and "Python" in meta.sources[0]
    ds = load_data(tmp_path / "ds")
    assert unigram_loss(ds.train, ds.val, meta.vocab_size) < math.log(meta.vocab_size) - 1.0  # text is not uniform


def test_split_by_tokens_with_a_document_floor():
    rng = np.random.default_rng(0)
    docs = [Document(f"d/{i:04d}.txt", "") for i in range(2000)]
    sizes = [int(x) for x in rng.lognormal(6, 1.5, size=2000)]  # heavy-tailed: a few documents hold much
    order = split_order(docs)
    assert order == split_order(docs) and sorted(order) == list(range(2000))
    side = split_sizes(sizes, order, [0.1, 0.05])
    assert side == split_sizes(sizes, order, [0.1, 0.05])  # reproducible
    total = sum(sizes)
    held = {k: sum(n for n, s in zip(sizes, side) if s == k) for k in range(3)}
    assert held[1] >= 0.1 * total and held[2] >= 0.05 * total  # at least the share of the tokens ...
    assert side.count(1) >= data.MIN_HELDOUT_DOCS and side.count(2) >= data.MIN_HELDOUT_DOCS  # ... and ≥ 50 docs
    # drawn across the corpus (hash order), not a block of neighbouring names
    val_idx = [i for i, s in enumerate(side) if s == 1]
    assert min(val_idx) < 200 and max(val_idx) > 1800
    # minimal: dropping the last document drawn for val would miss a requirement
    last = [i for i in order if side[i] == 1][-1]
    assert held[1] - sizes[last] < 0.1 * total or side.count(1) - 1 < data.MIN_HELDOUT_DOCS
    # val is the same with or without a test split
    assert [s == 1 for s in split_sizes(sizes, order, [0.1, 0.0])] == [s == 1 for s in side]


def test_split_document_floor_on_a_small_corpus():
    order = list(range(20))
    # 20 equal documents, val 2%: the floor wants 50 documents but stops at half the tokens
    side = split_sizes([10] * 20, order, [0.02, 0.0])
    assert side.count(1) == 10 and side.count(0) == 10
    side = split_sizes([10] * 20, order, [0.02, 0.02])  # with a test split: a quarter each
    assert side.count(1) == 5 and side.count(2) == 5 and side.count(0) == 10
    # one huge training document: val gets all but one document (the floor), train keeps one
    side = split_sizes([1000] + [1] * 9, list(range(1, 10)) + [0], [0.02, 0.0])
    assert side.count(1) == 9 and side[0] == 0
    # two documents: one each side, whatever the fraction; with a test split one each of three
    for frac in (0.001, 0.999):
        assert sorted(split_sizes([5, 5], [0, 1], [frac, 0.0])) == [0, 1]
    assert sorted(split_sizes([5, 5, 5], [2, 0, 1], [0.5, 0.5])) == [0, 1, 2]


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
    real = data.BPETokenizer.train

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen.append(set(texts))
        return real(iter(texts), *args, **kwargs)

    monkeypatch.setattr(data.BPETokenizer, "train", staticmethod(spy))
    prepare_data(DataConfig(dir=str(tmp_path / "ds"), corpus=[str(docs)], tokenizer="bpe", vocab_size=300,
                            val_fraction=0.2), progress=False)
    ds = load_data(tmp_path / "ds")
    held_out = set(ds.tokenizer.decode(ds.val.tolist()).split(EOT)[:-1])
    assert held_out and seen and not (held_out & seen[-1])


def test_prepare_reuses_matching_and_refuses_different(tmp_path, corpus):
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


def test_prepare_refuses_a_folder_of_other_files(tmp_path, corpus):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a tsvd dataset"):
        prepare_data(cfg_for(tmp_path, corpus), progress=False)


def test_interrupted_prepare_leaves_no_dataset(tmp_path, corpus, monkeypatch):
    cfg = cfg_for(tmp_path, corpus)
    meta = prepare_data(cfg, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg_for(tmp_path, corpus, dir=str(tmp_path / "new")), progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds"]  # no "new", no temp folders
    assert load_data(tmp_path / "ds").meta == meta  # the old dataset survived


def test_corrupted_shards_are_detected(tmp_path, corpus):
    prepare_data(cfg_for(tmp_path, corpus), progress=False)
    shard = tmp_path / "ds" / "train.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-1])  # not a multiple of the dtype size
    with pytest.raises(UserError, match="corrupted"):
        load_data(tmp_path / "ds")
    shard.write_bytes(good + b"\0\0")  # one token too many
    with pytest.raises(UserError, match="corrupted"):
        load_data(tmp_path / "ds")
    shard.write_bytes(np.full(len(good) // 2, 999, dtype=np.uint16).tobytes())  # ids beyond the vocabulary
    with pytest.raises(UserError, match="vocab_size"):
        load_data(tmp_path / "ds")
    (tmp_path / "ds" / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match="unreadable"):
        load_data(tmp_path / "ds")


def test_missing_data_and_corpus_errors(tmp_path, corpus):
    with pytest.raises(UserError, match=r"data\.dir.*tsvd prepare"):
        load_data(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"data\.corpus.*does not exist"):
        prepare_data(cfg_for(tmp_path, tmp_path / "missing"), progress=False)
    with pytest.raises(UserError, match=r"data\.corpus"):
        prepare_data(DataConfig(dir=str(tmp_path / "ds"), corpus=[]), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match=r"data\.corpus.*0 usable"):
        prepare_data(cfg_for(tmp_path, tmp_path / "empty"), progress=False)
    assert not (tmp_path / "ds").exists()


def test_sampler_is_deterministic_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BatchSampler(tokens, 4, 16, seed=1), BatchSampler(tokens, 4, 16, seed=1)
    batches = [next(a) for _ in range(5)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one token (tokens[i] == i here)
        assert int(y.max()) < 1000
    for x, y in batches:
        x2, y2 = next(b)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    c = BatchSampler(tokens, 4, 16, seed=1)
    for _ in range(3):
        next(c)
    resumed = BatchSampler(tokens, 4, 16, seed=123)
    resumed.load_state_dict(c.state_dict())
    assert torch.equal(next(resumed)[0], batches[3][0]) and torch.equal(next(resumed)[0], batches[4][0])
    assert not torch.equal(next(BatchSampler(tokens, 4, 16, seed=2))[0], batches[0][0])
    assert not torch.equal(next(BatchSampler(tokens, 4, 16, seed=1, rank=1))[0], batches[0][0])


def test_sampler_covers_the_whole_shard():
    tokens = np.arange(20, dtype=np.uint16)
    seen = torch.cat([next(s)[1] for s in [BatchSampler(tokens, 8, 4, seed=0)] for _ in range(50)])
    assert int(seen.min()) == 1 and int(seen.max()) == 19  # first and last windows both occur


def test_val_batches_are_fixed_and_evenly_spaced():
    tokens = np.arange(1001, dtype=np.uint32)
    batches = val_batches(tokens, 2, 10, 5)
    assert len(batches) == 5 and all(x.shape == (2, 10) for x, _ in batches)
    starts = [int(x[i, 0]) for x, _ in batches for i in range(2)]
    assert starts[0] == 0 and starts[-1] == 1001 - 11
    assert np.ptp(np.diff(starts)) <= 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val_batches(tokens, 2, 10, 5)))


def test_short_shard_is_a_user_error():
    with pytest.raises(UserError, match="seq_len"):
        BatchSampler(np.arange(10, dtype=np.uint16), 2, 10, seed=0)
    with pytest.raises(UserError, match="seq_len"):
        val_batches(np.arange(10, dtype=np.uint16), 2, 10, 1)


def test_unigram_baseline():
    rng = np.random.default_rng(0)
    V = 50
    uniform = rng.integers(0, V, 200_000).astype(np.uint16)
    assert unigram_loss(uniform[:100_000], uniform[100_000:], V) == pytest.approx(math.log(V), abs=0.01)
    p = np.arange(1, V + 1) / np.arange(1, V + 1).sum()
    skewed = rng.choice(V, 200_000, p=p).astype(np.uint16)
    entropy = float(-(p * np.log(p)).sum())
    assert unigram_loss(skewed[:100_000], skewed[100_000:], V) == pytest.approx(entropy, abs=0.01)
    # add-one smoothing: a token never seen in train still has finite loss
    assert math.isfinite(unigram_loss(np.zeros(10, np.uint16), np.full(10, 7, np.uint16), V))

