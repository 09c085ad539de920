"""Retractions onto the Stiefel manifold {A : AᵀA = I} — pure functions on tensors.

Every function accepts a single matrix ``(m, r)`` or a batch ``(..., m, r)`` with ``m ≥ r`` and
returns ``Q`` with the same shape and orthonormal columns spanning the same space, together with the
upper-triangular ``R`` (positive diagonal) such that ``A = Q R``. With a positive-diagonal ``R`` the
QR factorization is unique, so every method returns the same ``Q`` up to rounding.

Two routines do the work, with the same paths and fallbacks: ``orthonormalize_into`` for a stack
``(n, m, r)`` (one batched Gram, one batched Cholesky + triangular inverse, one batched GEMM into a
caller's buffer: the floor of the arithmetic, ``4·m·r²`` flops per matrix) and ``orthonormalize_each``
for a list of separate same-shape matrices that must not be stacked (one Gram and one GEMM each into a
reused scratch buffer; the small ``r×r`` work still batched). Paths per matrix, by its Gram drift: one
Cholesky-QR pass; a second pass when it has drifted far (CholeskyQR2); Householder QR when the Gram is
too far from ``I`` (or not positive definite). ``orthonormalize`` is the stacked-tensor front end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

#: Gram drift ``‖AᵀA − I‖_F`` above which a second Cholesky pass is made (CholeskyQR2).
#: One pass loses orthogonality like ``κ(A)²·u``; drift ≤ 0.5 bounds κ² by 3, and one pass was
#: measured as orthonormal as Householder QR there (at the 70B shapes; docs/performance.md):
#: a second pass would double the cost for nothing.
REFINE_DRIFT = 0.5
#: Gram drift above which Cholesky-QR is not trusted and Householder QR is used instead.
#: Drift 0.9 bounds κ² by 19, where CholeskyQR2 is as accurate as Householder (stable to κ ≈ u^-½).
MAX_CHOLESKY_DRIFT = 0.9

METHODS = ("cholesky", "householder")


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` for matrices or stacks, a single matrix computed as a stack of one: torch picks its GEMM
    kernel by the size of each product (a tiny one takes a different kernel from ``mm``), so a matrix
    gets the same bits whether it is retracted alone or in a stack."""
    if a.dim() > 2:
        return torch.matmul(a, b, out=out)
    return torch.matmul(a[None], b[None], out=None if out is None else out[None])[0]


def gram(A: Tensor, out: Tensor | None = None) -> Tensor:
    """``AᵀA``: ``(..., m, r) → (..., r, r)`` (into ``out`` when given), in ``A``'s dtype.

    A float32 ``A`` on CUDA is accumulated in float64: cuBLAS's batched float32 GEMMs sum the long
    reduction over ``m`` with errors large enough to leave the retracted factors outside the float32
    orthonormality tolerance (docs/gpu.md), and Hopper-class GPUs run float64 GEMMs at their float32
    rate. On the CPU the float32 product is accurate and stays as it is."""
    if A.is_cuda and A.dtype == torch.float32:
        D = A.double()
        G = matmul(D.mT, D)
        return G.float() if out is None else out.copy_(G)
    return matmul(A.mT, A, out=out)


def drift(G: Tensor) -> Tensor:
    """Frobenius distance of a Gram matrix from the identity, per batch element: ``(..., r, r) → (...)``."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.linalg.matrix_norm(G - eye)


def orthonormality_error(A: Tensor) -> Tensor:
    """``‖AᵀA − I‖_F`` per batch element, computed in float64 for a trustworthy diagnostic."""
    return drift(gram(A.detach().double()))


def householder_qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR with sign correction (SCT's retraction): ``R`` has a positive diagonal.

    The result is made contiguous (row-major): LAPACK returns ``Q`` column-major, which slows
    fused AdamW and breaks DeepSpeed's flattening.
    """
    Q, R = torch.linalg.qr(A, mode="reduced")
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    Q = (Q * sign.unsqueeze(-2)).contiguous()
    R = R * sign.unsqueeze(-1)
    return Q, R


def cholesky_r(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(R, R⁻¹, ok)`` with ``G = RᵀR``, ``R`` upper triangular (positive diagonal), for a (batch of)
    small ``r×r`` Gram matrices; ``ok`` flags the elements whose Gram was positive definite.

    The explicit inverse turns ``Q = A R⁻¹`` into one GEMM, faster than a triangular solve
    against the tall ``A``."""
    L, info = torch.linalg.cholesky_ex(G)
    R = L.mT
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    return R, torch.linalg.solve_triangular(R, eye, upper=True), info == 0


@dataclass(frozen=True)
class OrthoInfo:
    """What one ``orthonormalize`` call saw and did, per batch element.

    ``drift`` is ``‖AᵀA − I‖_F`` of the input (the cached Gram's distance from the manifold);
    ``householder`` marks the elements that fell back to Householder QR.
    """

    drift: Tensor
    householder: Tensor


def _paths(G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(drift, R⁻¹, fallback, refine)`` for a stack of Grams ``(n, r, r)``: ``fallback`` marks the
    matrices for Householder QR (Cholesky failed, drift above ``MAX_CHOLESKY_DRIFT`` or not finite),
    ``refine`` those for a second Cholesky pass (drift above ``REFINE_DRIFT``, not falling back)."""
    d = drift(G)
    _, R_inv, ok = cholesky_r(G)
    fallback = ~ok | ~(d <= MAX_CHOLESKY_DRIFT)  # `~(d <= …)` is also True for a NaN drift
    return d, R_inv, fallback, (d > REFINE_DRIFT) & ~fallback


def _second_pass(Q: Tensor, out: Tensor) -> bool:
    """CholeskyQR2's second pass on the nearly orthonormal first result ``Q (m, r)``, into ``out``
    (which must not overlap ``Q``); False (``out`` untouched) when its Cholesky fails."""
    _, R2_inv, ok = cholesky_r(gram(Q))
    if not bool(ok):
        return False
    matmul(Q, R2_inv, out=out)
    return True


def orthonormalize_into(A: Tensor, out: Tensor, G: Tensor | None = None) -> OrthoInfo:
    """``out[i] = Q`` of ``A[i]`` for a stack ``A (n, m, r)`` (``m ≥ r``); ``out`` has ``A``'s shape and
    dtype, is contiguous and must not overlap ``A`` (which is left unchanged).

    One batched Gram (``G``, ``(n, r, r)``, may be passed when already known), one batched Cholesky and
    triangular inverse, one batched GEMM ``A R⁻¹`` into ``out``: ``4·m·r²`` flops per matrix and no
    other full-size work. The rare matrices that need CholeskyQR2 or Householder QR (see
    ``orthonormalize_each`` for the thresholds) are then redone one at a time.
    """
    if G is None:
        G = gram(A)
    d, R_inv, fallback, refine = _paths(G)
    matmul(A, R_inv, out=out)
    if bool((fallback | refine).any()):
        scratch = torch.empty_like(out[0])
        for i in refine.nonzero().flatten().tolist():
            if _second_pass(out[i], scratch):
                out[i].copy_(scratch)
            else:
                fallback[i] = True
        for i in fallback.nonzero().flatten().tolist():
            out[i].copy_(householder_qr(A[i])[0])
    return OrthoInfo(drift=d, householder=fallback)


def _cholesky_pass(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Cholesky-QR pass given ``G = AᵀA``: returns ``(Q, R, ok)``."""
    R, R_inv, ok = cholesky_r(G)
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


def orthonormalize_each(
    As: Sequence[Tensor],
    method: str = "cholesky",
    G: Tensor | None = None,
    write: Callable[[int, Tensor], None] | None = None,
) -> OrthoInfo:
    """Orthonormalize each matrix of ``As`` (same shape ``(m, r)``, dtype and device; ``m ≥ r``) and
    call ``write(i, Q)`` with the result for ``As[i]``. Returns an ``OrthoInfo`` over the list.

    ``Q`` is contiguous (row-major) and lives in a scratch buffer reused for the next matrix: ``write``
    must copy it (``param.copy_(Q)``), not keep it. Nothing is stacked: the only full-size allocations
    are one or two ``(m, r)`` buffers for the whole list (plus Householder's own for fallbacks).

    ``G`` (stacked ``(len(As), r, r)``) may be passed when the caller already holds the Grams; the
    same Grams give the drift, decide the path per matrix and feed the Cholesky factorization, so
    nothing is factorized twice. Paths per matrix, by drift ``‖AᵀA − I‖_F``: ≤ ``REFINE_DRIFT``: one
    Cholesky-QR pass; ≤ ``MAX_CHOLESKY_DRIFT``: CholeskyQR2; above, or Cholesky failed, or the Gram is
    not finite: Householder QR. ``method="householder"`` uses Householder QR (SCT) for every matrix.
    """
    if method not in METHODS:
        raise ValueError(f"unknown retraction method {method!r}; expected one of {METHODS}")
    if not As:
        empty = torch.zeros(0)
        return OrthoInfo(drift=empty, householder=empty.bool())
    A0 = As[0]
    if A0.dim() != 2 or A0.shape[0] < A0.shape[1]:
        raise ValueError(f"orthonormalize needs (..., m, r) with m >= r, got {tuple(A0.shape)}")
    if write is None:
        raise ValueError("orthonormalize_each needs a write(i, Q) callback")
    if G is None:
        G = A0.new_empty(len(As), A0.shape[1], A0.shape[1])
        for A, Gi in zip(As, G.unbind(0)):
            gram(A, out=Gi)
    if method == "householder":
        for i, A in enumerate(As):
            write(i, householder_qr(A)[0])
        d = drift(G)
        return OrthoInfo(drift=d, householder=torch.ones_like(d, dtype=torch.bool))
    d, R_inv, fallback, refine = _paths(G)
    buf = torch.empty_like(A0, memory_format=torch.contiguous_format)
    buf2 = torch.empty_like(buf) if bool(refine.any()) else None
    for i, (A, Ri, fb, rf) in enumerate(zip(As, R_inv.unbind(0), fallback.tolist(), refine.tolist())):
        if fb:
            write(i, householder_qr(A)[0])
            continue
        Q = matmul(A, Ri, out=buf)
        if rf:
            if not _second_pass(Q, buf2):
                fallback[i] = True
                write(i, householder_qr(A)[0])
                continue
            Q = buf2
        write(i, Q)
    return OrthoInfo(drift=d, householder=fallback)


def orthonormalize(
    A: Tensor, method: str = "cholesky", G: Tensor | None = None
) -> tuple[Tensor, OrthoInfo]:
    """Return ``Q`` (same shape as ``A``, contiguous, orthonormal columns, same span) and an ``OrthoInfo``.

    ``A`` is one matrix ``(m, r)`` or a stack ``(..., m, r)``; ``G`` its Gram(s) if already known.
    ``method="householder"`` is SCT's QR + sign correction for every matrix. ``method="cholesky"``
    uses batched Cholesky-QR(2) (``orthonormalize_into``) and falls back to Householder per matrix.
    """
    if method not in METHODS:
        raise ValueError(f"unknown retraction method {method!r}; expected one of {METHODS}")
    if A.dim() < 2 or A.shape[-2] < A.shape[-1]:
        raise ValueError(f"orthonormalize needs (..., m, r) with m >= r, got {tuple(A.shape)}")
    m, r = A.shape[-2:]
    batch = A.shape[:-2]
    flat = A.reshape(-1, m, r)
    Gs = None if G is None else G.reshape(-1, r, r)
    Q = torch.empty(flat.shape, dtype=A.dtype, device=A.device)
    if method == "householder":
        info = orthonormalize_each(list(flat.unbind(0)), method, Gs, lambda i, Qi: Q[i].copy_(Qi))
    else:
        info = orthonormalize_into(flat, Q, Gs)
    return Q.reshape(A.shape), OrthoInfo(drift=info.drift.reshape(batch), householder=info.householder.reshape(batch))
