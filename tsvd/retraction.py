"""Keeping every spectral factor of a model on the Stiefel manifold after each optimizer step.

``Retractor`` is the thin stateful wrapper around ``tsvd.stiefel.orthonormalize_each``: it finds the
factors (``U``, ``V`` of every ``SpectralModule``), groups same-shape factors (their small ``r×r``
work is batched; the tall factors themselves are never stacked or copied), orthonormalizes them one by
one into a reused scratch buffer and writes each result back, keeping a small per-factor cache
(``FactorCache``: Gram drift before the step, fallback flag, measured error). The Gram computed for
the retraction is the drift diagnostic and the lazy-mode test, and feeds the Cholesky factorization:
nothing is factorized twice per step.

With ``measure_error=True`` the post-retraction error ``‖QᵀQ − I‖_F`` is measured, and a factor whose
error exceeds ``repair_tolerance`` (1e-5 in fp32) is repaired on the spot by a full Householder QR and
listed in ``RetractionReport.repaired`` (the trainer logs it).

Use it in one of three ways::

    retract_(model)                         # one-off, e.g. after loading weights
    retractor = attach_retraction(opt, model)   # after every opt.step(), automatically
    Retractor(model)(only=names)            # a subset (the DeepSpeed engine: the factors a rank owns)
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from tsvd.spectral import SpectralModule
from tsvd.stiefel import METHODS, drift, gram, householder_qr, orthonormalize_each

Writer = Callable[[str, nn.Parameter, Tensor], None]

#: Upper bound on the bytes of the factors in one group (bounds the number of Grams held at once).
CHUNK_BYTES = 64 * 2**20

#: Measured ``‖QᵀQ − I‖_F`` above which a retracted factor is repaired by a full Householder QR.
#: A good fp32 retraction leaves 0.6–2.2e-6 (bench/retraction.py, docs/results.md); fp64 ~1e-14.
REPAIR_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def repair_tolerance(dtype: torch.dtype) -> float:
    """The orthonormality error beyond which a factor of ``dtype`` is re-orthonormalized (Householder)."""
    return REPAIR_TOL.get(dtype, 1e-2)  # 16-bit factors: rounding alone is ~1e-3


def copy_writer(name: str, param: nn.Parameter, Q: Tensor) -> None:
    """Default write-back: in place into the parameter's storage (plain PyTorch, ZeRO-0)."""
    param.data.copy_(Q)


@dataclass
class FactorCache:
    """What the last retraction learnt about one factor."""

    drift: float = 0.0  # ‖AᵀA − I‖_F before the last retraction (how far the step moved it off)
    householder: bool = False  # the last retraction fell back to Householder QR
    skipped: bool = False  # lazy mode left it alone (drift ≤ tolerance)
    error: float | None = None  # ‖QᵀQ − I‖_F after the last retraction, when measured
    repaired: bool = False  # the last retraction's error exceeded the tolerance: re-done by Householder QR


@dataclass
class RetractionReport:
    seconds: float = 0.0
    retracted: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    max_drift: float = 0.0
    repaired: list[str] = field(default_factory=list)  # re-orthonormalized (Householder): error > tolerance


def spectral_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<module>.U": U, "<module>.V": V}`` for every spectral module, in module order."""
    out: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, SpectralModule):
            prefix = f"{mname}." if mname else ""
            out[prefix + "U"], out[prefix + "V"] = mod.factors()
    return out


class Retractor:
    """Orthonormalizes the factors of ``model`` on call. ``method``: ``"cholesky"`` (default, cached
    Gram + Cholesky-QR with fallback) or ``"householder"`` (SCT). ``lazy_tol``: when set, factors whose
    Gram drift is at most this are left alone (strict mode, the default, retracts every factor)."""

    def __init__(self, model: nn.Module, method: str = "cholesky", lazy_tol: float | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        if method not in METHODS:
            raise ValueError(f"retraction method must be one of {METHODS}, got {method!r}")
        self.model, self.method, self.lazy_tol, self.chunk_bytes = model, method, lazy_tol, chunk_bytes
        self.cache: dict[str, FactorCache] = defaultdict(FactorCache)
        self.hook_handle = None

    def factors(self) -> dict[str, nn.Parameter]:
        return spectral_factors(self.model)

    def _batches(self, factors: dict[str, nn.Parameter]) -> Iterable[list[tuple[str, nn.Parameter]]]:
        groups: dict[tuple, list[tuple[str, nn.Parameter]]] = defaultdict(list)
        for name, p in factors.items():
            groups[(tuple(p.shape), p.dtype, p.device)].append((name, p))
        for items in groups.values():
            per = max(1, self.chunk_bytes // max(1, items[0][1].numel() * items[0][1].element_size()))
            for i in range(0, len(items), per):
                yield items[i:i + per]

    @torch.no_grad()
    def __call__(self, write: Writer = copy_writer, only: Iterable[str] | None = None,
                 measure_error: bool = False) -> RetractionReport:
        """Retract the factors (all, or the names in ``only``) and write each result with ``write``.

        Per factor: one Gram (its drift is the cache's diagnostic and decides lazy skips and the
        path), one small Cholesky, one GEMM into a scratch buffer, then ``write`` — which receives
        ``Q`` in that reused buffer and must copy it. Factors are never stacked (a stack costs a
        full-size copy in and out); same-shape factors share the batched small-matrix work.
        """
        t0 = time.perf_counter()
        factors = self.factors()
        if only is not None:
            keep = set(only)
            factors = {n: p for n, p in factors.items() if n in keep}
        report = RetractionReport()
        for batch in self._batches(factors):
            mats = [p.detach() for _, p in batch]
            r = mats[0].shape[-1]
            G = mats[0].new_empty(len(mats), r, r)
            for A, Gi in zip(mats, G.unbind(0)):
                gram(A, out=Gi)
            d = drift(G).tolist()
            todo = [i for i, di in enumerate(d) if self.lazy_tol is None or not di <= self.lazy_tol]
            skipped = set(range(len(batch))) - set(todo)
            for i, (name, _) in enumerate(batch):
                c = self.cache[name]
                c.drift, c.skipped = d[i], i in skipped
                report.max_drift = max(report.max_drift, d[i])
            if not todo:
                continue

            def sink(k: int, Q: Tensor, todo: list[int] = todo, batch=batch) -> None:
                name, p = batch[todo[k]]
                write(name, p, Q)
                if measure_error:
                    self.cache[name].error = float(drift(gram(Q.double())))

            info = orthonormalize_each([mats[i] for i in todo], self.method, G[todo], sink)
            for k, i in enumerate(todo):
                name = batch[i][0]
                c = self.cache[name]
                c.householder = bool(info.householder[k]) and self.method == "cholesky"
                c.repaired = False
                report.retracted.append(name)
                if c.householder:
                    report.fallbacks.append(name)
        if measure_error:
            self._repair(factors, write, report)
        report.seconds = time.perf_counter() - t0
        return report

    def _repair(self, factors: dict[str, nn.Parameter], write: Writer, report: RetractionReport) -> None:
        """Re-orthonormalize, with a full Householder QR, every factor just retracted whose measured
        error exceeds ``repair_tolerance``; each goes into ``report.repaired`` (and counts as a fallback)."""
        for name, p in factors.items():
            c = self.cache[name]
            if c.skipped or c.error is None or not c.error > repair_tolerance(p.dtype):
                continue  # (a NaN error is not repairable here: the non-finite guards handle it)
            Q = householder_qr(p.detach())[0]
            write(name, p, Q)
            c.error = float(drift(gram(Q.double())))
            c.householder = c.repaired = True
            report.repaired.append(name)
            if name not in report.fallbacks:
                report.fallbacks.append(name)


def retract_(model: nn.Module, method: str = "cholesky") -> RetractionReport:
    """Orthonormalize every spectral factor of ``model`` in place, once."""
    return Retractor(model, method)()


def attach_retraction(optimizer: torch.optim.Optimizer, model: nn.Module, method: str = "cholesky",
                      lazy_tol: float | None = None) -> Retractor:
    """Retract after every ``optimizer.step()`` from now on; returns the ``Retractor`` (its cache and
    ``hook_handle``: ``retractor.hook_handle.remove()`` detaches it)."""
    retractor = Retractor(model, method, lazy_tol)
    retractor.hook_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: retractor())
    return retractor
