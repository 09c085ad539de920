"""Whitened truncated SVD: optimal on the calibration inputs, in the engine's orthonormal form.

Tolerances: everything runs in float64 on O(1) data; the whitened SVD, triangular solve, QR and r×r
SVD each lose a few ulp times the condition number of the (well-conditioned, correlated but full-rank)
input second moment, so 1e-9 relative leaves orders of magnitude of headroom while a wrong orientation
or a dropped direction is off by O(1).
"""

from __future__ import annotations

import pytest
import torch

from tsvd.whitening import damped_cholesky, output_matching_weight, whitened_svd


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


def test_output_matching_weight_fits_the_dense_outputs_on_new_inputs():
    """``W*`` is the least-squares fit of the dense outputs ``W X`` from the new inputs ``X̃`` (float64:
    exact to ~1e-10), the error splits into the fit's residual plus a whitened term (so the whitened
    truncation of ``W*`` is the best rank-r weight for the dense outputs), and ``X̃ = X`` returns ``W``."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, dtype=torch.float64, generator=g)
    X = torch.randn(7, 200, dtype=torch.float64, generator=g)
    Xt = X + 0.3 * torch.randn(7, 200, dtype=torch.float64, generator=g)  # the inputs after truncated layers
    M, K = Xt @ Xt.T, Xt @ X.T
    best = output_matching_weight(W, M, K, damping=0.0)
    torch.testing.assert_close(best, torch.linalg.lstsq(Xt.T, (W @ X).T).solution.T, rtol=0, atol=1e-9)
    other = torch.randn(5, 7, dtype=torch.float64, generator=g)
    split = (W @ X - best @ Xt).square().sum() + ((best - other) @ Xt).square().sum()
    torch.testing.assert_close((W @ X - other @ Xt).square().sum(), split, rtol=1e-10, atol=0)
    torch.testing.assert_close(output_matching_weight(W, X @ X.T, X @ X.T, damping=0.0), W, rtol=0, atol=1e-9)
    r3 = whitened_svd(best, M, damping=0.0).weight(3)
    err = lambda V: float((W @ X - V @ Xt).square().sum())  # noqa: E731  (error on the dense outputs)
    assert err(r3) < err(whitened_svd(W, M, damping=0.0).weight(3))  # the own-weight truncation on X̃
    P, S, Qh = torch.linalg.svd(r3)
    for _ in range(5):  # nearby rank-3 weights do worse
        a = P[:, :3] * S[:3] + 0.01 * torch.randn(5, 3, dtype=torch.float64, generator=g)
        b = Qh[:3] + 0.01 * torch.randn(3, 7, dtype=torch.float64, generator=g)
        assert err(r3) < err(a @ b)


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
