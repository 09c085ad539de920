"""Crash-safe checkpoints: write into a temporary directory, fsync, publish with an atomic rename,
then move the ``latest`` pointer (itself replaced atomically). A crash at any point leaves the
previous checkpoint complete and ``latest`` pointing at it; the unpublished ``.tmp-*`` directory it may
leave behind is never read and is removed by the next save.

Layout under ``<out_dir>/checkpoints``::

    step-00000250/meta.json          # step, per-layer ranks, config — readable without torch
    step-00000250/<engine files>     # written by Engine.save (model, optimizer, client state)
    latest                           # text file: "step-00000250"
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tsvd.errors import UserError, read_document

META_FILE = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"  # unpublished checkpoints being written; removed by the next save


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temp file, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _retire(root: Path, old: Path) -> None:
    """Remove the published checkpoint ``old`` that a new one of the same step replaces. If ``latest``
    points at it, it is first moved to the newest other complete checkpoint (or removed when there is
    none), so that a crash before the replacement is published never leaves ``latest`` dangling."""
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text().strip() == old.name:
        others = [d for d in sorted(root.glob("step-*")) if d != old and (d / META_FILE).is_file()]
        if others:
            write_text_atomic(pointer, others[-1].name)
        else:
            pointer.unlink()
            _fsync_dir(root)
    shutil.rmtree(old)


def save_checkpoint(root: Path, step: int, meta: dict, write_state: Callable[[Path], None],
                    is_main: bool = True, barrier: Callable[[], None] = lambda: None, keep: int = 3) -> Path:
    """Publish a checkpoint for ``step``. ``write_state(tmp_dir)`` writes the engine's files (every rank
    calls it with the same directory); rank 0 (``is_main``) writes ``meta.json``, syncs and publishes.
    Older checkpoints beyond the ``keep`` newest are removed after publishing."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash in the middle of an earlier save
            shutil.rmtree(stale)
        tmp.mkdir()
    barrier()
    write_state(tmp)
    barrier()
    if is_main:
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            _retire(root, final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / LATEST, final.name)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or ``None`` when there is none."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / META_FILE).is_file():
        raise UserError(f"{pointer}: points to {path.name}, which is missing or incomplete")
    return path


def read_meta(path: Path) -> dict:
    """``meta.json`` of a checkpoint (a step dir, a checkpoints root or a run's out_dir: ``resolve_checkpoint``)."""
    path = resolve_checkpoint(path)
    meta_file = path / META_FILE
    meta = read_document(meta_file, "JSON", f"{path}: not a tsvd checkpoint (no {META_FILE})")
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file}: expected a JSON object")
    return meta


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a step dir, a checkpoints root, or a run's out_dir."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return latest_checkpoint(root)
    if (path / META_FILE).is_file():
        return path
    raise UserError(f"{path}: no tsvd checkpoint here (expected {META_FILE} or a '{LATEST}' pointer)")
