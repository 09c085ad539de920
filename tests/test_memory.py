"""Memory discipline of the training step: what the optimizer and the retraction allocate.

Allocations are counted exactly with a dispatch mode that sees every ATen op: an output whose storage
is not one of the op's inputs (``out=`` buffers and in-place results are inputs) is a new allocation.
Counting the *volume* allocated during a call is stricter than its peak, and deterministic (RSS is
not: glibc keeps or returns freed memory as it likes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tsvd.config import TrainConfig
from tsvd.optim import build_adamw
from tsvd.retraction import Retractor, spectral_factors
from tsvd.spectral import SpectralLinear

ROOT = Path(__file__).resolve().parents[1]


class AllocationCounter(TorchDispatchMode):
    """Sizes in bytes of the new tensor storages created by ATen ops while active."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def stack_of_layers(n: int = 12) -> nn.Module:
    """Tall factors as in real models (rows ≫ rank): U 1024×8, V 4096×8."""
    torch.manual_seed(0)
    return nn.Sequential(*[SpectralLinear(1024, 4096, 8, bias=False) for _ in range(n)])


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def set_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3


def test_fused_adamw_step_allocates_nothing_while_foreach_allocates_full_size_temporaries():
    model = stack_of_layers()
    t = TrainConfig(lr=1e-3, spectral_lr=1e-3, core_lr=1e-3)
    fused = build_adamw(model, t, "cpu")
    set_grads(model)
    fused.step()  # first step creates the Adam state (that allocation is what training needs)
    with AllocationCounter() as fused_count:
        fused.step()
    assert fused_count.total == 0

    twin = stack_of_layers()
    foreach = torch.optim.AdamW(twin.parameters(), lr=1e-3, foreach=True)
    set_grads(twin)
    foreach.step()
    with AllocationCounter() as foreach_count:
        foreach.step()
    assert foreach_count.total >= param_bytes(twin.parameters())  # the counter sees real temporaries


def test_retraction_allocates_no_full_size_temporaries():
    model = stack_of_layers()
    with torch.no_grad():
        for p in spectral_factors(model).values():
            p.add_(1e-3 * torch.randn_like(p).sign())  # an Adam-sized step off the manifold
    factors = spectral_factors(model)
    ptrs = {n: p.data_ptr() for n, p in factors.items()}
    retractor = Retractor(model)
    with AllocationCounter() as count:
        report = retractor()
    assert len(report.retracted) == len(factors) and not report.fallbacks
    # one scratch buffer per factor shape (1024×8 and 4096×8) plus r×r matrices — not a copy of the
    # factors (a stacked batch would allocate ≥ 2× their bytes: the stack and the result)
    shapes = {tuple(p.shape): p.numel() * p.element_size() for p in factors.values()}
    full_size = [n for n in count.sizes if n >= min(shapes.values())]
    assert sorted(full_size) == sorted(shapes.values())
    assert count.total < 0.15 * param_bytes(factors.values())
    assert {n: p.data_ptr() for n, p in factors.items()} == ptrs  # written back in place


def test_stacked_retraction_allocates_only_small_matrices_after_the_first_call():
    model = stack_of_layers()
    factors = spectral_factors(model)
    retractor = Retractor(model, stack=True)
    retractor()  # lays the factors out in stacks and allocates one spare per stack shape
    storages = {p.untyped_storage().data_ptr() for p in factors.values()}
    storages |= {b.untyped_storage().data_ptr() for b in retractor.stacks.spares.values()}
    with torch.no_grad():
        for p in factors.values():
            p.add_(1e-3 * torch.randn_like(p).sign())
    with AllocationCounter() as count:
        report = retractor()
    assert len(report.retracted) == len(factors) and not report.fallbacks
    smallest = min(p.numel() * p.element_size() for p in factors.values())
    assert [n for n in count.sizes if n >= smallest] == []  # Grams, r×r factors, drifts: nothing factor-sized
    now = {p.untyped_storage().data_ptr() for p in factors.values()}
    assert now <= storages  # the result went into a spare stack that was already there


def test_bench_smoke_runs_every_path_and_reports_targets(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "llama70b_step.py"), "--layers", "2", "--rank", "4", "--steps", "2",
           "--threads", "1", "--set", "model.dim=64", "--set", "model.ffn_dim=96", "--set", "model.vocab_size=300",
           "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.max_seq_len=32", "--json", str(tmp_path / "bench.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for needle in ("command: ", "machine: ", "tsvd / sct: step", "tsvd-engine / sct: step",
                   "target peak RSS", "target retraction", "target step"):
        assert needle in text, text
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert set(results) == {"tsvd", "tsvd-engine", "sct"}
    for r in results.values():
        assert r["ortho_error"] <= 1e-5  # after the last step
        assert r["peak_rss_gb"] > 0 and r["median"]["step"] > 0
        assert len(r["runs"]) == 1 and len(r["runs"][0]["steps"]) == 2 and r["steady_steps"] == 1
