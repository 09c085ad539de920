"""Spectrum statistics: pure functions of s. Everything is computed in float64 by the module, so
hand-computed expectations are compared to 1e-12 relative (fp64 eps ≈ 2.2e-16, sums of ≤ 64 terms)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tsvd.errors import UserError
from tsvd.spectrum import (
    check_energy,
    effective_rank,
    energy,
    rank_for_energy,
    retained_fraction,
    sorted_energy,
    stable_rank,
    tail_share,
)

REL = 1e-12
S = torch.tensor([3.0, -4.0, 0.0, 1.0])  # unsorted, one negative, one zero: energies 9, 16, 0, 1 → 26


def test_energy_and_sorted_energy():
    assert energy(S) == 26.0
    assert sorted_energy(S).tolist() == [16.0, 9.0, 1.0, 0.0]
    assert sorted_energy(S).dtype == torch.float64
    assert energy(nn.Parameter(torch.tensor([1.0, 2.0]))) == 5.0  # works on parameters (detached)


def test_retained_fraction():
    assert retained_fraction(S, 0) == 0.0
    assert retained_fraction(S, 1) == pytest.approx(16 / 26, rel=REL)
    assert retained_fraction(S, 2) == pytest.approx(25 / 26, rel=REL)
    assert retained_fraction(S, 4) == 1.0
    assert retained_fraction(S, 10) == 1.0
    assert retained_fraction(torch.zeros(5), 2) == 1.0


def test_rank_for_energy_edge_cases():
    assert rank_for_energy(S, 0.5) == 1  # 16/26 ≥ 0.5
    assert rank_for_energy(S, 0.9) == 2  # 25/26
    assert rank_for_energy(S, 0.97) == 3  # 26/26; the zero direction is never needed
    assert rank_for_energy(S, 1.0) == 3
    assert rank_for_energy(torch.tensor([2.0, 1.0, 0.5]), 1.0) == 3  # τ = 1 keeps every nonzero direction
    assert rank_for_energy(torch.zeros(6), 0.9) == 1
    assert rank_for_energy(torch.tensor([5.0]), 1.0) == 1
    assert rank_for_energy(torch.tensor([0.1, 0.2, -10.0]), 0.99) == 1  # order and sign do not matter
    assert rank_for_energy(S, 1e-9) == 1


@pytest.mark.parametrize("i", range(1, 11))
def test_rank_for_energy_exact_boundaries(i):
    """Ten equal directions: ρ(k) = k/10 exactly, so τ = i/10 must give exactly i (no off-by-one
    at the boundary, in either direction)."""
    assert rank_for_energy(torch.ones(10), i / 10) == i


def test_rank_for_energy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        s = torch.randn(int(torch.randint(1, 64, (1,), generator=g)), generator=g) ** 3
        e = s.double().square().sort(descending=True).values
        cum = (e.cumsum(0) / e.sum()).tolist()
        for tau in torch.rand(10, generator=g, dtype=torch.float64).tolist() + [1.0]:
            k = rank_for_energy(s, tau)
            expected = next((j + 1 for j, c in enumerate(cum) if c >= tau - 1e-12), len(cum))
            assert k == expected, (trial, tau)
            assert retained_fraction(s, k) >= tau - 1e-12
            assert k == 1 or retained_fraction(s, k - 1) < tau


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_invalid_energy_is_a_user_error(tau):
    with pytest.raises(UserError, match=r"in \(0, 1\]"):
        rank_for_energy(S, tau)
    with pytest.raises(UserError):
        check_energy(tau)


def test_check_energy_accepts_valid_values():
    assert check_energy(1) == 1.0
    assert check_energy(0.25) == 0.25


def test_tail_share():
    assert tail_share(S, 0) == 0.0
    assert tail_share(S, 1) == 0.0  # the smallest direction is the zero one
    assert tail_share(S, 2) == pytest.approx(1 / 26, rel=REL)
    assert tail_share(S, 3) == pytest.approx(10 / 26, rel=REL)
    assert tail_share(S, 4) == pytest.approx(1.0, rel=REL)
    assert tail_share(torch.zeros(3), 2) == 0.0
    # complementary to the retained fraction
    assert tail_share(S, 2) + retained_fraction(S, 2) == pytest.approx(1.0, rel=REL)


@pytest.mark.parametrize("r", [1, 5, 64])
def test_effective_rank_of_uniform_spectrum_is_r(r):
    assert effective_rank(torch.full((r,), 0.3)) == pytest.approx(r, rel=REL)
    assert effective_rank(-torch.ones(r)) == pytest.approx(r, rel=REL)


def test_effective_rank_properties():
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0, rel=REL)
    assert effective_rank(torch.tensor([7.0, 0.0, 0.0])) == pytest.approx(1.0, rel=REL)
    assert effective_rank(torch.zeros(4)) == 0.0
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s.double() / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=REL)
    assert effective_rank(10 * s) == pytest.approx(effective_rank(s), rel=REL)  # scale invariant
    assert 1.0 < effective_rank(s) < 4.0


def test_stable_rank():
    assert stable_rank(torch.ones(8)) == pytest.approx(8.0, rel=REL)
    assert stable_rank(torch.tensor([2.0, -1.0])) == pytest.approx(5 / 4, rel=REL)
    assert stable_rank(S) == pytest.approx(26 / 16, rel=REL)
    assert stable_rank(torch.zeros(3)) == 0.0
    assert stable_rank(torch.zeros(0)) == 0.0
