"""Stiefel retractions: property tests over shapes, batches and Adam-sized perturbations.

Tolerances (fp32, eps ≈ 1.2e-7): Householder QR and CholeskyQR2 of a well-conditioned matrix give
‖QᵀQ − I‖_F ~ √r·(a few eps) ≲ 1e-6 for r ≤ 24; the perturbed inputs below have κ(A) ≲ 5 (Cholesky is
only used when ‖AᵀA − I‖_F ≤ 0.5, i.e. κ² ≤ 3), so forward errors stay ~κ·eps ≲ 1e-6. 1e-5 leaves an
order of magnitude of headroom and is still ~1000× below what a wrong retraction produces.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsvd.stiefel import (
    MAX_CHOLESKY_DRIFT,
    REFINE_DRIFT,
    cholesky_qr,
    drift,
    gram,
    householder_qr,
    orthonormality_error,
    orthonormalize,
    orthonormalize_each,
    orthonormalize_into,
)

TOL = 1e-5
# Deterministic (derandomize), no example database written into the repo, fast.
PROPS = settings(derandomize=True, max_examples=40, deadline=None, database=None)

# Adam's normalized update moves every entry by ≈ lr; the last two are "large" steps (lr·√rows
# relative: lr 1e-3 already moves 8192–28672-row factors by 9–17%); 3e-2 and 5e-2 push many inputs into CholeskyQR2 and
# past the Householder-fallback threshold.
LRS = [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 5e-2]


@st.composite
def perturbed_orthonormal(draw) -> tuple[torch.Tensor, float]:
    """``Q0 + lr·sign(noise)`` for a random orthonormal ``Q0`` of shape ``(m, r)`` or ``(B, m, r)``."""
    m = draw(st.integers(1, 300))
    r = draw(st.integers(1, min(m, 24)))
    batch = draw(st.sampled_from([(), (1,), (3,)]))
    lr = draw(st.sampled_from(LRS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    Q0 = householder_qr(torch.randn(*batch, m, r, generator=g))[0]
    return Q0 + lr * torch.randn(*batch, m, r, generator=g).sign(), lr


def batch_max(x: torch.Tensor) -> float:
    return float(x.max()) if x.dim() else float(x)


def frob(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two dims, per batch element."""
    return torch.linalg.matrix_norm(x.double())


def out_of_span(Q: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``‖(I − P_A) Q‖_F`` with ``P_A`` the float64 orthogonal projector onto span(A)."""
    B = torch.linalg.qr(A.double())[0]
    Q = Q.double()
    return frob(Q - B @ (B.mT @ Q))


@pytest.mark.parametrize("method", ["cholesky", "householder"])
@PROPS
@given(case=perturbed_orthonormal())
def test_orthonormalize_is_orthonormal_same_span_contiguous(method, case):
    A, _ = case
    Q, info = orthonormalize(A, method)
    assert Q.shape == A.shape and Q.dtype == A.dtype and Q.is_contiguous()
    assert batch_max(orthonormality_error(Q)) <= TOL
    assert batch_max(out_of_span(Q, A)) <= TOL
    torch.testing.assert_close(info.drift, drift(gram(A)))


@PROPS
@given(case=perturbed_orthonormal())
def test_cholesky_matches_sign_corrected_householder(case):
    A, _ = case
    Qc, info = orthonormalize(A, "cholesky")
    Qh, _ = householder_qr(A)
    # both are the unique Q of A = QR with diag(R) > 0
    assert float((Qc - Qh).abs().max()) <= TOL
    far = drift(gram(A)) > MAX_CHOLESKY_DRIFT
    assert torch.equal(info.householder, far)  # well-conditioned input: fallback exactly when far


@pytest.mark.parametrize("method", ["cholesky", "householder"])
@PROPS
@given(case=perturbed_orthonormal())
def test_idempotent_on_orthonormal_input(method, case):
    Q, _ = orthonormalize(case[0], method)
    Q2, info = orthonormalize(Q, method)
    assert float((Q2 - Q).abs().max()) <= TOL
    assert batch_max(info.drift) <= TOL


@PROPS
@given(case=perturbed_orthonormal())
def test_qr_factors_have_positive_diagonal_and_reproduce_input(case):
    A, _ = case
    for name, (Q, R) in {"householder": householder_qr(A), "cholesky": cholesky_qr(A)[:2]}.items():
        if name == "cholesky" and bool((drift(gram(A)) > MAX_CHOLESKY_DRIFT).any()):
            continue  # outside Cholesky's domain; orthonormalize falls back there
        assert R.shape == (*A.shape[:-2], A.shape[-1], A.shape[-1])
        assert torch.equal(torch.triu(R), R), name
        assert bool((torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()), name
        rel = frob(A - Q @ R) / frob(A)
        assert batch_max(rel) <= TOL, name


def test_cholesky_qr_reports_success_and_accepts_cached_gram():
    g = torch.Generator().manual_seed(0)
    A = householder_qr(torch.randn(4, 100, 8, generator=g))[0] + 1e-3 * torch.randn(4, 100, 8, generator=g).sign()
    Q1, R1, ok1 = cholesky_qr(A)
    Q2, R2, ok2 = cholesky_qr(A, gram(A))
    assert bool(ok1.all()) and torch.equal(ok1, ok2)
    torch.testing.assert_close(Q1, Q2, rtol=0, atol=0)


@pytest.mark.parametrize("target", [0.25, 0.75])  # fractions of the way from REFINE_DRIFT to MAX_CHOLESKY_DRIFT
def test_cholesky_qr2_range_stays_on_cholesky(target):
    """Drift between the refine and fallback thresholds: CholeskyQR2, no fallback, same Q as HH."""
    g = torch.Generator().manual_seed(5)
    m, r = 2000, 16
    want = REFINE_DRIFT + target * (MAX_CHOLESKY_DRIFT - REFINE_DRIFT)
    Q0 = householder_qr(torch.randn(m, r, generator=g))[0]
    # columns grown by a factor √(1+δ) (as Adam steps do) plus a small tilt: drift ≈ δ·√r
    A = Q0 * math.sqrt(1 + want / math.sqrt(r)) + 1e-4 * torch.randn(m, r, generator=g).sign()
    Q, info = orthonormalize(A, "cholesky")
    assert REFINE_DRIFT < float(info.drift) <= MAX_CHOLESKY_DRIFT
    assert not bool(info.householder)
    assert float(orthonormality_error(Q)) <= TOL
    assert float((Q - householder_qr(A)[0]).abs().max()) <= TOL


# ---------------------------------------------------------------------------------------------
# fallback to Householder


def test_fallback_for_nearly_rank_deficient_input():
    """Two nearly parallel columns: κ(A) ~ 1e4, so κ² exceeds 1/eps(fp32) and Cholesky-QR cannot be
    trusted; the Gram is far from I, so the Householder fallback must produce the result."""
    g = torch.Generator().manual_seed(1)
    A = householder_qr(torch.randn(200, 6, generator=g))[0]
    A[:, 5] = A[:, 0] + 1e-4 * torch.randn(200, generator=g)
    Q, info = orthonormalize(A, "cholesky")
    assert bool(info.householder) and float(info.drift) > MAX_CHOLESKY_DRIFT
    assert float(orthonormality_error(Q)) <= TOL
    torch.testing.assert_close(Q, householder_qr(A)[0], rtol=0, atol=0)
    assert float(out_of_span(Q, A)) <= 1e-3  # span of an ill-conditioned fp32 input: κ·eps ≈ 1e-3


def test_fallback_is_per_batch_element():
    g = torch.Generator().manual_seed(2)
    Q0 = householder_qr(torch.randn(3, 128, 8, generator=g))[0]
    A = Q0 + 1e-3 * torch.randn(3, 128, 8, generator=g).sign()
    A[1] *= 3.0  # Gram 9·I: drift 8·√8 ≫ 0.5
    Q, info = orthonormalize(A, "cholesky")
    assert info.householder.tolist() == [False, True, False]
    assert batch_max(orthonormality_error(Q)) <= TOL
    # the healthy elements are exactly what Cholesky-QR alone gives them
    torch.testing.assert_close(Q[0], orthonormalize(A[0], "cholesky")[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(Q[2], orthonormalize(A[2], "cholesky")[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(Q[1], householder_qr(A[1])[0], rtol=0, atol=0)


def test_float64_is_orthonormal_to_float64_precision():
    g = torch.Generator().manual_seed(3)
    A = householder_qr(torch.randn(500, 16, generator=g, dtype=torch.float64))[0]
    A = A + 1e-3 * torch.randn(500, 16, generator=g, dtype=torch.float64).sign()
    for method in ("cholesky", "householder"):
        Q, _ = orthonormalize(A, method)
        assert Q.dtype == torch.float64
        assert float(orthonormality_error(Q)) <= 1e-12  # eps(fp64) ≈ 2.2e-16, same headroom argument


# ---------------------------------------------------------------------------------------------
# diagnostics and argument validation


def test_gram_drift_and_orthonormality_error():
    Q = householder_qr(torch.randn(50, 4, generator=torch.Generator().manual_seed(4)))[0]
    assert gram(Q).shape == (4, 4)
    assert float(drift(torch.eye(4))) == 0.0
    # (2Q)ᵀ(2Q) − I = 3I, whose Frobenius norm is 3·√r
    assert float(orthonormality_error(2 * Q)) == pytest.approx(3 * math.sqrt(4), rel=1e-6)
    assert orthonormality_error(torch.stack([Q, 2 * Q])).shape == (2,)


def test_method_and_shape_validation():
    A = torch.randn(10, 3)
    with pytest.raises(ValueError, match="unknown retraction method"):
        orthonormalize(A, "qr")
    with pytest.raises(ValueError, match="m >= r"):
        orthonormalize(torch.randn(3, 10))
    with pytest.raises(ValueError, match="m >= r"):
        orthonormalize(torch.randn(10))


@pytest.mark.parametrize("m,r", [(16, 4), (300, 24)])  # below and above torch's small-GEMM kernel threshold
def test_batched_equals_per_matrix_bitwise_with_the_same_fallbacks(m, r):
    g = torch.Generator().manual_seed(1)
    A = householder_qr(torch.randn(6, m, r, generator=g))[0]
    A = A + 1e-3 * torch.randn(6, m, r, generator=g).sign()
    A[1] *= 1.3  # drift ≈ 0.69·√r: CholeskyQR2 (r=4) or Householder (r=24)
    A[2] *= 1.6  # drift > MAX_CHOLESKY_DRIFT: Householder
    A[3, :, 1] = A[3, :, 0]  # rank-deficient: Cholesky fails, Householder
    out = torch.empty_like(A)
    batched = orthonormalize_into(A, out)
    each = torch.empty_like(A)
    single = orthonormalize_each(list(A.unbind(0)), write=lambda i, Q: each[i].copy_(Q))
    assert torch.equal(out, each)
    assert torch.equal(batched.householder, single.householder) and torch.equal(batched.drift, single.drift)
    assert batched.householder[2] and batched.householder[3] and not batched.householder[0]
    assert batch_max(orthonormality_error(out)) <= TOL
