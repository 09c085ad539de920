"""Activation-aware (whitened) truncated SVD of a linear layer's weight.

A layer ``y = W x`` (``W`` is ``out×in``) sees calibration inputs ``X`` (``in×N``) with second moment
``C = X Xᵀ``. The error a replacement ``W'`` causes on those inputs is
``‖(W − W') X‖_F² = tr((W − W') C (W − W')ᵀ) = ‖(W − W') L‖_F²`` for any ``C = L Lᵀ``. So the best
rank-``r`` ``W'`` on the calibration inputs is ``[W L]_r L⁻¹`` (Eckart–Young on ``W L``), and dropping the
whitened direction ``i`` costs exactly ``σᵢ²`` of output error: the truncation loss is the sum of the
discarded ``σᵢ²`` (SVD-LLM's result).

``whitened_svd`` computes that once per layer; ``WhitenedSVD.factors(r)`` returns the rank-``r`` weight in
the engine's form ``W' = V diag(s) Uᵀ`` with orthonormal ``U (in×r)``, ``V (out×r)`` and ``s ≥ 0``
descending (``tsvd.spectral.SpectralLinear``), through QRs of both factors and an ``r×r`` SVD.

When earlier layers are already truncated, a layer sees inputs ``X̃`` instead of the dense model's ``X``;
``output_matching_weight`` gives the weight whose outputs on ``X̃`` best match the dense outputs ``W X``,
and its whitened SVD (on ``X̃``'s moment) is then the best rank-``r`` replacement for that goal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DAMPING = 1e-6  # relative to mean(diag C): far below any direction the data uses, enough for Cholesky


def damped(C: Tensor, damping: float = DAMPING) -> Tensor:
    """``C + λ I`` (float64) with ``λ = damping · mean(diag C)``; an all-zero ``C`` (a layer that only saw
    zeros) gets ``λ = damping``."""
    C = C.double()
    scale = float(C.diagonal().mean()) if C.numel() else 0.0
    return C + damping * (scale if scale > 0 else 1.0) * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def damped_cholesky(C: Tensor, damping: float = DAMPING) -> Tensor:
    """Lower-triangular ``L`` with ``L Lᵀ = damped(C, damping)`` (float64). If that is still not positive
    definite in floating point (rank-deficient ``C``, rounding), the damping grows tenfold until the
    factorization succeeds."""
    while True:
        L, info = torch.linalg.cholesky_ex(damped(C, damping))
        if int(info) == 0:
            return L
        damping *= 10.0


@dataclass(frozen=True)
class WhitenedSVD:
    """``W L = P diag(σ) Qᵀ`` stored as ``P (out×k)``, ``σ (k)``, ``B = L⁻ᵀ Q (in×k)``, ``k = min(out, in)``,
    all float64: the rank-``r`` optimum on the calibration inputs is ``P_r diag(σ_r) B_rᵀ``."""

    P: Tensor
    sigma: Tensor
    B: Tensor
    orthonormal_P: bool = False  # P's columns orthonormal to rounding (eigenvectors), whatever σ

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    def direction_loss(self) -> Tensor:
        """``σᵢ²``: the calibration output error (``‖ΔW X‖_F²``) of dropping direction ``i``, descending."""
        return self.sigma.square()

    def truncation_loss(self, rank: int) -> float:
        """``‖(W − W'_r) X‖_F²`` of the rank-``rank`` optimum: the sum of the discarded ``σᵢ²``."""
        return float(self.sigma[rank:].square().sum())

    def reordered(self, order: Tensor) -> "WhitenedSVD":
        """The same directions in another order (``order`` a permutation of ``range(max_rank)``): keeping a
        prefix then keeps any chosen subset; its truncation loss is still the sum of the dropped ``σᵢ²``."""
        return WhitenedSVD(self.P[:, order], self.sigma[order], self.B[:, order], self.orthonormal_P)

    def weight(self, rank: int) -> Tensor:
        """The dense rank-``rank`` optimum ``W'`` (``out×in``, float64)."""
        return (self.P[:, :rank] * self.sigma[:rank]) @ self.B[:, :rank].T

    def factors(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (in×r), s (r), V (out×r))`` with ``W'_r = V diag(s) Uᵀ`` (the first ``r`` stored directions),
        ``UᵀU = VᵀV = I``, ``s`` descending.

        ``B_r = Q_B R_B`` (QR), ``diag(σ_r) R_Bᵀ = Pm diag(s) Qmᵀ`` (``r×r`` SVD); then ``V = P_r Pm``,
        ``U = Q_B Qm``: ``O((in + out)·r²)`` on top of the stored SVD. ``P_r`` is used as it is when its
        columns are orthonormal to rounding — eigenvectors, or ``A q / σ`` with every kept
        ``σ ≥ 1e-6·σ₁`` (error ``~1e-16·σ₁/σ``) — and replaced by the ``Q`` of its QR otherwise.
        """
        P = self.P[:, :rank]
        Rp = None
        if not (self.orthonormal_P or rank == 0 or bool(self.sigma[rank - 1] >= 1e-6 * self.sigma[0])):
            P, Rp = torch.linalg.qr(P)
        Qb, Rb = torch.linalg.qr(self.B[:, :rank])
        core = self.sigma[:rank, None] * Rb.T if Rp is None else (Rp * self.sigma[:rank]) @ Rb.T
        Pm, s, Qmh = torch.linalg.svd(core)
        return Qb @ Qmh.T, s, P @ Pm

def whitened_svd(W: Tensor, C: Tensor, damping: float = DAMPING) -> WhitenedSVD:
    """The SVD of ``A = W L`` (``W`` ``out×in``, input second moment ``C``, ``L Lᵀ = damped(C)``), mapped
    back by ``L⁻ᵀ``. Computed from the eigen-decomposition of the smaller Gram in float64, about half the
    time of a direct SVD at SmolLM2's shapes. ``σᵢ²`` are exact to ``~1e-16·σ₁²`` (``σᵢ`` to
    ``~1e-8·σ₁``): only directions far below anything a truncation keeps lose accuracy, and those of
    ``σᵢ ≤ 1e-13·σ₁`` get zero vectors; ``factors`` re-orthonormalizes what it keeps where needed.

    ``out < in``: ``A Aᵀ = W damped(C) Wᵀ = P diag(σ²) Pᵀ`` and ``B = L⁻ᵀ Aᵀ P / σ = Wᵀ P / σ`` (no
    Cholesky, no triangular solve); ``out ≥ in``: ``AᵀA = Q diag(σ²) Qᵀ``, ``P = A Q / σ``, ``B = L⁻ᵀ Q``."""
    W = W.detach().double()
    if C.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"second moment {tuple(C.shape)} does not fit a weight {tuple(W.shape)} (needs in×in)")
    C = C.to(W.device)
    wide = W.shape[0] < W.shape[1]
    if wide:
        gram = W @ damped(C, damping) @ W.T
    else:
        L = damped_cholesky(C, damping)
        A = W @ L
        gram = A.T @ A
    lam, vecs = torch.linalg.eigh(gram)
    lam, vecs = lam.flip(0).clamp_min(0), vecs.flip(1)
    sigma = lam.sqrt()
    inv = torch.where(sigma > sigma[:1] * 1e-13, 1.0 / sigma, torch.zeros_like(sigma))
    if wide:
        return WhitenedSVD(vecs, sigma, (W.T @ vecs) * inv, orthonormal_P=True)
    return WhitenedSVD((A @ vecs) * inv, sigma, torch.linalg.solve_triangular(L.T, vecs, upper=True))

def output_matching_weight(W: Tensor, M: Tensor, K: Tensor, damping: float = DAMPING) -> Tensor:
    """The weight ``W*`` (``out×in``, float64) whose outputs on the inputs ``X̃`` come closest to ``W``'s
    outputs on the inputs ``X`` it had in the dense model (``X``, ``X̃``: ``in×N``, the same tokens):
    ``argmin ‖W X − W* X̃‖_F = W Kᵀ M⁻¹`` with ``M = X̃ X̃ᵀ`` (damped as in ``damped_cholesky``) and the
    cross moment ``K = X̃ Xᵀ``.

    The least-squares residual is orthogonal to ``X̃``'s rows, so every ``W'`` has
    ``‖W X − W' X̃‖² = ‖W X − W* X̃‖² + ‖(W* − W') X̃‖²``: the best rank-``r`` ``W'`` for the dense outputs
    is ``whitened_svd(W*, M)``'s. With ``X̃ = X`` (no damping) ``W* = W``."""
    L = damped_cholesky(M, damping)
    return torch.cholesky_solve(K.double().to(L.device) @ W.detach().double().T, L).T
