"""Keeping every spectral factor of a model on the Stiefel manifold as it trains.

``Retractor`` is the thin stateful wrapper around the pure routines of ``tsvd.stiefel``: it finds the
factors (``U``, ``V`` of every ``SpectralModule``), orthonormalizes them and keeps a small per-factor
cache (``FactorCache``: Gram drift before the retraction, fallback flag, measured error). The Gram
computed for the retraction is the drift diagnostic and the lazy-mode test, and feeds the Cholesky
factorization: nothing is factorized twice.

Two ways to do the arithmetic:

* ``stack=True`` (the single-process engine): the Retractor owns the factors' storage, as views of
  same-shape stacks (``tsvd.factor_stacks``): one batched Gram, Cholesky and GEMM per stack, the result
  stack swapped in, bitwise the per-factor results.
* ``stack=False`` (DeepSpeed, whose ZeRO buffers own the storage): factor by factor into a scratch
  buffer, each result handed to a ``write`` callback (``tsvd.stiefel.orthonormalize_each``).

When (``tsvd.retraction_schedule.RetractionSchedule``): after every step (``every=1``, strict), or
amortized — each factor once every ``every`` steps, same-shape factors spread over the phases, plus an
early retraction of any factor whose predicted drift would pass ``drift_limit`` or whose drift rate is
not known yet. Before anything reads ``s`` as the spectrum or hands the weights on, ``retract_all``
makes every factor exact again.

With ``measure_error=True`` the post-retraction error ``‖QᵀQ − I‖_F`` is measured, and a factor whose
error exceeds ``repair_tolerance`` (1e-5 in fp32) is repaired on the spot by a full Householder QR and
listed in ``RetractionReport.repaired`` (the trainer logs it).

Use it in one of three ways::

    retract_(model)                         # one-off, e.g. after loading weights
    retractor = attach_retraction(opt, model)   # after every opt.step(), automatically
    Retractor(model)(only=names)            # a subset (the DeepSpeed engine: the factors a rank owns)
    r = Retractor(model, every=4, stack=True); r.after_step(); r.retract_all()   # amortized
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from tsvd.factor_stacks import STACK_BYTES, FactorStacks
from tsvd.retraction_schedule import DRIFT_LIMIT, RetractionSchedule
from tsvd.spectral import SpectralModule
from tsvd.stiefel import METHODS, drift, gram, householder_qr, orthonormalize_each

Writer = Callable[[str, nn.Parameter, Tensor], None]
#: ``retract(names, measure_error) -> RetractionReport``: retract these factors exactly.
Retract = Callable[[list, bool], "RetractionReport"]

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
    max_drift: float = 0.0  # largest drift measured (Gram) among the factors retracted
    repaired: list[str] = field(default_factory=list)  # re-orthonormalized (Householder): error > tolerance
    early: list[str] = field(default_factory=list)  # amortized: before their turn (drift limit, or no known rate)
    predicted_drift: float = 0.0  # amortized: largest predicted drift among the factors left alone

    def scalars(self) -> dict[str, float]:
        """What the trainer logs about the retraction besides its time."""
        return {"spectral/retracted": float(len(self.retracted)), "spectral/early_retractions": float(len(self.early)),
                "spectral/max_drift": self.max_drift, "spectral/predicted_drift": self.predicted_drift}


def spectral_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<module>.U": U, "<module>.V": V}`` for every spectral module, in module order."""
    out: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, SpectralModule):
            prefix = f"{mname}." if mname else ""
            out[prefix + "U"], out[prefix + "V"] = mod.factors()
    return out


class Retractor:
    """Orthonormalizes the factors of ``model``. ``method``: ``"cholesky"`` (default, cached Gram +
    Cholesky-QR with fallback) or ``"householder"`` (SCT). ``lazy_tol``: when set, factors whose Gram
    drift is at most this are left alone. ``every``: amortized schedule (``RetractionSchedule``; 1 =
    strict). ``stack``: own the factors' storage and batch same-shape factors (see the module
    docstring); only for models whose parameters nothing else lays out (not under DeepSpeed).

    ``__call__`` retracts exactly (all factors, or ``only``); ``after_step`` follows the schedule;
    ``retract_all`` makes every factor that moved since its last retraction exact again.
    """

    def __init__(self, model: nn.Module, method: str = "cholesky", lazy_tol: float | None = None,
                 chunk_bytes: int = CHUNK_BYTES, every: int = 1, stack: bool = False,
                 drift_limit: float = DRIFT_LIMIT, stack_bytes: int = STACK_BYTES) -> None:
        if method not in METHODS:
            raise ValueError(f"retraction method must be one of {METHODS}, got {method!r}")
        if every < 1 or (every > 1 and lazy_tol is not None):
            raise ValueError(f"every must be ≥ 1 and excludes lazy_tol (got every={every}, lazy_tol={lazy_tol})")
        self.model, self.method, self.lazy_tol, self.chunk_bytes = model, method, lazy_tol, chunk_bytes
        self.stack = stack and method == "cholesky" and lazy_tol is None
        self.schedule = RetractionSchedule(every, drift_limit)
        self.cache: dict[str, FactorCache] = defaultdict(FactorCache)
        self.hook_handle = None
        self.stacks = FactorStacks(stack_bytes) if self.stack else None

    def factors(self) -> dict[str, nn.Parameter]:
        return spectral_factors(self.model)

    # ---- when ----------------------------------------------------------------------------

    def due(self) -> tuple[list[str], list[str]]:
        """``(scheduled, early)``: the factors to retract after the coming optimizer step."""
        return self.schedule.due(self.factors())

    def advance(self, retracted: Iterable[str]) -> None:
        """Record an optimizer step after which ``retracted`` were retracted (their drift is in the cache)."""
        self.schedule.advance(self.factors(), {n: self.cache[n].drift for n in retracted})

    def stale(self) -> list[str]:
        """The factors that moved since their last retraction (none in strict mode)."""
        return self.schedule.stale(self.factors())

    def mark_exact(self, retracted: Iterable[str]) -> None:
        """Record that ``retracted`` were just retracted outside the schedule (their drift is in the cache)."""
        self.schedule.mark_exact(self.factors(), {n: self.cache[n].drift for n in retracted})

    def after_step(self, measure_error: bool = False, retract: Retract | None = None) -> RetractionReport:
        """The retraction that follows an optimizer step: every factor (strict) or those due.
        ``retract(names, measure_error)`` does the work (default: this Retractor, in place; the DeepSpeed
        engine passes its owner-rank retraction)."""
        t0 = time.perf_counter()
        scheduled, early = self.due()
        report = (retract or self._exact)(scheduled + early, measure_error)
        report.early = early
        self.advance(report.retracted)
        report.predicted_drift = self.schedule.predicted(self.factors())
        report.seconds = time.perf_counter() - t0
        return report

    def retract_all(self, measure_error: bool = False, retract: Retract | None = None) -> RetractionReport:
        """Retract exactly every factor that moved since its last retraction (a no-op in strict mode).
        Call it before reading ``s`` as the spectrum or handing the weights on."""
        stale = self.stale()
        if not stale:
            return RetractionReport()
        report = (retract or self._exact)(stale, measure_error)
        self.mark_exact(report.retracted)
        return report

    def _exact(self, names: list[str], measure_error: bool) -> RetractionReport:
        return self(only=names, measure_error=measure_error)

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

    # ---- how -----------------------------------------------------------------------------

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
        """Retract the factors (all, or the names in ``only``) exactly and write each result with ``write``.

        Per factor: one Gram (its drift is the cache's diagnostic and decides lazy skips and the
        path), one small Cholesky, one GEMM, then the write-back. ``write`` (``stack=False`` only)
        receives ``Q`` in a reused buffer and must copy it.
        """
        t0 = time.perf_counter()
        factors = self.factors()
        if only is not None:
            keep = set(only)
            factors = {n: p for n, p in factors.items() if n in keep}
        report = RetractionReport()
        if self.stack and write is copy_writer:
            self._retract_stacked(set(factors), report, measure_error)
        else:
            self._retract_each(factors, write, report, measure_error)
        if measure_error:
            self._repair(factors, write, report)
        report.seconds = time.perf_counter() - t0
        return report

    def _retract_each(self, factors: dict[str, nn.Parameter], write: Writer, report: RetractionReport,
                      measure_error: bool) -> None:
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
            self._record([batch[i][0] for i in todo], info.householder.tolist(), report)

    def _record(self, names: list[str], householder: list[bool], report: RetractionReport) -> None:
        for name, hh in zip(names, householder):
            c = self.cache[name]
            c.householder = bool(hh) and self.method == "cholesky"
            c.repaired = False
            report.retracted.append(name)
            if c.householder:
                report.fallbacks.append(name)

    def _retract_stacked(self, selected: set[str], report: RetractionReport, measure_error: bool) -> None:
        """Batched over each stack, or run of selected factors in it (``FactorStacks.retract``)."""
        for done in self.stacks.retract(self.factors(), selected, self.schedule.phases, measure_error):
            errors = done.errors or [None] * len(done.names)
            for name, d, e in zip(done.names, done.info.drift.tolist(), errors):
                c = self.cache[name]
                c.drift, c.skipped, c.error = d, False, e if measure_error else c.error
                report.max_drift = max(report.max_drift, d)
            self._record(done.names, done.info.householder.tolist(), report)

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
    """Orthonormalize every spectral factor of ``model`` in place (its own storage), once."""
    return Retractor(model, method)()


def attach_retraction(optimizer: torch.optim.Optimizer, model: nn.Module, method: str = "cholesky",
                      lazy_tol: float | None = None, every: int = 1) -> Retractor:
    """Retract after every ``optimizer.step()`` from now on (``every > 1``: amortized; call
    ``retractor.retract_all()`` before reading ``s`` as the spectrum); returns the ``Retractor`` (its
    cache and ``hook_handle``: ``retractor.hook_handle.remove()`` detaches it). Factors are stacked
    (``stack=True``): not for a model handed to DeepSpeed."""
    retractor = Retractor(model, method, lazy_tol, every=every, stack=True)
    retractor.hook_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: retractor.after_step())
    return retractor
