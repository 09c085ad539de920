"""The core on a CUDA device (``pytest -m gpu``): spectral layer forward/backward, retraction (with TF32 on
for the model), rank surgery, the torch engine (train, bf16 autocast, resume) and the DeepSpeed engine
(one process, no launcher). Skipped without CUDA; ``TSVD_GPU_TESTS_DEVICE=cpu`` runs them on the CPU
instead (``bench/gpu_check.py --cpu`` does, so that the GPU run's code paths are exercised here).

Tolerances: float32 on any device (the retraction runs in exact float32 even with ``train.tf32``:
orthonormality ≤ 1e-5); a resumed run equals the uninterrupted one to 1e-5 relative on CUDA (its
reductions may use atomics: the summation order can differ between launches), bitwise on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_raw
from tsvd.config import apply_overrides, config_from_dict
from tsvd.controller import RankPlan
from tsvd.engine.torch_engine import TorchEngine
from tsvd.model import build_model
from tsvd.spectral import SpectralLinear, SpectralModule
from tsvd.stiefel import orthonormality_error

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
ORTHO_TOL = 1e-5


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TSVD_GPU_TESTS_DEVICE") == "cpu":
        return torch.device("cpu")
    pytest.skip("needs CUDA (TSVD_GPU_TESTS_DEVICE=cpu runs it on the CPU)")


def engine_on(device: torch.device, tmp_path: Path, *overrides: str) -> TorchEngine:
    cfg = config_from_dict(apply_overrides(tiny_raw(tmp_path), ["model.vocab_size=64", f"train.device={device}",
                                                                 *overrides]))
    torch.manual_seed(cfg.seed)
    return TorchEngine(cfg, build_model(cfg.model))


def batches(step: int, n: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable micro-batches: next token = (3·token + 1) mod 64."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(64, (4, 33), generator=g)
    for t in range(1, 33):
        x[:, t] = (3 * x[:, t - 1] + 1) % 64
    return [(x[:, :-1], x[:, 1:])] * n


def max_ortho_error(model: torch.nn.Module) -> float:
    return max(float(orthonormality_error(p)) for m in model.modules() if isinstance(m, SpectralModule)
               for p in (m.U, m.V))


def test_stacked_retraction_of_long_factors_is_exact(device):
    """Same-shape factors retracted as stacks (the single-process engine's layout), with the long
    reductions of the Llama-3-70B MLP factors (28672 rows): after an Adam-sized step each is
    orthonormal to the float32 tolerance (batched float32 Grams on CUDA were not: docs/gpu.md)."""
    from tsvd.retraction import Retractor, spectral_factors

    torch.manual_seed(0)
    model = torch.nn.ModuleList(SpectralLinear(28672, 512, 32) for _ in range(4)).to(device)
    retractor = Retractor(model, stack=True)
    for _ in range(3):
        with torch.no_grad():
            for p in spectral_factors(model).values():
                p.add_(1e-3 * torch.randn_like(p).sign())
        report = retractor()
        assert report.max_drift > 0.05  # the step moved the factors well off the manifold
        assert max(float(orthonormality_error(p)) for p in spectral_factors(model).values()) <= ORTHO_TOL


def test_spectral_layer_forward_backward_matches_float64(device):
    torch.manual_seed(0)
    layer = SpectralLinear(96, 80, rank=16)
    x = torch.randn(3, 5, 96)
    ref = SpectralLinear(96, 80, rank=16).double()
    ref.load_state_dict(layer.state_dict())
    layer.to(device)
    y = layer(x.to(device))
    y.square().sum().backward()
    y_ref = ref(x.double())
    y_ref.square().sum().backward()
    assert y.device.type == device.type
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-5)
    for name in ("U", "s", "V", "bias"):
        got, want = getattr(layer, name).grad.double().cpu(), getattr(ref, name).grad
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("retraction", ["cholesky", "householder"])
def test_retraction_keeps_factors_orthonormal_with_tf32_on(device, tmp_path, retraction):
    engine = engine_on(device, tmp_path, "train.tf32=true", f"train.retraction={retraction}",
                       "train.lr=0.05", "train.spectral_lr=0.05")
    for step in range(10):
        result = engine.train_step(batches(step), 1.0, measure=True)
        assert not result.skipped
    assert max_ortho_error(engine.model) <= ORTHO_TOL
    assert all(p.device.type == device.type for p in engine.model.parameters())
    assert result.retraction.seconds > 0 and engine.timings["perf/forward_backward_s"] > 0


def test_rank_surgery_on_the_device(device, tmp_path):
    engine = engine_on(device, tmp_path)
    for step in range(3):
        engine.train_step(batches(step), 1.0)
    up, down = "layers.0.mlp.up", "layers.1.attn.q"
    modules = dict(engine.model.named_modules())
    before = {up: modules[up].s.numel(), down: modules[down].s.numel()}
    changes = engine.apply_rank_plan(RankPlan(step=3, ranks={up: before[up] + 4, down: before[down] - 2},
                                              before=before))
    assert {c.layer: c.new for c in changes} == {up: before[up] + 4, down: before[down] - 2}
    for name in (up, down):
        for p in (modules[name].U, modules[name].s, modules[name].V):
            assert p.device.type == device.type
    result = engine.train_step(batches(3), 1.0, measure=True)
    assert not result.skipped and max_ortho_error(engine.model) <= ORTHO_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_engine_learns_and_resumes(device, tmp_path, dtype):
    def run(steps, start=0, engine=None):
        engine = engine or engine_on(device, tmp_path, f"train.dtype={dtype}")
        return engine, [engine.train_step(batches(s), 1.0).loss for s in range(start, steps)]

    engine, losses = run(12)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    first, _ = run(6)
    first.save(tmp_path, {"step": 6})
    resumed = engine_on(device, tmp_path, f"train.dtype={dtype}")
    assert resumed.load(tmp_path) == {"step": 6}
    _, tail = run(12, start=6, engine=resumed)
    if device.type == "cpu":
        assert tail == losses[6:]
    else:
        torch.testing.assert_close(torch.tensor(tail), torch.tensor(losses[6:]), rtol=1e-5, atol=0)


def test_deepspeed_engine_one_process(device, tmp_path):
    """``tsvd train`` through the DeepSpeed engine (ZeRO-2, one process, no launcher) on the device:
    exits 0, the loss falls, the factors end orthonormal."""
    raw = apply_overrides(tiny_raw(tmp_path), [f"train.device={device.type}", "train.steps=12",
                                               "train.log_interval=1", "train.eval_interval=12",
                                               "train.checkpoint_interval=12", "engine.kind=deepspeed",
                                               f"engine.deepspeed_config={REPO / 'configs/ds/zero2.json'}"])
    config = tmp_path / "ds.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = device.type
    proc = subprocess.run([sys.executable, "-m", "tsvd.cli", "train", str(config), "--no-progress"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (Path(raw["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    errors = [r["spectral/max_ortho_error"] for r in records if "spectral/max_ortho_error" in r]
    assert errors and max(errors) <= ORTHO_TOL
