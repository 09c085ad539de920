"""Spectral layers: weights stored permanently as truncated-SVD factors.

``SpectralLinear`` holds ``U (in×r)``, ``s (r)``, ``V (out×r)`` and computes
``y = ((x @ U) * s) @ Vᵀ (+ b)``, i.e. the dense weight is ``W = V diag(s) Uᵀ`` (``out×in``, the
``nn.Linear`` layout) but is never built. ``SpectralEmbedding`` holds ``U (vocab×r)``, ``s``,
``V (dim×r)`` and looks rows up as ``(U[ids] * s) @ Vᵀ``.

Invariant maintained by the retraction (``tsvd.retraction``): ``UᵀU = VᵀV = I``, so ``|s|`` are
the singular values of ``W`` and ``‖W‖_F² = Σ sᵢ²`` is free to read. Resizing (``truncate_``,
``grow_``) replaces parameter *data* in place, so ``Parameter`` objects (and the optimizer's
references to them) survive; optimizer state is resized by ``tsvd.surgery``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsvd.errors import UserError
from tsvd.sizes import check_size
from tsvd.spectrum import rank_for_energy
from tsvd.stiefel import householder_qr

INITS = ("scaled", "sct")


def random_orthonormal(rows: int, cols: int, *, generator=None, device=None, dtype=None) -> Tensor:
    """A ``rows×cols`` matrix with orthonormal columns (QR of a Gaussian), contiguous."""
    A = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32)
    return householder_qr(A)[0].to(dtype=dtype or torch.float32)


def check_rank(rank: int, rows: int, cols: int, what: str = "rank") -> int:
    """Validate a rank for a ``rows×cols`` matrix; returns it."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise UserError(f"{what} must be an integer, got {rank!r}")
    if not 1 <= rank <= min(rows, cols):
        raise UserError(f"{what}={rank} is impossible for a {rows}×{cols} weight: need 1 ≤ {what} ≤ {min(rows, cols)}")
    return rank


class SpectralModule(nn.Module):
    """Common state of spectral layers: orthonormal factors ``U (m×r)``, ``V (n×r)`` and core ``s (r)``.

    Subclasses define what ``m`` and ``n`` mean and how the factors are used in ``forward``.
    """

    U: nn.Parameter
    s: nn.Parameter
    V: nn.Parameter

    def _init_factors(self, m: int, n: int, rank: int, init: str, scale: float, device, dtype) -> None:
        if init not in INITS:
            raise UserError(f"init must be one of {INITS}, got {init!r}")
        factory = dict(device=device, dtype=dtype)
        if device is not None and torch.device(device).type == "meta":
            self.U = nn.Parameter(torch.empty(m, rank, **factory))
            self.V = nn.Parameter(torch.empty(n, rank, **factory))
        else:
            self.U = nn.Parameter(random_orthonormal(m, rank, device=device, dtype=dtype))
            self.V = nn.Parameter(random_orthonormal(n, rank, device=device, dtype=dtype))
        self.s = nn.Parameter(torch.full((rank,), 1.0 if init == "sct" else scale, **factory))

    @property
    def rank(self) -> int:
        # ZeRO-3 partitions parameters: their local shape is [0] and the full one is ``ds_shape``.
        return getattr(self.s, "ds_shape", self.s.shape)[0]

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The two orthonormal factors the retraction keeps on the Stiefel manifold."""
        return self.U, self.V

    def energy(self) -> Tensor:
        """``Σ sᵢ² = ‖W‖_F²`` (exact while the factors are orthonormal)."""
        return self.s.detach().float().square().sum()

    @torch.no_grad()
    def truncate_(self, keep: int | Tensor) -> Tensor:
        """Keep the ``keep`` largest-``|s|`` directions (or the given column indices, in that order).

        Returns the kept indices (for resizing optimizer state the same way). The dense weight changes
        by exactly the dropped directions: ``‖W − W'‖_F² = Σ_dropped sᵢ²``.
        """
        if isinstance(keep, int):
            check_rank(keep, self.rank, self.rank, "new rank")
            idx = torch.argsort(self.s.abs(), descending=True, stable=True)[:keep].sort().values
        else:
            idx = keep.to(device=self.s.device, dtype=torch.long)
        for p in (self.U, self.V, self.s):
            p.data = p.data.index_select(-1, idx).contiguous()
            p.grad = None
        return idx

    @torch.no_grad()
    def grow_(self, U_new: Tensor, V_new: Tensor) -> None:
        """Append directions ``U_new (m×k)``, ``V_new (n×k)`` with ``s = 0``: ``W`` is unchanged.

        The caller supplies directions orthonormal to the current factors (``tsvd.surgery`` does).
        """
        if U_new.shape[-1] != V_new.shape[-1] or U_new.shape[0] != self.U.shape[0] or V_new.shape[0] != self.V.shape[0]:
            raise ValueError(f"grow_ shapes {tuple(U_new.shape)}, {tuple(V_new.shape)} do not fit U {tuple(self.U.shape)}, V {tuple(self.V.shape)}")
        k = U_new.shape[-1]
        self.U.data = torch.cat([self.U.data, U_new.to(self.U)], dim=1).contiguous()
        self.V.data = torch.cat([self.V.data, V_new.to(self.V)], dim=1).contiguous()
        self.s.data = torch.cat([self.s.data, self.s.data.new_zeros(k)])
        for p in (self.U, self.V, self.s):
            p.grad = None

    @torch.no_grad()
    def reallocate_(self, rank: int) -> None:
        """Give ``U``, ``s``, ``V`` a new rank with *uninitialized* content — only to be overwritten by a
        checkpoint load of a model whose ranks changed during training."""
        check_rank(rank, self.U.shape[0], self.V.shape[0], "checkpoint rank")
        for p in (self.U, self.V, self.s):
            p.data = p.data.new_empty(*p.shape[:-1], rank)
            p.grad = None

    def _compression(self, m: int, n: int) -> float:
        return (m * n) / (self.rank * (m + n + 1))


class SpectralLinear(SpectralModule):
    """``y = ((x @ U) * s) @ Vᵀ + b`` with ``U (in×r)``, ``s (r)``, ``V (out×r)``; any leading batch dims.

    ``init="sct"``: random orthonormal ``U``, ``V`` and ``s = 1`` (Spectral Compact Training).
    ``init="scaled"``: random orthonormal factors and a flat spectrum chosen so that
    ``E‖W‖_F²`` equals that of a dense init with weight std ``std`` (default: ``nn.Linear``'s
    ``1/√(3·in)``), hence the same output variance for unit-variance inputs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        init: str = "scaled",
        std: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        std = 1.0 / math.sqrt(3 * in_features) if std is None else std
        scale = std * math.sqrt(in_features * out_features / rank)
        self._init_factors(in_features, out_features, rank, init, scale, device, dtype)
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            b = torch.empty(out_features, device=device, dtype=dtype)
            if b.device.type != "meta":
                b.uniform_(-bound, bound) if init == "sct" else b.zero_()
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = ((x @ self.U) * self.s) @ self.V.T
        return y + self.bias if self.bias is not None else y

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> "SpectralLinear":
        """Truncated SVD of a dense layer: fixed ``rank`` or the smallest rank keeping ``energy`` of ``Σ sᵢ²``."""
        W = linear.weight
        if W.dim() != 2:
            raise UserError(f"from_linear needs a 2-D weight, got shape {tuple(W.shape)}")
        out_f, in_f = W.shape
        P, S, Qh = torch.linalg.svd(W.detach().double(), full_matrices=False)  # W = P diag(S) Qh
        k = resolve_rank(S, rank, energy, out_f, in_f)
        layer = cls(in_f, out_f, k, bias=linear.bias is not None, device="meta")
        layer.U = nn.Parameter(Qh[:k].T.contiguous().to(W.dtype))
        layer.V = nn.Parameter(P[:, :k].contiguous().to(W.dtype))
        layer.s = nn.Parameter(S[:k].to(W.dtype))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer.to(W.device)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Dense ``nn.Linear`` with ``weight = V diag(s) Uᵀ`` — export only, never used in training."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.U.device, dtype=self.U.dtype)
        lin.weight.copy_((self.V * self.s) @ self.U.T)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, compression={self._compression(self.in_features, self.out_features):.1f}x"
        )


class SpectralEmbedding(SpectralModule):
    """Embedding table ``E = U diag(s) Vᵀ`` (``vocab×dim``) with ``U (vocab×r)``, ``V (dim×r)``.

    ``forward(ids) = (U[ids] * s) @ Vᵀ``; ``project(h) = ((h @ V) * s) @ Uᵀ`` is ``h @ Eᵀ``, the tied
    LM head. ``init="scaled"`` matches ``E‖E‖_F²`` of a dense init with std ``std`` (default 1, as
    ``nn.Embedding``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, init: str = "scaled",
                 std: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        check_rank(rank, num_embeddings, embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        scale = std * math.sqrt(num_embeddings * embedding_dim / rank)
        self._init_factors(num_embeddings, embedding_dim, rank, init, scale, device, dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return (F.embedding(ids, self.U) * self.s) @ self.V.T

    def project(self, h: Tensor) -> Tensor:
        """``h @ Eᵀ``: ``(..., dim) → (..., vocab)`` without building ``E``."""
        return ((h @ self.V) * self.s) @ self.U.T

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding, rank: int | None = None, energy: float | None = None) -> "SpectralEmbedding":
        W = emb.weight
        P, S, Qh = torch.linalg.svd(W.detach().double(), full_matrices=False)  # E = P diag(S) Qh
        k = resolve_rank(S, rank, energy, *W.shape)
        layer = cls(W.shape[0], W.shape[1], k, device="meta")
        layer.U = nn.Parameter(P[:, :k].contiguous().to(W.dtype))
        layer.V = nn.Parameter(Qh[:k].T.contiguous().to(W.dtype))
        layer.s = nn.Parameter(S[:k].to(W.dtype))
        return layer.to(W.device)

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.U.device, dtype=self.U.dtype)
        emb.weight.copy_((self.U * self.s) @ self.V.T)
        return emb

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}, "
            f"compression={self._compression(self.num_embeddings, self.embedding_dim):.1f}x"
        )


def resolve_rank(S: Tensor, rank: int | None, energy: float | None, rows: int, cols: int) -> int:
    """Rank for a conversion: exactly one of ``rank`` / ``energy`` (``tsvd.sizes``; singular values ``S``,
    descending)."""
    if check_size(rank=rank, energy=energy) == "rank":
        return check_rank(rank, rows, cols)
    return rank_for_energy(S, energy)


def spectral_ranks(model: nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of every spectral layer (ZeRO-3-safe: ``SpectralModule.rank`` reads the
    full shape)."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, SpectralModule)}


def set_ranks_for_loading(model: nn.Module, ranks: dict[str, int]) -> None:
    """Give each spectral layer the rank stored in a checkpoint (content comes from the load)."""
    layers = dict(model.named_modules())
    for name, rank in ranks.items():
        mod = layers.get(name)
        if not isinstance(mod, SpectralModule):
            raise UserError(f"checkpoint has spectral layer {name!r}, which this model does not have "
                            "(checkpoint from a different model?)")
        if mod.rank != rank:
            mod.reallocate_(rank)
