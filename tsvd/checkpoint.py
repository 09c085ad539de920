"""Crash-safe checkpoints: write into a temporary directory, fsync, publish with an atomic rename,
then move the ``latest`` pointer (itself replaced atomically). A crash at any point leaves the
previous checkpoint complete and ``latest`` pointing at it.

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

from tsvd.errors import UserError

META_FILE = "meta.json"
LATEST = "latest"


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


def save_checkpoint(root: Path, step: int, meta: dict, write_state: Callable[[Path], None],
                    is_main: bool = True, barrier: Callable[[], None] = lambda: None, keep: int = 3) -> Path:
    """Publish a checkpoint for ``step``. ``write_state(tmp_dir)`` writes the engine's files (every rank
    calls it with the same directory); rank 0 (``is_main``) writes ``meta.json``, syncs and publishes.
    Older checkpoints beyond the ``keep`` newest are removed after publishing."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write_state(tmp)
    barrier()
    if is_main:
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / LATEST, final.name)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
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
    """``meta.json`` of a checkpoint directory (also accepts a run's checkpoints root → latest)."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = latest_checkpoint(path)
    elif (path / "checkpoints" / LATEST).is_file():
        path = latest_checkpoint(path / "checkpoints")
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise UserError(f"{path}: not a tsvd checkpoint (no {META_FILE})")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_file}: corrupted ({e})") from None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a step dir, a checkpoints root, or a run's out_dir."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            return latest_checkpoint(root)
    if (path / META_FILE).is_file():
        return path
    raise UserError(f"{path}: no tsvd checkpoint here (expected {META_FILE} or a '{LATEST}' pointer)")
