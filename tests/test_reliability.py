"""Reliability guarantees of a training run (docs/reliability.md lists each one and its test here).

- exact resume after ``SIGKILL`` of ``python -m tsvd.cli train`` (with rank changes before the kill);
- numeric guards: a non-finite ``s`` after an update is not accepted, N bad steps stop the run (CLI
  exit 1) with a usable checkpoint, an orthonormality error beyond tolerance is repaired (Householder);
- untrusted files: a malicious pickle in a checkpoint is refused, never executed; every ``torch.load``
  in the package is ``weights_only=True``.

Every run is tiny (tests/conftest.py) with ``train.threads=1``: several test sessions share two cores,
and two threads per process made steps ~100× slower under that load. Child processes get their own
process group and are killed whole on timeout.
"""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tsvd
from tsvd import checkpoint as ckpt
from tsvd import stiefel
from tsvd.retraction import Retractor, repair_tolerance, spectral_factors
from tsvd.stiefel import orthonormality_error
from tsvd.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FAST = ("train.threads=1",)


# --------------------------------------------------------------------------------------------
# Helpers shared by the tests below


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def losses_by_step(out_dir: Path) -> dict[int, list[float]]:
    """Every ``train/loss`` logged in ``metrics.jsonl``, by step (a replayed step appears twice)."""
    out: dict[int, list[float]] = {}
    for rec in read_jsonl(Path(out_dir) / "metrics.jsonl"):
        if "train/loss" in rec:
            out.setdefault(rec["step"], []).append(rec["train/loss"])
    return out


def events(out_dir: Path, tag: str) -> list[dict]:
    return [r for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if r.get("event") == tag]


def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m tsvd.cli ARGS`` in its own process group (killed whole on timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", "tsvd.cli", *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------------------------
# Orthonormality repair


@pytest.fixture
def sloppy_cholesky(monkeypatch):
    """Make every Cholesky-QR result slightly non-orthonormal (R⁻¹ scaled by 1 + 1e-3): a stand-in for
    a retraction that went wrong. Householder QR (the repair) is untouched."""
    real = stiefel.cholesky_r

    def sloppy(G):
        R, R_inv, ok = real(G)
        return R, R_inv * (1 + 1e-3), ok

    monkeypatch.setattr(stiefel, "cholesky_r", sloppy)


def test_orthonormality_beyond_tolerance_is_repaired(sloppy_cholesky):
    torch.manual_seed(0)
    model = torch.nn.Sequential(tsvd.SpectralLinear(16, 40, 6), tsvd.SpectralLinear(40, 16, 6))
    retractor = Retractor(model)
    quiet = retractor()  # not measured: nothing is known, nothing repaired
    assert quiet.repaired == []
    assert max(float(orthonormality_error(p)) for p in spectral_factors(model).values()) > 1e-4

    report = retractor(measure_error=True)
    names = list(spectral_factors(model))
    assert sorted(report.repaired) == sorted(names)
    assert set(report.repaired) <= set(report.fallbacks)
    for name, p in spectral_factors(model).items():
        assert float(orthonormality_error(p)) <= repair_tolerance(torch.float32), name
        assert retractor.cache[name].error <= repair_tolerance(torch.float32)
        assert retractor.cache[name].householder


def test_good_retraction_is_not_repaired():
    torch.manual_seed(0)
    model = tsvd.SpectralLinear(16, 40, 6)
    with torch.no_grad():
        model.U.add_(1e-3 * torch.randn_like(model.U))
    report = Retractor(model)(measure_error=True)
    assert report.repaired == [] and report.fallbacks == []


def test_trainer_logs_repairs(tiny_config, sloppy_cholesky):
    cfg = tiny_config(*FAST, "train.steps=2", "train.log_interval=1", "train.eval_interval=100",
                      "train.checkpoint_interval=100")
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    trainer.close()
    logged = events(cfg.out_dir, "retraction_repair")
    assert [e["step"] for e in logged] == [1, 2]
    assert "layers.0.attn.q.U" in logged[0]["message"] and "Householder" in logged[0]["message"]
    for p in trainer.engine.retractor.factors().values():
        assert float(orthonormality_error(p)) <= 1e-5
