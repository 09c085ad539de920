"""Keeping every spectral factor of a model on the Stiefel manifold after each optimizer step.

``Retractor`` is the thin stateful wrapper around ``tsvd.stiefel.orthonormalize``: it finds the
factors (``U``, ``V`` of every ``SpectralModule``), groups same-shape factors into bounded batches,
orthonormalizes them and writes the result back, keeping a small per-factor cache
(``FactorCache``: Gram drift before the step, fallback flag, measured error). The cache is what
the metrics read — nothing is factorized twice for diagnostics.

Use it in one of three ways::

    retract_(model)                         # one-off, e.g. after loading weights
    retractor = attach_retraction(opt, model)   # after every opt.step(), automatically
    Retractor(model)(write=engine_writer)   # engines that own the parameter storage (DeepSpeed)
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from tsvd.spectral import SpectralModule
from tsvd.stiefel import METHODS, drift, gram, orthonormalize

Writer = Callable[[str, nn.Parameter, Tensor], None]

#: Upper bound on the bytes of one stacked batch of same-shape factors (bounds the temporary).
CHUNK_BYTES = 64 * 2**20


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


@dataclass
class RetractionReport:
    seconds: float = 0.0
    retracted: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    max_drift: float = 0.0


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
        """Retract the factors (all, or the names in ``only``) and write each result with ``write``."""
        t0 = time.perf_counter()
        factors = self.factors()
        if only is not None:
            keep = set(only)
            factors = {n: p for n, p in factors.items() if n in keep}
        report = RetractionReport()
        for batch in self._batches(factors):
            A = batch[0][1].data.unsqueeze(0) if len(batch) == 1 else torch.stack([p.data for _, p in batch])
            G = gram(A)
            d = drift(G)
            todo = torch.ones_like(d, dtype=torch.bool) if self.lazy_tol is None else d > self.lazy_tol
            if bool(todo.any()):
                Q, info = orthonormalize(A[todo], self.method, G[todo])
            idx = 0
            for j, (name, p) in enumerate(batch):
                c = self.cache[name]
                c.drift, c.skipped = float(d[j]), not bool(todo[j])
                report.max_drift = max(report.max_drift, c.drift)
                if c.skipped:
                    continue
                c.householder = bool(info.householder[idx]) and self.method == "cholesky"
                write(name, p, Q[idx])
                if measure_error:
                    c.error = float(drift(gram(p.data.double())))
                report.retracted.append(name)
                if c.householder:
                    report.fallbacks.append(name)
                idx += 1
        report.seconds = time.perf_counter() - t0
        return report


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
