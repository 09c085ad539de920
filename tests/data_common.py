"""Shared by tests/test_data_*.py: a small corpus folder with every kind of file the reader accepts or skips."""

from __future__ import annotations

import gzip

import pytest

from tsvd.config import DataConfig
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
