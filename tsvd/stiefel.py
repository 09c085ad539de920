"""Retractions onto the Stiefel manifold {A : AᵀA = I} — pure functions on tensors.

Every function accepts a single matrix ``(m, r)`` or a batch ``(..., m, r)`` with ``m ≥ r`` and
returns ``Q`` with the same shape and orthonormal columns spanning the same space, together with the
upper-triangular ``R`` (positive diagonal) such that ``A = Q R``. With a positive-diagonal ``R`` the
QR factorization is unique, so every method returns the same ``Q`` up to rounding.

``orthonormalize`` is the one routine every caller uses: Cholesky-QR from the Gram matrix (cheap:
one small Cholesky and one GEMM), a second Cholesky pass when the input has drifted (CholeskyQR2),
and Householder QR for matrices whose Gram is too far from ``I`` (or not positive definite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Gram drift ``‖AᵀA − I‖_F`` above which a second Cholesky pass is made (CholeskyQR2).
REFINE_DRIFT = 1e-2
#: Gram drift above which Cholesky-QR is not trusted and Householder QR is used instead.
#: CholeskyQR2 loses orthogonality like ``κ(A)²·u``; drift 0.5 bounds κ² by 3 — far from trouble.
MAX_CHOLESKY_DRIFT = 0.5

METHODS = ("cholesky", "householder")


def gram(A: Tensor) -> Tensor:
    """``AᵀA``: ``(..., m, r) → (..., r, r)``."""
    return A.mT @ A


def drift(G: Tensor) -> Tensor:
    """Frobenius distance of a Gram matrix from the identity, per batch element: ``(..., r, r) → (...)``."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.linalg.matrix_norm(G - eye)


def orthonormality_error(A: Tensor) -> Tensor:
    """``‖AᵀA − I‖_F`` per batch element, computed in float64 for a trustworthy diagnostic."""
    return drift(gram(A.double()))


def householder_qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR with sign correction (SCT's retraction): ``R`` has a positive diagonal.

    The result is made contiguous (row-major): LAPACK returns ``Q`` column-major, which slows
    fused AdamW ~3× and breaks DeepSpeed's flattening.
    """
    Q, R = torch.linalg.qr(A, mode="reduced")
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    Q = (Q * sign.unsqueeze(-2)).contiguous()
    R = R * sign.unsqueeze(-1)
    return Q, R


def _cholesky_pass(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Cholesky-QR pass given ``G = AᵀA``: returns ``(Q, R, ok)``; ``ok`` flags batch elements
    whose Gram was positive definite. ``Q = A R⁻¹`` is formed with an explicit triangular inverse
    (a tiny ``r×r`` solve) and one GEMM, which is faster than a triangular solve against ``A``."""
    L, info = torch.linalg.cholesky_ex(G)
    ok = info == 0
    R = L.mT
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    return A @ R_inv, R, ok


def cholesky_qr(A: Tensor, G: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Cholesky-QR (CholeskyQR2 when ``A`` has drifted), returning ``(Q, R, ok)``.

    ``G`` may be passed when the caller already holds ``AᵀA`` (the retraction cache does). Elements
    with ``ok == False`` (Gram not positive definite) must be handled by the caller; ``orthonormalize``
    falls back to Householder QR for them.
    """
    if G is None:
        G = gram(A)
    Q, R, ok = _cholesky_pass(A, G)
    if bool((drift(G) > REFINE_DRIFT).any()):
        Q, R2, ok2 = _cholesky_pass(Q, gram(Q))
        R, ok = R2 @ R, ok & ok2
    return Q, R, ok


@dataclass(frozen=True)
class OrthoInfo:
    """What one ``orthonormalize`` call saw and did, per batch element.

    ``drift`` is ``‖AᵀA − I‖_F`` of the input (the cached Gram's distance from the manifold);
    ``householder`` marks the elements that fell back to Householder QR.
    """

    drift: Tensor
    householder: Tensor


def orthonormalize(
    A: Tensor, method: str = "cholesky", G: Tensor | None = None
) -> tuple[Tensor, OrthoInfo]:
    """Return ``Q`` (same shape as ``A``, contiguous, orthonormal columns, same span) and an ``OrthoInfo``.

    ``method="householder"`` is SCT's QR + sign correction for every matrix. ``method="cholesky"``
    uses Cholesky-QR(2) and falls back to Householder per batch element when the Gram drift exceeds
    ``MAX_CHOLESKY_DRIFT`` or the Cholesky factorization fails.
    """
    if method not in METHODS:
        raise ValueError(f"unknown retraction method {method!r}; expected one of {METHODS}")
    if A.dim() < 2 or A.shape[-2] < A.shape[-1]:
        raise ValueError(f"orthonormalize needs (..., m, r) with m >= r, got {tuple(A.shape)}")
    if G is None:
        G = gram(A)
    d = drift(G)
    if method == "householder":
        Q, _ = householder_qr(A)
        return Q, OrthoInfo(drift=d, householder=torch.ones_like(d, dtype=torch.bool))
    Q, _, ok = cholesky_qr(A, G)
    fallback = ~ok | (d > MAX_CHOLESKY_DRIFT) | ~torch.isfinite(Q).flatten(-2).all(-1)
    if bool(fallback.any()):
        if A.dim() == 2:
            Q, _ = householder_qr(A)
        else:
            Q = Q.clone()
            Q[fallback] = householder_qr(A[fallback])[0]
    return Q.contiguous(), OrthoInfo(drift=d, householder=fallback)
