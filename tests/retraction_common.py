"""Shared by tests/test_retraction.py, test_factor_stacks.py and test_retraction_schedule.py: a small
model with several same-shape spectral factors, and Adam-sized steps off the manifold.

Tolerances: orthonormality after a fp32 retraction is ~1e-6 (see test_stiefel.py); 1e-5 is the contract.
"""

from __future__ import annotations

import torch
from torch import nn

from tsvd import Retractor, SpectralEmbedding, SpectralLinear
from tsvd.retraction import spectral_factors
from tsvd.stiefel import orthonormality_error

TOL = 1e-5


class Net(nn.Module):
    """Spectral embedding + three same-shape spectral linears (batched together) + a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = SpectralEmbedding(50, 16, 4)
        self.a = SpectralLinear(16, 32, 4)
        self.b = SpectralLinear(16, 32, 4)
        self.c = SpectralLinear(16, 32, 4)
        self.d = SpectralLinear(32, 16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.a(h) + self.b(h) * self.c(h))
        return self.head(torch.tanh(self.d(h)))


NAMES = ["emb.U", "emb.V", "a.U", "a.V", "b.U", "b.V", "c.U", "c.V", "d.U", "d.V"]


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def ortho(p: torch.Tensor) -> float:
    return float(orthonormality_error(p.detach()))


@torch.no_grad()
def perturb_(model: nn.Module, lr: float, seed: int = 0) -> None:
    """An Adam-sized step on every factor: each entry moves by ±lr."""
    g = torch.Generator().manual_seed(seed)
    for p in spectral_factors(model).values():
        p.add_(lr * torch.randn(p.shape, generator=g).sign())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in spectral_factors(model).items()}


def run_steps(retractor: Retractor, steps: int, lr: float = 1e-3, first_seed: int = 0) -> list:
    """``steps`` Adam-sized steps, each followed by ``retractor.after_step()``; their reports."""
    reports = []
    for k in range(steps):
        perturb_(retractor.model, lr, seed=first_seed + k)
        reports.append(retractor.after_step())
    return reports
