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

The model's loss weighs output errors unequally. With the layer's output-gradient moment ``G = Σ g gᵀ``
(``g = ∂loss/∂y``) the Kronecker-factored (K-FAC) second-order estimate of the loss a change ``ΔW`` causes
is ``∝ tr(ΔW C ΔWᵀ G)`` (Fisher ``≈ C ⊗ G``). ``whitened_svd(W, C, curvature=G)`` whitens both sides:
with ``G̃ = R Rᵀ`` the best rank-``r`` ``W'`` for that estimate is ``R⁻ᵀ [Rᵀ W L]_r L⁻¹`` and each ``σᵢ²``
is the estimated loss of dropping direction ``i`` — comparable across layers, so a global budget can
rank the directions of every layer by it (GFWSVD's generalization of Fisher-weighted SVD, with the
Kronecker factors taken from K-FAC). ``G`` from a few hundred tokens is noisy and rank-deficient, so it
is shrunk towards its isotropic mean: ``G̃ = (1 − α) G + α · mean(diag G) · I`` (``α = 1`` weighs every
output alike, the plain whitened SVD scaled by the layer's mean curvature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

DAMPING = 1e-6  # relative to mean(diag C): far below any direction the data uses, enough for Cholesky
SHRINKAGE = 0.5  # α of the output curvature's shrinkage (docs/hf.md: chosen on SmolLM2's validation text)


@dataclass(frozen=True)
class ProjectedMoment:
    """A second moment ``M`` (``dim×dim``) in the only form a whitened SVD reads it when ``M`` lives on the
    weight's larger side: ``gram`` (float64) is ``M`` carried through ``W`` to the smaller side and
    ``trace = tr M`` (for the damping or the shrinkage). A wide layer's (``out < in``) input moment ``C``:
    ``gram = W C Wᵀ`` (``out×out``, ``Σ y yᵀ`` of the outputs without bias), ``dim = in``; a tall layer's
    (``out > in``) output-gradient moment ``G``: ``gram = Wᵀ G W`` (``in×in``, ``Σ (Wᵀg)(Wᵀg)ᵀ``),
    ``dim = out``. Accumulating it costs ``min(in, out)²`` per row instead of ``max(in, out)²``."""

    gram: Tensor
    trace: float
    dim: int


def damping_value(mean_diag: float, damping: float = DAMPING) -> float:
    """``λ = damping · mean(diag C)``; ``damping`` itself for an all-zero ``C`` (a layer that only saw zeros)."""
    return damping * (mean_diag if mean_diag > 0 else 1.0)


def damped(C: Tensor, damping: float = DAMPING) -> Tensor:
    """``C + λ I`` (float64, ``λ = damping_value(mean(diag C))``)."""
    C = C.double()
    lam = damping_value(float(C.diagonal().mean()) if C.numel() else 0.0, damping)
    return C + lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def damped_projection(W: Tensor, C: Tensor | ProjectedMoment, damping: float = DAMPING) -> Tensor:
    """``W damped(C) Wᵀ`` (``out×out``, float64; ``W`` float64), from ``C`` or its projected form."""
    if not isinstance(C, ProjectedMoment):
        return W @ damped(C.to(W.device), damping) @ W.T
    return C.gram.to(W) + damping_value(C.trace / C.dim, damping) * (W @ W.T)


def check_shrinkage(shrinkage: float) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")


def shrunk_projection(W: Tensor, G: ProjectedMoment, shrinkage: float = SHRINKAGE) -> Tensor:
    """``Wᵀ shrunk(G, shrinkage) W`` (``in×in``, float64; ``W`` float64) from ``G``'s projected form."""
    check_shrinkage(shrinkage)
    return (1.0 - shrinkage) * G.gram.to(W) + shrinkage * (G.trace / G.dim) * (W.T @ W)


def shrunk(G: Tensor, shrinkage: float = SHRINKAGE) -> Tensor:
    """``(1 − α) G + α · mean(diag G) · I`` (float64, ``α = shrinkage`` in [0, 1]): the curvature estimate
    pulled towards its isotropic mean, keeping its trace (so layers stay comparable)."""
    check_shrinkage(shrinkage)
    G = G.double()
    return (1.0 - shrinkage) * G + shrinkage * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype,
                                                                                     device=G.device)


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
    all float64: the rank-``r`` optimum on the calibration inputs is ``P_r diag(σ_r) B_rᵀ``. Curvature-
    weighted (``Rᵀ W L = P̃ diag(σ) Qᵀ``): ``P = R⁻ᵀ P̃``, and ``σᵢ²`` estimates the loss, not the output error."""

    P: Tensor
    sigma: Tensor
    B: Tensor
    # what P's columns are: "eigenvectors" (orthonormal to rounding, whatever σ), "scaled" (``A q / σ``:
    # orthonormal up to an error ~1e-16·σ₁/σ) or "weighted" (curvature-weighted: G̃-orthonormal, not orthonormal)
    P_kind: Literal["eigenvectors", "scaled", "weighted"] = "scaled"

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    def direction_loss(self) -> Tensor:
        """``σᵢ²``: the calibration output error (``‖ΔW X‖_F²``) of dropping direction ``i``, descending
        (curvature-weighted: its K-FAC loss estimate ``tr(ΔW C ΔWᵀ G̃)``)."""
        return self.sigma.square()

    def truncation_loss(self, rank: int) -> float:
        """``‖(W − W'_r) X‖_F²`` of the rank-``rank`` optimum: the sum of the discarded ``σᵢ²``."""
        return float(self.sigma[rank:].square().sum())

    def reordered(self, order: Tensor) -> "WhitenedSVD":
        """The same directions in another order (``order`` a permutation of ``range(max_rank)``): keeping a
        prefix then keeps any chosen subset; its truncation loss is still the sum of the dropped ``σᵢ²``."""
        return WhitenedSVD(self.P[:, order], self.sigma[order], self.B[:, order], self.P_kind)

    def weight(self, rank: int) -> Tensor:
        """The dense rank-``rank`` optimum ``W'`` (``out×in``, float64)."""
        return (self.P[:, :rank] * self.sigma[:rank]) @ self.B[:, :rank].T

    def factors(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (in×r), s (r), V (out×r))`` with ``W'_r = V diag(s) Uᵀ`` (the first ``r`` stored directions),
        ``UᵀU = VᵀV = I``, ``s`` descending.

        ``B_r = Q_B R_B`` (QR), ``diag(σ_r) R_Bᵀ = Pm diag(s) Qmᵀ`` (``r×r`` SVD); then ``V = P_r Pm``,
        ``U = Q_B Qm``: ``O((in + out)·r²)`` on top of the stored SVD. ``P_r`` is used as it is when its
        columns are orthonormal to rounding — eigenvectors, or ``A q / σ`` with every kept
        ``σ ≥ 1e-6·σ₁`` (error ``~1e-16·σ₁/σ``) — and replaced by the ``Q`` of its QR otherwise (always
        when curvature-weighted).
        """
        P = self.P[:, :rank]
        Rp = None
        if self.P_kind == "scaled":
            orthonormal = rank == 0 or bool(self.sigma[rank - 1] >= 1e-6 * self.sigma[0])
        else:
            orthonormal = self.P_kind == "eigenvectors"
        if rank > 0 and not orthonormal:
            P, Rp = torch.linalg.qr(P)
        Qb, Rb = torch.linalg.qr(self.B[:, :rank])
        core = self.sigma[:rank, None] * Rb.T if Rp is None else (Rp * self.sigma[:rank]) @ Rb.T
        Pm, s, Qmh = torch.linalg.svd(core)
        return Qb @ Qmh.T, s, P @ Pm


def whitened_svd(W: Tensor, C: Tensor | ProjectedMoment, damping: float = DAMPING,
                 curvature: Tensor | ProjectedMoment | None = None,
                 shrinkage: float = SHRINKAGE) -> WhitenedSVD:
    """The SVD of ``A = W L`` (``W`` ``out×in``, input second moment ``C``, ``L Lᵀ = damped(C)``), mapped
    back by ``L⁻ᵀ``; with ``curvature`` (the output-gradient moment ``G``, ``out×out``) the SVD of
    ``A = Rᵀ W L`` (``R Rᵀ = shrunk(G, shrinkage)``, damped), mapped back by ``R⁻ᵀ`` and ``L⁻ᵀ``. A wide
    ``W`` may come with its input moment, a tall one with its curvature, in projected form
    (``ProjectedMoment``): the same result.
    Computed from the eigen-decomposition of the smaller Gram in float64, about half the time of a
    direct SVD at SmolLM2's shapes. ``σᵢ²`` are exact to ``~1e-16·σ₁²`` (``σᵢ`` to ``~1e-8·σ₁``): only
    directions far below anything a truncation keeps lose accuracy, and those of ``σᵢ ≤ 1e-13·σ₁`` get
    zero vectors; ``factors`` re-orthonormalizes what it keeps where needed.

    ``out < in``: ``A Aᵀ = Rᵀ W damped(C) Wᵀ R = P̃ diag(σ²) P̃ᵀ``, ``P = R⁻ᵀ P̃`` and
    ``B = L⁻ᵀ Aᵀ P̃ / σ = Wᵀ R P̃ / σ`` (no Cholesky of ``C``); ``out ≥ in``:
    ``AᵀA = Lᵀ Wᵀ G̃ W L = Q diag(σ²) Qᵀ``, ``P = R⁻ᵀ A Q / σ = W L Q / σ``, ``B = L⁻ᵀ Q`` (no Cholesky of
    ``G̃``). Without ``curvature``, ``R = G̃ = I``."""
    W = W.detach().double()
    out_f, in_f = W.shape
    wide = out_f < in_f
    if isinstance(C, ProjectedMoment):
        if not wide or C.gram.shape != (out_f, out_f) or C.dim != in_f:
            raise ValueError(f"a projected input moment ({tuple(C.gram.shape)}, of {C.dim}) needs a wide weight, "
                             f"out×out, got {tuple(W.shape)}")
    elif C.shape != (in_f, in_f):
        raise ValueError(f"second moment {tuple(C.shape)} does not fit a weight {tuple(W.shape)} (needs in×in)")
    if isinstance(curvature, ProjectedMoment):
        if out_f <= in_f or curvature.gram.shape != (in_f, in_f) or curvature.dim != out_f:
            raise ValueError(f"a projected curvature ({tuple(curvature.gram.shape)}, of {curvature.dim}) needs a "
                             f"tall weight, in×in, got {tuple(W.shape)}")
    elif curvature is not None and curvature.shape != (out_f, out_f):
        raise ValueError(f"curvature {tuple(curvature.shape)} does not fit a weight {tuple(W.shape)} (needs out×out)")
    weighted = curvature is not None
    G = shrunk(curvature.to(W.device), shrinkage) if isinstance(curvature, Tensor) else None
    if wide:
        gram = damped_projection(W, C, damping)
        if weighted:
            R = damped_cholesky(G, damping)
            gram = R.T @ gram @ R
    else:
        L = damped_cholesky(C.to(W.device), damping)
        A = W @ L
        if not weighted:
            gram = A.T @ A
        elif G is None:  # projected: Aᵀ G̃ A = Lᵀ (Wᵀ G̃ W) L
            gram = L.T @ shrunk_projection(W, curvature, shrinkage) @ L
        else:
            gram = A.T @ G @ A
    lam, vecs = torch.linalg.eigh(gram)
    lam, vecs = lam.flip(0).clamp_min(0), vecs.flip(1)
    sigma = lam.sqrt()
    inv = torch.where(sigma > sigma[:1] * 1e-13, 1.0 / sigma, torch.zeros_like(sigma))
    if not wide:
        B = torch.linalg.solve_triangular(L.T, vecs, upper=True)
        return WhitenedSVD((A @ vecs) * inv, sigma, B, "weighted" if weighted else "scaled")
    if not weighted:
        return WhitenedSVD(vecs, sigma, (W.T @ vecs) * inv, "eigenvectors")
    P = torch.linalg.solve_triangular(R.T, vecs, upper=True)
    return WhitenedSVD(P, sigma, (W.T @ (R @ vecs)) * inv, "weighted")
