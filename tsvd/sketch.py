"""Growth directions from the loss gradient, sketched without ever forming an ``in×out`` matrix.

For a ``SpectralLinear`` with ``U (m×r)`` (``m = in``) and ``V (n×r)`` (``n = out``) the gradient in the
factors' frame is ``G = Σ_t x_t g_tᵀ = Xᵀ g`` (``m×n``), with inputs ``X (T×m)`` and output gradients
``g (T×n)``. A new direction pair ``(u, v)`` with ``s = 0`` gets the core gradient ``uᵀ G v``; the best
pairs orthogonal to the current subspace are the top singular pairs of ``A = (I − UUᵀ) G (I − VVᵀ)``.

``GradientSketch`` estimates them in one pass over one training step (all its micro-batches):
forward hooks capture ``x``, a hook on the output captures ``g``, and each micro-batch adds

    Y += Xᵀ (g Ω)    (m×ℓ,  = G Ω,  Ω ⊥ V random n×ℓ)
    Z += gᵀ (X Ψ)    (n×ℓ', = Gᵀ Ψ, Ψ ⊥ U random m×ℓ')

— only ``T×ℓ``, ``m×ℓ``, ``n×ℓ'`` tensors. ``directions`` then reconstructs ``A ≈ Q C`` with
``Q = orth((I − UUᵀ) Y)`` and ``C = (Ψᵀ Q)⁺ ((I − VVᵀ) Z)ᵀ`` (``ℓ×n``; the single-pass low-rank
approximation of Tropp, Yurtsever, Udell & Cevher, SIMAX 2017) and takes the SVD of the small ``C``.
Sizes: ``ℓ = width + oversample``, ``ℓ' = 2ℓ + 1`` (both capped by the free dimensions).
Directions the sketch cannot supply (a degenerate or non-finite gradient, more than it holds, a layer
not sketched) are completed with random orthonormal ones, so ``directions`` always succeeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from tsvd.spectral import SpectralLinear, SpectralModule
from tsvd.stiefel import householder_qr, orthonormalize

OVERSAMPLE = 8
#: Sketched singular values below this fraction of the largest are noise; their directions are replaced by random ones.
RANK_TOL = 1e-4


def project_out(A: Tensor, F: Tensor) -> Tensor:
    """The part of ``A (m×j)`` orthogonal to ``span F`` (``F (m×r)`` orthonormal): ``A − F(FᵀA)``, applied
    twice so that a large component along ``F`` leaves only rounding behind."""
    for _ in range(2):
        A = A - F @ (F.mT @ A)
    return A


def complete_basis(B: Tensor, F: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` orthonormal columns orthogonal to ``F (m×r)``: the leading ones span the given ``B (m×j)``
    (``j ≤ k``) column by column, the rest are random. Needs ``r + k ≤ m``.

    Two rounds of (project out ``F``, orthonormalize) — "twice is enough" — leave ``Fᵀ Q`` at rounding level.
    """
    m = F.shape[0]
    R = torch.randn(m, k - B.shape[1], generator=generator, dtype=torch.float32).to(F) / math.sqrt(m)
    Q = torch.cat([B.to(F), R], dim=1)
    for _ in range(2):
        Q, _ = orthonormalize(project_out(Q, F))
    return Q


def random_directions(U: Tensor, V: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``k`` random orthonormal directions orthogonal to ``U (m×r)`` and to ``V (n×r)``: ``(m×k, n×k)``."""
    U, V = U.detach().float(), V.detach().float()
    return (complete_basis(U.new_zeros(U.shape[0], 0), U, k, generator),
            complete_basis(V.new_zeros(V.shape[0], 0), V, k, generator))


def sketch_svd(Y: Tensor, Z: Tensor, psi: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplets of ``A = (I − UUᵀ) G (I − VVᵀ)`` from its sketches ``Y = GΩ`` (``m×ℓ``) and
    ``Z = GᵀΨ`` (``n×ℓ'``, ``Ψ = psi ⊥ U``): returns ``u (m×ℓ)``, ``σ (ℓ)`` descending, ``v (n×ℓ)``."""
    Q, _ = orthonormalize(project_out(Y, U))
    A = psi.mT @ Q
    # CPU: gelsd (SVD-based), not the default gelsy, whose result depends on the operands' memory
    # alignment (MKL) — which made growth directions, and so resumed runs, differ between processes.
    driver = "gelsd" if A.device.type == "cpu" else None
    core = torch.linalg.lstsq(A, project_out(Z, V).mT, driver=driver).solution  # (ℓ'×ℓ) C = (ℓ'×n) → C: ℓ×n
    P, Rt = householder_qr(core.mT)  # C = Rtᵀ Pᵀ: the SVD of the wide C via that of an ℓ×ℓ
    W, sigma, Xh = torch.linalg.svd(Rt.mT)
    return Q @ W, sigma, P @ Xh.mT


@dataclass
class LayerSketch:
    """One layer's sketch state (float32, on the layer's device)."""

    omega: Tensor  # (n, ℓ)  range test matrix, orthogonal to V at entry
    psi: Tensor  # (m, ℓ') co-range test matrix, orthogonal to U at entry
    Y: Tensor  # (m, ℓ)  Σ over micro-batches of Xᵀ (g Ω) = G Ω
    Z: Tensor  # (n, ℓ') Σ over micro-batches of gᵀ (X Ψ) = Gᵀ Ψ
    tokens: int = 0

    def usable(self) -> bool:
        return (self.tokens > 0 and bool(torch.isfinite(self.Y).all()) and bool(torch.isfinite(self.Z).all())
                and bool(self.Y.any()))


class GradientSketch:
    """Context manager active during ONE training step's forward/backward (all micro-batches).

    ``layers``: ``SpectralLinear`` names to sketch (default: all, or the keys of a ``width`` mapping).
    ``width``: directions the sketch should be able to supply per layer — an int, a ``{layer: k}``
    mapping (``RankController.sketch_width``: only the layers about to grow), or ``None`` for the layer's
    current rank.
    ``factors``: ``{layer: (U, V)}``, full, for layers whose modules do not hold their factors whole
    (ZeRO-3 partitions them; ``Engine.sketch_factors`` gathers them); by default the modules' own.
    Hooks are removed on exit; the sketches stay readable, so ``directions`` is called after the step.
    Transient memory per sketched layer: ``(m + n)·(ℓ + ℓ')`` floats twice (test matrices + sketches).
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None, oversample: int = OVERSAMPLE,
                 generator: torch.Generator | None = None, *, width: int | Mapping[str, int] | None = None,
                 factors: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> None:
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, SpectralModule)}
        if layers is None:
            names = width if isinstance(width, Mapping) else self.modules
            layers = [n for n in names if isinstance(self.modules.get(n), SpectralLinear)]
        for name in layers:
            if not isinstance(self.modules.get(name), SpectralLinear):
                raise ValueError(f"GradientSketch: {name!r} is not a SpectralLinear of this model")
        self.layers, self.width, self.oversample = list(layers), width, oversample
        self.factors = dict(factors or {})
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.sketches: dict[str, LayerSketch] = {}
        self._handles: list = []
        self._active = False

    def _width(self, name: str, rank: int) -> int:
        if self.width is None:
            return rank
        return self.width if isinstance(self.width, int) else self.width.get(name, 0)

    def _randn(self, rows: int, cols: int, like: Tensor) -> Tensor:
        return torch.randn(rows, cols, generator=self.generator, dtype=torch.float32).to(like.device)

    @torch.no_grad()
    def __enter__(self) -> "GradientSketch":
        for name in self.layers:
            mod = self.modules[name]
            U, V = (t.detach().float() for t in self.factors.get(name, (mod.U, mod.V)))
            (m, r), n = U.shape, V.shape[0]
            width = self._width(name, r)
            ell = min(width + self.oversample, min(m, n) - r)
            if width <= 0 or ell <= 0:
                continue
            ell2 = min(2 * ell + 1, m - r)
            self.sketches[name] = LayerSketch(
                omega=project_out(self._randn(n, ell, V), V), psi=project_out(self._randn(m, ell2, U), U),
                Y=U.new_zeros(m, ell), Z=V.new_zeros(n, ell2))
            self._handles.append(mod.register_forward_hook(partial(self._on_forward, name)))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._active and torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(partial(self._on_grad, name, args[0]))

    @torch.no_grad()
    def _on_grad(self, name: str, x: Tensor, g: Tensor) -> None:
        if not self._active:
            return
        sk = self.sketches[name]
        X = x.detach().reshape(-1, x.shape[-1]).to(sk.Y.dtype)  # (T, m)
        G = g.reshape(-1, g.shape[-1]).to(sk.Y.dtype)  # (T, n)
        sk.Y.addmm_(X.mT, G @ sk.omega)
        sk.Z.addmm_(G.mT, X @ sk.psi)
        sk.tokens += X.shape[0]

    @torch.no_grad()
    def all_reduce_(self, reduce: Callable[[Tensor], None]) -> None:
        """Sum the sketches over data-parallel ranks (call after the step, before ``directions``).

        ``reduce(t)`` must sum ``t`` in place across ranks (e.g. ``torch.distributed.all_reduce``); it is
        called in the same order on every rank. Every rank must have used the same ``generator`` seed
        (identical test matrices), so the sum is the sketch of the global batch's gradient.
        """
        for name in sorted(self.sketches):
            sk = self.sketches[name]
            tokens = torch.tensor([float(sk.tokens)], device=sk.Y.device)
            for t in (sk.Y, sk.Z, tokens):
                reduce(t)
            sk.tokens = int(tokens.item())

    @torch.no_grad()
    def directions(self, layer: str, k: int) -> tuple[Tensor, Tensor]:
        """``(U_new (m×k), V_new (n×k))``, float32, orthonormal, orthogonal to the layer's *current*
        ``U``, ``V``; column ``i`` of both is one pair, strongest sketched gradient pairs first."""
        U_new, V_new, _ = self.pairs(layer, k)
        return U_new, V_new

    @torch.no_grad()
    def pairs(self, layer: str, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``directions`` and each pair's core gradient ``gᵢ ≈ uᵢᵀ G vᵢ`` (``k``, float32): the sketched
        singular value, signed for the pair as returned, 0 for a random completion. A new ``sᵢ`` moved
        against ``gᵢ`` lowers the loss to first order."""
        if layer not in self.modules:
            raise ValueError(f"GradientSketch.directions: {layer!r} is not a spectral layer of this model")
        mod = self.modules[layer]
        U, V = mod.U.detach().float(), mod.V.detach().float()
        if not 1 <= k <= min(U.shape[0], V.shape[0]) - U.shape[1]:
            raise ValueError(f"cannot add {k} directions to {layer} (rank {U.shape[1]}, factors "
                             f"{tuple(U.shape)}, {tuple(V.shape)})")
        u, v, sigma = U.new_zeros(U.shape[0], 0), V.new_zeros(V.shape[0], 0), U.new_zeros(0)
        sk = self.sketches.get(layer)
        if sk is not None and sk.usable():
            u, sigma, v = sketch_svd(sk.Y, sk.Z, sk.psi, U, V)
            j = min(k, int((sigma > RANK_TOL * sigma[0]).sum()))
            u, v, sigma = u[:, :j], v[:, :j], sigma[:j]
        U_new, V_new = complete_basis(u, U, k, self.generator), complete_basis(v, V, k, self.generator)
        j = sigma.numel()
        # re-orthonormalization may flip a column's sign: the pair's gradient flips with the product of the two
        sign = torch.sign((U_new[:, :j] * u).sum(0)) * torch.sign((V_new[:, :j] * v).sum(0))
        return U_new, V_new, torch.cat([sigma * sign, sigma.new_zeros(k - j)])
