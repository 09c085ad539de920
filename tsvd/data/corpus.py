"""Reading a corpus: ``data.corpus`` entries → documents (one file each), in a reproducible order.

Corpus entries:

- ``"stdlib"``: the ``.py`` sources of this Python's standard library (``sysconfig`` "stdlib" path),
  without ``site-packages``/``dist-packages`` and the test suites (``test``, ``tests``,
  ``idle_test``: deliberately malformed files and data blobs).
- a folder: every file below it ending in ``.txt .md .rst .pod .py`` (or those plus ``.gz``,
  decompressed); hidden entries are skipped.
- a file: used as it is (``.gz`` decompressed).

Unreadable files and files with NUL bytes or invalid UTF-8 are skipped, and so are exact duplicates
(same bytes). Entries are read in order, each in sorted order of its document names
(``stdlib/json/decoder.py``, ``<folder name>/<relative path>``), so ``data.max_bytes`` (0 = no cap)
always keeps the same prefix; the last document is cut at the cap.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tsvd.config import DataConfig
from tsvd.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".pod", ".py")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


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
    """All documents of ``cfg.corpus`` in order, up to ``cfg.max_bytes`` UTF-8 bytes (at least two)."""
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
