"""Shared fixtures: a tiny, fast, real-text training config (byte tokenizer on stdlib sources)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tsvd.config import Config, apply_overrides, config_from_dict



@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use small tensors: one thread is as fast, deterministic, and immune to OpenMP
    oversubscription on a shared 2-core machine (two spinning threads per process made tests ~50×
    slower there). Restored before every test because the trainer sets its own thread count."""
    torch.set_num_threads(1)
    yield


def tiny_raw(tmp_path: Path) -> dict:
    """A ~50k-parameter spectral model on 300 kB of stdlib sources (byte tokenizer: no training)."""
    return {
        "seed": 0,
        "out_dir": str(tmp_path / "run"),
        "model": {"vocab_size": 0, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                  "max_seq_len": 64, "spectral": {"targets": ["q", "k", "v", "o", "gate", "up", "down"], "rank": 8}},
        "data": {"dir": str(tmp_path / "data"), "corpus": ["stdlib"], "tokenizer": "byte", "max_bytes": 300_000},
        "train": {"steps": 30, "batch_size": 4, "seq_len": 32, "lr": 2e-2, "spectral_lr": 2e-2, "core_lr": 2e-2,
                  "warmup_steps": 3, "eval_interval": 15, "eval_batches": 2, "log_interval": 5,
                  "checkpoint_interval": 10, "threads": 1},
    }


@pytest.fixture
def tiny_config(tmp_path):
    """``make(*overrides) -> Config`` for the tiny run in this test's tmp dir."""

    def make(*overrides: str) -> Config:
        return config_from_dict(apply_overrides(tiny_raw(tmp_path), list(overrides)))

    return make
