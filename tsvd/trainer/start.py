"""How a run starts, before the loop: threads, the dataset (prepared once, by global rank 0), the
model's vocabulary, the checkpoint to resume from and whether it fits this config, the rank controller."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tsvd import checkpoint as ckpt
from tsvd.config import Config, to_dict
from tsvd.data import META_FILE, prepare_data
from tsvd.errors import UserError
from tsvd.progress import is_terminal, say

DATA_WAIT_S = 3600  # how long non-zero ranks wait for rank 0 to prepare the data
ARCHITECTURE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings")


def global_rank() -> int:
    """This process's rank in a launcher job (0 without a launcher); known before any process group."""
    return int(os.environ.get("RANK", "0"))


def set_threads(cfg: Config) -> None:
    """``train.threads`` per process, or the cores shared equally by the processes of this node."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)


def find_resume(resume: str | Path | None, out_dir: Path, ckpt_root: Path) -> Path | None:
    """The checkpoint to resume from: ``"auto"`` → the latest in ``ckpt_root`` if any, a path → that
    checkpoint, ``None`` → none (refusing to overwrite an existing run's checkpoints)."""
    if resume is None:
        if ckpt.latest_checkpoint(ckpt_root) is not None:
            raise UserError(f"out_dir: {out_dir} already holds a run's checkpoints; resume it "
                            "(--resume) or choose another out_dir")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(ckpt_root)
    return ckpt.resolve_checkpoint(Path(resume))


def check_compatible(cfg: Config, meta: dict, resume_from: Path) -> None:
    """The checkpoint at ``resume_from`` (its ``meta``) was trained with this config's architecture."""
    saved = meta.get("config", {}).get("model", {})
    mine = to_dict(cfg)["model"]
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != mine[key]:
            raise UserError(f"model.{key}: the checkpoint {resume_from} was trained with "
                            f"{saved[key]}, this config has {mine[key]} (checkpoint from a different model)")
    if sorted(saved.get("spectral", {}).get("targets", [])) != sorted(mine["spectral"]["targets"]):
        raise UserError(f"model.spectral.targets: differ from the checkpoint {resume_from}")


def set_vocab(cfg: Config, vocab: int) -> None:
    """``model.vocab_size``: 0 takes the tokenizer's ``vocab``; any other value must equal it."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size != vocab:
        raise UserError(f"model.vocab_size: {cfg.model.vocab_size} does not match the tokenizer of "
                        f"{cfg.data.dir} ({vocab}); set it to {vocab} or 0")


def ensure_data(cfg: Config, progress: bool) -> None:
    """Prepare ``data.dir`` if it holds no dataset — on global rank 0 only; other ranks of a launcher
    job (before any process group exists) wait for its ``meta.json``."""
    meta = Path(cfg.data.dir) / META_FILE
    if meta.is_file():
        return
    if global_rank() == 0:
        if progress and not is_terminal():
            say(f"preparing {cfg.data.dir} (no progress bars: output is not a terminal)")
        prepare_data(cfg.data, progress=progress and is_terminal())
        return
    deadline = time.monotonic() + cfg.engine.timeout_s + DATA_WAIT_S
    while not meta.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"data.dir: {cfg.data.dir} was not prepared by rank 0 in time; "
                            "run `tsvd prepare` before launching")
        time.sleep(1.0)


def build_controller(cfg: Config, dims: dict[str, tuple[int, int]]):
    """The ``RankController`` of ``cfg.rank`` over layers of shape ``dims`` (``None`` for a static policy)."""
    if cfg.rank.policy == "static":
        return None
    from tsvd.controller import RankController

    return RankController(cfg.rank, dims)
