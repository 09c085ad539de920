"""Whitened truncated SVD: optimal on the calibration inputs, in the engine's orthonormal form.

Tolerances: everything runs in float64 on O(1) data; the whitened SVD, triangular solve, QR and r×r
SVD each lose a few ulp times the condition number of the (well-conditioned, correlated but full-rank)
input second moment, so 1e-9 relative leaves orders of magnitude of headroom while a wrong orientation
or a dropped direction is off by O(1).
"""

from __future__ import annotations

import pytest
import torch

from tsvd.whitening import ProjectedMoment, damped_cholesky, shrunk, whitened_svd


def problem(out_f: int = 10, in_f: int = 14, n: int = 200, seed: int = 0):
    """A weight and strongly anisotropic, correlated inputs (so whitening matters)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) * torch.logspace(0, -2, in_f, dtype=torch.float64)
    X = mix @ torch.randn(in_f, n, generator=g, dtype=torch.float64)  # in×N
    return W, X


def test_truncation_loss_is_the_calibration_output_error_and_beats_plain_svd():
    W, X = problem()
    ws = whitened_svd(W, X @ X.T, damping=0.0)
    P, S, Qh = torch.linalg.svd(W, full_matrices=False)
    for r in (1, 4, 7, 10):
        err = float(((W - ws.weight(r)) @ X).square().sum())
        assert err == pytest.approx(ws.truncation_loss(r), rel=1e-9, abs=1e-9)
        assert ws.truncation_loss(r) == pytest.approx(float(ws.direction_loss()[r:].sum()), rel=1e-12)
        plain = (P[:, :r] * S[:r]) @ Qh[:r]
        plain_err = float(((W - plain) @ X).square().sum())
        if r < 10:
            assert err < 0.9 * plain_err  # anisotropic inputs: whitening is much better
    assert ws.truncation_loss(10) == 0.0


def test_whitened_truncation_is_the_optimum_among_rank_r_weights():
    W, X = problem(seed=1)
    ws = whitened_svd(W, X @ X.T, damping=0.0)
    r = 4
    best = ws.truncation_loss(r)
    g = torch.Generator().manual_seed(2)
    W_r = ws.weight(r)
    for _ in range(20):  # rank-r perturbations of the optimum only make it worse
        A = torch.randn(W.shape[0], r, generator=g, dtype=torch.float64)
        Bm = torch.randn(r, W.shape[1], generator=g, dtype=torch.float64)
        U, s, V = ws.factors(r)
        cand = (V @ torch.diag(s) + 1e-3 * A) @ (U.T + 1e-3 * Bm)
        assert float(((W - cand) @ X).square().sum()) >= best * (1 - 1e-12)
    assert torch.linalg.matrix_rank(W_r) == r


@pytest.mark.parametrize("out_f, in_f", [(10, 14), (14, 10)])
def test_factors_are_orthonormal_and_reproduce_the_truncated_weight(out_f, in_f):
    W, X = problem(out_f, in_f, seed=3)
    ws = whitened_svd(W, X @ X.T)
    for r in (1, 5, min(out_f, in_f)):
        U, s, V = ws.factors(r)
        assert U.shape == (in_f, r) and V.shape == (out_f, r) and s.shape == (r,)
        eye = torch.eye(r, dtype=torch.float64)
        torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-12)
        assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())
        torch.testing.assert_close((V * s) @ U.T, ws.weight(r), rtol=1e-9, atol=1e-9)
        # the engine's forward ((x @ U) * s) @ Vᵀ is W' x for row inputs
        x = X.T[:3]
        torch.testing.assert_close(((x @ U) * s) @ V.T, x @ ws.weight(r).T, rtol=1e-9, atol=1e-9)


def test_full_rank_reproduces_the_weight():
    W, X = problem(seed=4)
    ws = whitened_svd(W, X @ X.T)
    torch.testing.assert_close(ws.weight(10), W, rtol=1e-9, atol=1e-9)


def test_damping_rescues_a_singular_second_moment():
    W, X = problem(in_f=14, n=5)  # 5 samples: C has rank 5 of 14
    C = X @ X.T
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(C - 1e-9 * torch.eye(14, dtype=torch.float64))
    L = damped_cholesky(C)
    lam = float((L @ L.T - C).diagonal().mean())
    assert 0 < lam <= 1e-3 * float(C.diagonal().mean())
    ws = whitened_svd(W, C)
    # only 5 input directions were seen: rank 5 already reproduces the outputs on them
    assert ws.truncation_loss(5) < 1e-6 * float((W @ X).square().sum())
    assert torch.isfinite(ws.B).all()
    L0 = damped_cholesky(torch.zeros(3, 3, dtype=torch.float64))
    assert torch.allclose(L0 @ L0.T, 1e-6 * torch.eye(3, dtype=torch.float64))


def test_shape_mismatch_is_refused():
    W, X = problem()
    with pytest.raises(ValueError, match="does not fit"):
        whitened_svd(W.T, X @ X.T)


@pytest.mark.parametrize("out_f, in_f", [(8, 5), (5, 8)])
def test_factors_stay_orthonormal_past_the_weights_rank(out_f, in_f):
    """A rank-2 weight kept at full rank: the directions past its rank have σ ≈ 0 and no meaningful
    vectors, yet the factors are orthonormal and still reproduce the weight."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(out_f, 2, dtype=torch.float64, generator=g) @ torch.randn(2, in_f, dtype=torch.float64, generator=g)
    X = torch.randn(in_f, 50, dtype=torch.float64, generator=g)
    ws = whitened_svd(W, X @ X.T)
    assert float(ws.sigma[2]) < 1e-6 * float(ws.sigma[0])
    U, s, V = ws.factors(5)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close((V * s) @ U.T, W, rtol=0, atol=1e-9)


def curvature(out_f: int, seed: int) -> torch.Tensor:
    """An anisotropic, correlated output-gradient moment ``Σ g gᵀ`` of full rank."""
    g = torch.Generator().manual_seed(seed)
    Gr = torch.randn(out_f, 3 * out_f, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, out_f,
                                                                                          dtype=torch.float64)[:, None]
    return Gr @ Gr.T


def kfac_error(W: torch.Tensor, W2: torch.Tensor, C: torch.Tensor, G: torch.Tensor) -> float:
    """The K-FAC loss estimate ``tr(ΔW C ΔWᵀ G)`` of replacing ``W`` by ``W2``."""
    D = W - W2
    return float(torch.trace(D @ C @ D.T @ G))


@pytest.mark.parametrize("out_f, in_f", [(10, 14), (14, 10)])
def test_curvature_weighted_truncation_is_the_optimum_of_the_kfac_loss(out_f, in_f):
    """Both sides whitened: the truncation loss is ``tr(ΔW C ΔWᵀ G̃)`` exactly, the rank-r weight beats
    the input-only whitened truncation and nearby rank-r weights on it, and the factors are orthonormal."""
    W, X = problem(out_f, in_f, seed=5)
    C, G = X @ X.T, curvature(out_f, 6)
    Gt = shrunk(G, 0.3)
    ws = whitened_svd(W, C, damping=0.0, curvature=G, shrinkage=0.3)
    one_sided = whitened_svd(W, C, damping=0.0)
    g = torch.Generator().manual_seed(8)
    for r in (1, 4, 7):
        best = kfac_error(W, ws.weight(r), C, Gt)
        assert best == pytest.approx(ws.truncation_loss(r), rel=1e-9)
        assert best < kfac_error(W, one_sided.weight(r), C, Gt)
        U, s, V = ws.factors(r)
        eye = torch.eye(r, dtype=torch.float64)
        torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-12)
        assert bool((s[:-1] >= s[1:]).all())
        torch.testing.assert_close((V * s) @ U.T, ws.weight(r), rtol=1e-9, atol=1e-9)
        for _ in range(10):
            cand = (V * s + 1e-3 * torch.randn(out_f, r, generator=g, dtype=torch.float64)) @ \
                (U.T + 1e-3 * torch.randn(r, in_f, generator=g, dtype=torch.float64))
            assert kfac_error(W, cand, C, Gt) >= best * (1 - 1e-12)
    torch.testing.assert_close(ws.weight(min(out_f, in_f)), W, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("out_f, in_f", [(10, 14), (14, 10)])
def test_isotropic_curvature_is_the_input_whitened_svd_scaled(out_f, in_f):
    """``G = c·I`` (or full shrinkage of any ``G`` with mean diagonal ``c``) keeps the input-whitened
    directions and multiplies every ``σᵢ²`` by ``c``: the curvature only ranks layers against each other."""
    W, X = problem(out_f, in_f, seed=9)
    C = X @ X.T
    G = curvature(out_f, 10)
    c = float(G.diagonal().mean())
    plain = whitened_svd(W, C)
    for ws in (whitened_svd(W, C, curvature=c * torch.eye(out_f, dtype=torch.float64), shrinkage=0.0),
               whitened_svd(W, C, curvature=G, shrinkage=1.0)):
        # G̃'s Cholesky (wide weights) adds the relative damping 1e-6·mean(diag)·I: σᵢ² off by ≤ 1e-6 relative
        torch.testing.assert_close(ws.direction_loss(), c * plain.direction_loss(), rtol=3e-6, atol=0)
        for r in (2, 5):
            torch.testing.assert_close(ws.weight(r), plain.weight(r), rtol=1e-6, atol=1e-8)


def test_bad_curvature_is_refused():
    W, X = problem()
    with pytest.raises(ValueError, match="curvature .* does not fit"):
        whitened_svd(W, X @ X.T, curvature=torch.eye(W.shape[1], dtype=torch.float64))
    with pytest.raises(ValueError, match="shrinkage must be in"):
        shrunk(torch.eye(3), 1.5)


@pytest.mark.parametrize("with_curvature", [False, True])
def test_a_wide_layers_projected_moment_gives_the_same_svd(with_curvature):
    """``W C Wᵀ`` and ``tr C`` are all a wide layer's whitened SVD reads of ``C`` (damping included)."""
    W, X = problem(out_f=6, in_f=14)
    C = X @ X.T
    G = curvature(6, seed=3) if with_curvature else None
    full = whitened_svd(W, C, curvature=G)
    proj = whitened_svd(W, ProjectedMoment((W @ X) @ (W @ X).T, float(C.trace()), 14), curvature=G)
    torch.testing.assert_close(proj.sigma, full.sigma, rtol=1e-9, atol=1e-12 * float(full.sigma[0]))
    for r in (1, 3, 6):
        torch.testing.assert_close(proj.weight(r), full.weight(r), rtol=1e-9, atol=1e-9)
    Wt, Xt = problem(out_f=14, in_f=6)  # tall: its SVD needs C itself
    with pytest.raises(ValueError, match="needs a wide weight"):
        whitened_svd(Wt, ProjectedMoment((Wt @ Xt) @ (Wt @ Xt).T, float((Xt @ Xt.T).trace()), 6))
    with pytest.raises(ValueError, match="needs a wide weight"):
        whitened_svd(W, ProjectedMoment(torch.eye(5, dtype=torch.float64), 1.0, 14))


def test_a_tall_layers_projected_curvature_gives_the_same_svd():
    """``Wᵀ G W`` and ``tr G`` are all a tall layer's curvature-weighted SVD reads of ``G`` (shrinkage
    included)."""
    W, X = problem(out_f=14, in_f=6)
    C, G = X @ X.T, curvature(14, seed=5)
    for alpha in (0.0, 0.5, 1.0):
        full = whitened_svd(W, C, curvature=G, shrinkage=alpha)
        proj = whitened_svd(W, C, curvature=ProjectedMoment(W.T @ G @ W, float(G.trace()), 14), shrinkage=alpha)
        torch.testing.assert_close(proj.sigma, full.sigma, rtol=1e-9, atol=1e-12 * float(full.sigma[0]))
        for r in (1, 3, 6):
            torch.testing.assert_close(proj.weight(r), full.weight(r), rtol=1e-9, atol=1e-9)
    Ww, Xw = problem(out_f=6, in_f=14)  # wide: its SVD needs G itself
    with pytest.raises(ValueError, match="needs a tall weight"):
        whitened_svd(Ww, Xw @ Xw.T, curvature=ProjectedMoment(torch.eye(14, dtype=torch.float64), 1.0, 6))
    with pytest.raises(ValueError, match="needs a tall weight"):
        whitened_svd(W, C, curvature=ProjectedMoment(torch.eye(6, dtype=torch.float64), 1.0, 13))
