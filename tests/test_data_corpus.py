"""Reading a corpus (tsvd/data/corpus.py): accepted and skipped files, order, the byte cap, errors."""

from __future__ import annotations

import pytest
from data_common import corpus, expected_texts  # noqa: F401  (fixtures)

from tsvd import UserError
from tsvd.config import DataConfig
from tsvd.data.corpus import STDLIB_SKIP_DIRS, read_corpus


def test_read_corpus_accepts_and_skips(corpus):  # noqa: F811
    docs, stats = read_corpus(DataConfig(corpus=[str(corpus)]))
    assert {d.text for d in docs} == expected_texts()
    assert [d.name for d in docs] == sorted(d.name for d in docs) and docs[0].name.startswith("corpus/")
    assert (stats.skipped, stats.duplicates) == (2, 1)
    assert stats.bytes == sum(len(t.encode()) for t in expected_texts())


def test_stdlib_entry_with_byte_cap():
    docs, stats = read_corpus(DataConfig(corpus=["stdlib"], max_bytes=300_000))
    assert stats.bytes == 300_000 and all(d.name.startswith("stdlib/") and d.name.endswith(".py") for d in docs)
    assert not any(part in STDLIB_SKIP_DIRS for d in docs for part in d.name.split("/"))
    assert "Python" in stats.sources[0]
    again, _ = read_corpus(DataConfig(corpus=["stdlib"], max_bytes=300_000))
    assert again == docs  # the cap always keeps the same prefix


def test_corpus_errors(tmp_path):
    with pytest.raises(UserError, match=r"data\.corpus.*does not exist"):
        read_corpus(DataConfig(corpus=[str(tmp_path / "missing")]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match=r"data\.corpus.*0 usable"):
        read_corpus(DataConfig(corpus=[str(tmp_path / "empty")]))
