"""A prepared dataset on disk, and reading it back: ``read_meta`` and ``load_data`` (memory-mapped,
validated against ``meta.json``).

``data.dir`` holds::

    tokenizer.json | byte_tokenizer.json   the tokenizer (see tsvd.tokenizer)
    train.bin, val.bin [, test.bin]         token ids, uint16 (uint32 if the vocabulary needs it);
                                            every document is followed by the end-of-text id
    meta.json                               sizes, dtype, sources and the config fingerprint
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsvd.errors import UserError
from tsvd.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 2  # 2: split by tokens with a document floor, optional test split
META_FILE = "meta.json"
FULL_CHECK_TOKENS = 1 << 26  # shards up to this size are range-checked whole, larger ones by sampled blocks


@dataclass
class DataMeta:
    """Contents of ``meta.json``."""

    vocab_size: int
    tokenizer: str  # "byte" | "bpe"
    eot_id: int
    dtype: str  # "uint16" | "uint32"
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    corpus_bytes: int
    skipped_files: int
    duplicate_docs: int
    sources: list[str]
    fingerprint: str
    config: dict  # the DataConfig fields that define the dataset
    prepare_seconds: float
    format: int = FORMAT_VERSION
    test_tokens: int = 0
    test_docs: int = 0


@dataclass
class Dataset:
    """A prepared dataset: memory-mapped token arrays ``train (N,)``, ``val (M,)``, ``test (K,)`` or ``None``."""

    dir: Path
    meta: DataMeta
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None = None


def _missing(directory: Path, what: str) -> UserError:
    return UserError(f"data.dir: {what} in {directory}; run `tsvd prepare <config>` to build the dataset")


def read_meta(directory: str | Path) -> DataMeta:
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise _missing(directory, "no prepared dataset (meta.json missing)")
    try:
        meta = DataMeta(**json.loads((directory / META_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"data.dir: {directory / META_FILE} is unreadable ({e}); rebuild with "
                        "`tsvd prepare --overwrite`") from None
    if meta.format != FORMAT_VERSION:
        raise UserError(f"data.dir: {directory} has dataset format {meta.format}, this tsvd reads {FORMAT_VERSION}; "
                        "rebuild with `tsvd prepare --overwrite`")
    return meta


def _open_shard(path: Path, meta: DataMeta, count: int) -> np.ndarray:
    """Memory-map a shard after checking its size and (cheaply) its token range."""
    if not path.is_file():
        raise _missing(path.parent, f"{path.name} missing")
    dtype = np.dtype(meta.dtype)
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise UserError(f"data.dir: {path} is corrupted: {size} bytes, meta.json says {count} {dtype.name} tokens "
                        f"({count * dtype.itemsize} bytes); rebuild with `tsvd prepare --overwrite`")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if len(tokens) <= FULL_CHECK_TOKENS:
        top = int(tokens.max())
    else:  # 256 evenly spaced blocks of 64k tokens
        starts = np.linspace(0, len(tokens) - (1 << 16), 256).astype(np.int64)
        top = max(int(tokens[s:s + (1 << 16)].max()) for s in starts)
    if top >= meta.vocab_size:
        raise UserError(f"data.dir: {path} is corrupted: token id {top} ≥ vocab_size {meta.vocab_size}; "
                        "rebuild with `tsvd prepare --overwrite`")
    return tokens


def load_data(directory: str | Path) -> Dataset:
    """Open a prepared dataset (memory-mapped, read-only) after validating it against ``meta.json``."""
    directory = Path(directory)
    meta = read_meta(directory)
    tok = load_tokenizer(directory)
    if (tok.vocab_size, tok.eot_id) != (meta.vocab_size, meta.eot_id):
        raise UserError(f"data.dir: {directory}: the tokenizer (vocab {tok.vocab_size}) does not match meta.json "
                        f"(vocab {meta.vocab_size}); rebuild with `tsvd prepare --overwrite`")
    train = _open_shard(directory / "train.bin", meta, meta.train_tokens)
    val = _open_shard(directory / "val.bin", meta, meta.val_tokens)
    test = _open_shard(directory / "test.bin", meta, meta.test_tokens) if meta.test_docs else None
    return Dataset(directory, meta, tok, train, val, test)
