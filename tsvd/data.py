"""Offline data: corpus files → tokenizer → token shards on disk → random training windows.

``prepare_data(cfg)`` runs once and writes ``cfg.dir``::

    tokenizer.json | byte_tokenizer.json   the tokenizer (see tsvd.tokenizer)
    train.bin, val.bin [, test.bin]         token ids, uint16 (uint32 if the vocabulary needs it);
                                            every document is followed by the end-of-text id
    meta.json                               sizes, dtype, sources and the config fingerprint

A *document* is one file. Corpus entries (``data.corpus``):

- ``"stdlib"``: the ``.py`` sources of this Python's standard library (``sysconfig`` "stdlib" path),
  without ``site-packages``/``dist-packages`` and the test suites (``test``, ``tests``,
  ``idle_test``: deliberately malformed files and data blobs).
- a folder: every file below it ending in ``.txt .md .rst .pod .py`` (or those plus ``.gz``,
  decompressed); hidden entries are skipped.
- a file: used as it is (``.gz`` decompressed).

Unreadable files and files with NUL bytes or invalid UTF-8 are skipped, and so are exact duplicates
(same bytes). Entries are read in order, each in sorted order of its document names
(``stdlib/json/decoder.py``, ``<folder name>/<relative path>``), so ``data.max_bytes`` (0 = no cap)
always keeps the same prefix; the last document is cut at the cap. The split is by document and by
tokens (``split_sizes``): documents are visited in the order of a hash of their names (reproducible,
spread across the corpus, independent of the machine's paths); the first ones go to ``val`` until it
holds at least ``val_fraction`` of the tokens and at least ``MIN_HELDOUT_DOCS`` documents, the next
ones likewise to ``test`` (``test_fraction > 0``), the rest to ``train``. Never a document on two sides;
the tokenizer is trained on training documents only.

``load_data(dir)`` memory-maps the shards (``Dataset.test`` is ``None`` without a test split); ``BatchSampler`` draws seeded, resumable random windows;
``val_batches`` gives fixed evaluation windows; ``unigram_loss`` is the baseline a model must beat.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from tsvd.config import DataConfig
from tsvd.errors import UserError
from tsvd.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

FORMAT_VERSION = 2  # 2: split by tokens with a document floor, optional test split
META_FILE = "meta.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".pod", ".py")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
ENCODE_CHUNK_CHARS = 1 << 20  # text handed to one encode_batch call
MIN_HELDOUT_DOCS = 50  # a held-out split gets at least this many documents (all but one on a small corpus) ...
HELDOUT_FLOOR_CAP = 0.5  # ... unless that would give the held-out splits together more than this share of the tokens
FULL_CHECK_TOKENS = 1 << 26  # shards up to this size are range-checked whole, larger ones by sampled blocks


@dataclass
class Document:
    name: str  # stable, machine-independent: "stdlib/json/decoder.py", "<folder name>/<relative path>"
    text: str


@dataclass
class CorpusStats:
    sources: list[str] = field(default_factory=list)  # one line per corpus entry
    bytes: int = 0  # UTF-8 bytes kept
    skipped: int = 0  # binary / undecodable files
    duplicates: int = 0  # exact duplicates of an earlier file


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


# --------------------------------------------------------------------------------------------
# Reading the corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _listing(entry: str) -> tuple[str, list[tuple[str, Path]]]:
    """``(description, [(document name, path)])`` of one corpus entry, sorted by name."""
    if entry == "stdlib":
        root, prefix, skip, suffixes = stdlib_dir(), "stdlib", STDLIB_SKIP_DIRS, (".py",)
        desc = f"stdlib: Python {sys.version.split()[0]} standard library at {root}"
    else:
        root = Path(entry).expanduser()
        if not root.exists():
            raise UserError(f"data.corpus: {entry} does not exist")
        if root.is_file():
            return f"file {root}", [(root.name, root)]
        prefix, skip, suffixes, desc = root.resolve().name, frozenset(), TEXT_SUFFIXES, f"folder {root}"
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().removesuffix(".gz").endswith(suffixes):
                path = Path(dirpath) / f
                found.append((f"{prefix}/{path.relative_to(root).as_posix()}", path))
    return desc, sorted(found)


def _read_text(path: Path) -> str | None:
    """The file as text, or ``None`` if it is unreadable, binary or not UTF-8."""
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError):  # permissions, a broken link, a damaged archive
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_corpus(cfg: DataConfig) -> tuple[list[Document], CorpusStats]:
    """All documents of ``cfg.corpus`` in order, up to ``cfg.max_bytes`` UTF-8 bytes."""
    if not cfg.corpus:
        raise UserError("data.corpus: empty; give 'stdlib' or text files/folders")
    listings = [_listing(entry) for entry in cfg.corpus]  # fail on a missing path before reading anything
    docs, stats, seen = [], CorpusStats(), set()
    budget = cfg.max_bytes or math.inf
    for desc, files in listings:
        n_before, bytes_before = len(docs), stats.bytes
        for name, path in files:
            if stats.bytes >= budget:
                break
            text = _read_text(path)
            if text is None:
                stats.skipped += 1
                continue
            raw = text.encode("utf-8")
            digest = hashlib.sha1(raw).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            if stats.bytes + len(raw) > budget:  # cut the last document at the cap (on a character boundary)
                text = raw[: int(budget - stats.bytes)].decode("utf-8", errors="ignore")
                raw = text.encode("utf-8")
            if text:
                docs.append(Document(name, text))
                stats.bytes += len(raw)
        stats.sources.append(f"{desc}: {len(docs) - n_before} documents, {stats.bytes - bytes_before:,} bytes")
    if len(docs) < 2:
        raise UserError(f"data.corpus: {cfg.corpus} yields {len(docs)} usable document(s); a train/val split needs "
                        f"at least 2 (accepted in folders: {', '.join(TEXT_SUFFIXES)}, UTF-8 text)")
    return docs, stats


def _unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) from a document name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_order(docs: list[Document]) -> list[int]:
    """Indices of ``docs`` in the order held-out documents are drawn: by a hash of the name."""
    return sorted(range(len(docs)), key=lambda i: (_unit_hash(docs[i].name), docs[i].name))


def split_sizes(sizes: list[int], order: list[int], fractions: list[float]) -> list[int]:
    """Assign documents to held-out splits by size: returns ``side[i]`` = 0 (train) or ``j + 1`` (split ``j``).

    ``sizes[i]``: document ``i``'s tokens (or bytes); ``order``: the visiting order (``split_order``);
    ``fractions[j]``: split ``j``'s share (0 = no such split). Split ``j`` takes the next documents in
    ``order`` until it holds ``≥ fractions[j]`` of the total and ``≥ MIN_HELDOUT_DOCS`` documents — fewer
    documents when the floor would give it more than its part of ``HELDOUT_FLOOR_CAP`` of the total
    (shared equally by the held-out splits), or when the corpus is too small (one document is always
    left for train and for each later split).
    """
    total, side, pos = sum(sizes), [0] * len(sizes), 0
    active = [j for j, f in enumerate(fractions) if f > 0]
    cap = HELDOUT_FLOOR_CAP * total / max(1, len(active))
    for k, j in enumerate(active):
        spare = len(order) - pos - 1 - (len(active) - k - 1)  # documents this split may take
        held, count = 0, 0
        while count < spare and (held < fractions[j] * total or
                                 (count < MIN_HELDOUT_DOCS and held < cap) or count == 0):
            i = order[pos]
            side[i], held, count, pos = j + 1, held + sizes[i], count + 1, pos + 1
    return side


# --------------------------------------------------------------------------------------------
# Preparing and loading


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
        if cfg.tokenizer_file is not None:
            raise UserError("data.tokenizer_file: only used with data.tokenizer: bpe")
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


# --------------------------------------------------------------------------------------------
# Batches


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(f"train.seq_len: windows of {seq_len}+1 tokens do not fit in a shard of {len(tokens)} "
                        "tokens; use a shorter seq_len or more data")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """``x = tokens[s : s+T]``, ``y = tokens[s+1 : s+T+1]`` for each start ``s``: two ``(B, T)`` int64 tensors."""
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchSampler:
    """Random windows ``(x, y)`` of shape ``(batch_size, seq_len)``; ``y`` is ``x`` shifted by one token.

    Batch ``i`` depends only on ``(seed, rank, i)``, so ``state_dict()`` is just the position and a
    resumed sampler continues with exactly the batch that would have come next. Data-parallel
    ranks pass their ``rank`` to draw different windows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0) -> None:
        _check_length(tokens, seq_len)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.step = seed, rank, 0

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.step += 1
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.rank, self.step = state["seed"], state["rank"], state["step"]


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed evaluation batches: ``n·batch_size`` windows evenly spaced over the shard."""
    _check_length(tokens, seq_len)
    starts = np.linspace(0, len(tokens) - seq_len - 1, n * batch_size).round().astype(np.int64)
    return [_windows(tokens, s, seq_len) for s in starts.reshape(n, batch_size)]


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val`` of an add-one-smoothed unigram model fit on ``train``."""
    def counts(tokens: np.ndarray) -> np.ndarray:
        c = np.zeros(vocab_size, dtype=np.int64)
        for i in range(0, len(tokens), 1 << 24):
            c += np.bincount(tokens[i:i + (1 << 24)], minlength=vocab_size)
        return c

    train_counts = counts(train_tokens) + 1
    log_p = np.log(train_counts) - np.log(train_counts.sum())
    val_counts = counts(val_tokens)
    return float(-(val_counts * log_p).sum() / val_counts.sum())
