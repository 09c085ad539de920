"""Preparing a dataset, once: corpus → tokenizer (trained on training documents only) → token shards in
``data.dir`` (the layout: ``tsvd.data.shards``).

``prepare_data`` reads the corpus (``tsvd.data.corpus``), splits it by document and by tokens
(``tsvd.data.split``), builds the tokenizer, encodes every document followed by the end-of-text id and
writes the shards and ``meta.json`` to a temporary folder that replaces ``data.dir`` at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tsvd.config import DataConfig
from tsvd.data.corpus import Document, read_corpus
from tsvd.data.shards import FORMAT_VERSION, META_FILE, DataMeta, load_data, read_meta
from tsvd.data.split import split_order, split_sizes
from tsvd.errors import UserError
from tsvd.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

ENCODE_CHUNK_CHARS = 1 << 20  # text handed to one encode_batch call


def fingerprint(cfg: DataConfig) -> str:
    """Identity of the dataset ``cfg`` describes (everything but ``dir``; file contents are not hashed)."""
    return hashlib.sha256(json.dumps(_defining_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _defining_fields(cfg: DataConfig) -> dict:
    trained = cfg.tokenizer == "bpe" and cfg.tokenizer_file is None
    return {
        "format": FORMAT_VERSION,
        "corpus": [c if c == "stdlib" else os.path.normpath(c) for c in cfg.corpus],
        "tokenizer": cfg.tokenizer,
        "tokenizer_file": cfg.tokenizer_file,
        "vocab_size": cfg.vocab_size if trained else None,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "max_bytes": cfg.max_bytes,
    }


def _make_tokenizer(cfg: DataConfig, train_docs: list[Document], progress: bool) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer_file is not None:
        try:
            return BPETokenizer.from_file(cfg.tokenizer_file)
        except UserError as e:
            raise UserError(f"data.tokenizer_file: {e}") from None
    return BPETokenizer.train((d.text for d in train_docs), cfg.vocab_size, progress=progress, length=len(train_docs))


def _chunks(docs: list[Document], max_chars: int):
    """Consecutive runs of documents of about ``max_chars`` characters (at least one document each)."""
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d.text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode(docs: list[Document], tok: Tokenizer, dtype: np.dtype, bar: tqdm) -> list[np.ndarray]:
    """Every document as ``ids + [eot]`` (one array per document), encoded in batches."""
    out = []
    for chunk in _chunks(docs, ENCODE_CHUNK_CHARS):
        out += [np.array(ids + [tok.eot_id], dtype=dtype) for ids in tok.encode_batch([d.text for d in chunk])]
        bar.update(sum(len(d.text) for d in chunk))
    return out


def _write_shard(path: Path, arrays: list[np.ndarray]) -> int:
    """Write the documents' token arrays to ``path`` back to back; returns the token count."""
    with open(path, "wb") as f:
        for a in arrays:
            a.tofile(f)
    return sum(len(a) for a in arrays)


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished ``new`` to ``out``; an existing ``out`` is removed only after the move."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)


def prepare_data(cfg: DataConfig, progress: bool = True, overwrite: bool = False) -> DataMeta:
    """Build the dataset ``cfg`` describes in ``cfg.dir`` (or reuse it if already there); returns its meta.

    A ``cfg.dir`` holding anything else (another dataset, other files) is an error unless
    ``overwrite``. Everything is written to a temporary folder beside ``cfg.dir`` and moved into
    place at the end, so an interrupted run leaves no dataset that looks valid.
    """
    out, fp = Path(cfg.dir), fingerprint(cfg)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        existing = read_meta(out) if (out / META_FILE).is_file() else None
        if existing is not None and existing.fingerprint == fp:
            load_data(out)  # validates the shards
            return existing
        what = f"a different dataset (fingerprint {existing.fingerprint}, this config {fp})" if existing else \
            "files that are not a tsvd dataset"
        raise UserError(f"data.dir: {out} already holds {what}; choose another data.dir, "
                        "or rebuild it with overwrite (tsvd prepare --overwrite)")
    if out.exists() and not out.is_dir():
        raise UserError(f"data.dir: {out} is a file, not a folder")

    t0 = time.perf_counter()
    docs, stats = read_corpus(cfg)
    order, fractions = split_order(docs), [cfg.val_fraction, cfg.test_fraction]
    # The tokenizer is trained before token counts exist: it sees only documents outside a byte-sized
    # reserve of 1.5× the held-out shares (widened and retrained in the rare case the token split needs more).
    margin = 1.5
    while True:
        reserve = split_sizes([len(d.text.encode("utf-8")) for d in docs], order, [min(0.99, f * margin) for f in fractions])
        tok = _make_tokenizer(cfg, [d for d, s in zip(docs, reserve) if s == 0], progress)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
        with tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True, desc="tokenize",
                  disable=not progress) as bar:
            arrays = _encode(docs, tok, dtype, bar)
        side = split_sizes([len(a) for a in arrays], order, fractions)
        if all(r > 0 for r, s in zip(reserve, side) if s > 0) or not isinstance(tok, BPETokenizer) or \
                cfg.tokenizer_file is not None:
            break
        margin *= 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        tok.save(tmp)
        n = [_write_shard(tmp / f"{name}.bin", [a for a, s in zip(arrays, side) if s == k])
             for k, name in enumerate(("train", "val", "test")) if k < 2 or cfg.test_fraction > 0]
        count = [side.count(k) for k in range(3)]
        meta = DataMeta(
            vocab_size=tok.vocab_size, tokenizer=tok.kind, eot_id=tok.eot_id, dtype=dtype.name,
            train_tokens=n[0], val_tokens=n[1], train_docs=count[0], val_docs=count[1],
            corpus_bytes=stats.bytes, skipped_files=stats.skipped, duplicate_docs=stats.duplicates,
            sources=stats.sources, fingerprint=fp, config=_defining_fields(cfg),
            prepare_seconds=round(time.perf_counter() - t0, 2),
            test_tokens=n[2] if len(n) > 2 else 0, test_docs=count[2],
        )
        (tmp / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
