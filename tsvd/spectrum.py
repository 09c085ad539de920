"""Spectrum statistics — pure functions of a layer's core ``s`` (its singular values, since ``U``
and ``V`` are orthonormal). Nothing here touches ``U`` or ``V``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsvd.errors import UserError


def check_energy(tau: float, what: str = "energy") -> float:
    """Validate an energy fraction: a number in (0, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
        raise UserError(f"{what} must be a number in (0, 1], got {tau!r}")
    return float(tau)


def sorted_energy(s: Tensor) -> Tensor:
    """``sᵢ²`` sorted descending, in float64: ``(r,) → (r,)``."""
    return s.detach().double().square().sort(descending=True).values


def energy(s: Tensor) -> float:
    """Total spectral energy ``Σ sᵢ² = ‖W‖_F²``."""
    return float(s.detach().double().square().sum())


def retained_fraction(s: Tensor, k: int) -> float:
    """``ρ(k) = Σ_{i≤k} s_(i)² / Σ sᵢ²`` with ``s`` sorted by magnitude (1.0 for an all-zero ``s``)."""
    e = sorted_energy(s)
    total = float(e.sum())
    return 1.0 if total == 0.0 else float(e[:k].sum()) / total


def rank_for_energy(s: Tensor, tau: float) -> int:
    """Smallest ``k ≥ 1`` with ``ρ(k) ≥ τ``."""
    tau = check_energy(tau)
    e = sorted_energy(s)
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # cum[-1] is 1 up to rounding; clamp so τ = 1 always resolves to some k ≤ r.
    k = int(torch.searchsorted(cum, torch.tensor(tau, dtype=cum.dtype) - 1e-12)) + 1
    return min(max(k, 1), e.numel())


def tail_share(s: Tensor, k: int) -> float:
    """Energy fraction held by the ``k`` smallest-magnitude directions."""
    e = sorted_energy(s)
    total = float(e.sum())
    return 0.0 if total == 0.0 or k <= 0 else float(e[-k:].sum()) / total


def tail_count(rank: int, fraction: float) -> int:
    """How many directions form the "tail" of a rank-``rank`` layer: ``max(1, round(fraction·rank))``."""
    return max(1, round(fraction * rank))


def energy_shares(s: Tensor) -> Tensor:
    """``sᵢ² / Σ sⱼ²`` sorted descending, float64 ``(r,)`` (all zeros for an all-zero ``s``).

    Scale-free: ``energy_shares(c·s) == energy_shares(s)``; the prefix sums are ``ρ(k)``.
    """
    e = sorted_energy(s)
    total = e.sum()
    return e / total if float(total) > 0.0 else e


def kept_tail_shares(s: Tensor, fraction: float) -> Tensor:
    """For every candidate rank ``k = 1..r``: the share of the energy *kept at rank k* that its own
    tail (the ``tail_count(k, fraction)`` smallest kept directions) holds. ``(r,) → (r,)`` float64,
    entry ``k−1`` for rank ``k``; the tail share a layer would show right after shrinking to ``k``."""
    e = sorted_energy(s)
    r = e.numel()
    cum = torch.cat([e.new_zeros(1), torch.cumsum(e, 0)])  # cum[k] = Σ_{i<k} e_i
    ks = torch.arange(1, r + 1)
    t = torch.tensor([tail_count(int(k), fraction) for k in ks])
    kept = cum[ks]
    tail = kept - cum[ks - t]
    return torch.where(kept > 0, tail / kept.clamp_min(torch.finfo(e.dtype).tiny), torch.zeros_like(kept))


def effective_rank(s: Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))`` with ``pᵢ = |sᵢ| / Σ|sⱼ|``."""
    a = s.detach().double().abs()
    total = float(a.sum())
    if total == 0.0:
        return 0.0
    p = a[a > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: Tensor) -> float:
    """``‖W‖_F² / ‖W‖_2² = Σ sᵢ² / max sᵢ²``."""
    e = s.detach().double().square()
    m = float(e.max()) if e.numel() else 0.0
    return 0.0 if m == 0.0 else float(e.sum()) / m
