"""Keeping every spectral factor of a model on the Stiefel manifold as it trains.

``Retractor`` is the thin stateful wrapper around the pure routines of ``tsvd.stiefel``: it finds the
factors (``U``, ``V`` of every ``SpectralModule``), orthonormalizes them and keeps a small per-factor
cache (``FactorCache``: Gram drift before the retraction, fallback flag, measured error). The Gram
computed for the retraction is the drift diagnostic and the lazy-mode test, and feeds the Cholesky
factorization: nothing is factorized twice.

Two ways to do the arithmetic:

* ``stack=True`` (the single-process engine): the Retractor owns the factors' storage. Same-shape
  factors live as views of a few stacks (≤ ``STACK_BYTES`` each, every factor 64-byte aligned), so
  each stack is one batched Gram, one batched Cholesky and one batched GEMM
  (``tsvd.stiefel.orthonormalize_into``) into a spare stack of the same shape, which then becomes the
  factors' storage (the old one is the next spare: nothing is copied back). A factor given new storage
  (a rank change, ``.to()``) is re-stacked. Results are bitwise those of the per-factor path.
* ``stack=False`` (DeepSpeed, whose ZeRO buffers own the storage): factor by factor into a scratch
  buffer, each result handed to a ``write`` callback (``tsvd.stiefel.orthonormalize_each``).

When (``RetractionSchedule``): after every step (``every=1``, strict), or amortized — each factor once
every ``every`` steps, same-shape factors spread over the phases so every step does about ``1/every`` of
the work, plus an early retraction of any factor whose predicted drift would pass ``drift_limit``.
Before anything reads ``s`` as the spectrum or hands the weights on, ``retract_all`` makes every factor
exact again.

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

import ctypes
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from tsvd.spectral import SpectralModule
from tsvd.stiefel import METHODS, drift, gram, householder_qr, orthonormalize_each, orthonormalize_into

Writer = Callable[[str, nn.Parameter, Tensor], None]
#: ``retract(names, measure_error) -> RetractionReport``: retract these factors exactly.
Retract = Callable[[list, bool], "RetractionReport"]

#: Upper bound on the bytes of the factors in one group (bounds the number of Grams held at once).
CHUNK_BYTES = 64 * 2**20
#: Upper bound on the bytes of one stack of same-shape factors (``stack=True``): a stack and its
#: scratch result fit the last-level cache together, so the GEMM re-reads what the Gram just read.
STACK_BYTES = 8 * 2**20
#: Predicted drift ``‖AᵀA − I‖_F`` past which an amortized factor is retracted before its turn.
#: Well inside one Cholesky-QR pass's range (``tsvd.stiefel.REFINE_DRIFT`` = 0.5); at 0.1 the
#: singular values of a factor stay within ±5% of 1, so ``s`` stays within 5% of the spectrum.
DRIFT_LIMIT = 0.1
#: Byte alignment of each factor in a stack (that of torch's CPU allocator).
STACK_ALIGN = 64
#: While (re)stacking, freed heap pages are handed back to the OS after every this many bytes stacked.
TRIM_BYTES = 64 * 2**20

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
    early: list[str] = field(default_factory=list)  # amortized: retracted before their turn (drift limit)
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


@dataclass
class RetractionSchedule:
    """Which factors to retract after each optimizer step (plain state; ``state_dict`` for resume).

    Factor ``j`` of each same-shape group has phase ``j mod every`` and is retracted after a step when
    ``(step + phase) mod every == 0``: once every ``every`` steps, each step doing about ``1/every`` of
    every shape's work. Drift between retractions is predicted from the last measurement: at each
    retraction the Gram gives the exact drift ``d`` accumulated over ``age`` steps, ``rate = d / age``
    (first-order growth: linear in the summed updates); a factor whose ``rate · (age + 1)`` would pass
    ``drift_limit`` is retracted this step instead ("early"). The first cycle has no rate yet.
    """

    every: int = 1
    drift_limit: float = DRIFT_LIMIT
    step: int = 0  # optimizer steps seen
    age: dict[str, int] = field(default_factory=dict)  # steps since the factor's last retraction
    rate: dict[str, float] = field(default_factory=dict)  # drift per step at its last retraction

    def phases(self, factors: dict[str, Tensor]) -> dict[str, int]:
        seen: dict[tuple, int] = defaultdict(int)
        out = {}
        for name, p in factors.items():
            key = (tuple(p.shape), p.dtype, p.device)
            out[name], seen[key] = seen[key] % self.every, seen[key] + 1
        return out

    def due(self, factors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
        """``(scheduled, early)`` names for the step about to be recorded by ``advance``."""
        if self.every == 1:
            return list(factors), []
        scheduled, early = [], []
        for name, phase in self.phases(factors).items():
            if (self.step + phase) % self.every == 0:
                scheduled.append(name)
            elif self.rate.get(name, 0.0) * (self.age.get(name, 0) + 1) > self.drift_limit:
                early.append(name)
        return scheduled, early

    def advance(self, names: Iterable[str], drifts: dict[str, float]) -> None:
        """One optimizer step moved every factor in ``names``; those in ``drifts`` (measured drift) were
        retracted after it."""
        self.step += 1
        for name in names:
            self.age[name] = self.age.get(name, 0) + 1
        self.mark_exact(drifts)

    def mark_exact(self, drifts: dict[str, float]) -> None:
        """These factors were just retracted; ``drifts``: the drift each had accumulated."""
        for name, d in drifts.items():
            age = self.age.get(name, 0)
            if age > 0:
                self.rate[name] = d / age
            self.age[name] = 0

    def stale(self, names: Iterable[str]) -> list[str]:
        """The names whose factor has moved since its last retraction."""
        return [n for n in names if self.age.get(n, 0) > 0]

    def predicted(self, names: Iterable[str]) -> float:
        return max((self.rate.get(n, 0.0) * self.age.get(n, 0) for n in names), default=0.0)

    def state_dict(self) -> dict:
        return {"step": self.step, "age": dict(self.age), "rate": dict(self.rate)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.age, self.rate = int(state["step"]), dict(state["age"]), dict(state["rate"])


@dataclass
class _Stack:
    """Same-shape factors stored as the rows of one ``(n, m, r)`` tensor (``_new_stack``; ``param.data`` is
    ``data[i]``); ``ptrs`` their data pointers, to notice a factor that was given new storage."""

    names: list[str]
    data: Tensor
    ptrs: list[int]


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
        self.stack, self.stack_bytes = stack and method == "cholesky" and lazy_tol is None, stack_bytes
        self.schedule = RetractionSchedule(every, drift_limit)
        self.cache: dict[str, FactorCache] = defaultdict(FactorCache)
        self.hook_handle = None
        self._stacks: list[_Stack] = []
        self._spares: dict[tuple, Tensor] = {}  # (n, m, r, dtype, device) → a free (n, m, r) stack
        self._factor_of: dict[str, nn.Parameter] = {}

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
        self.schedule.mark_exact({n: self.cache[n].drift for n in retracted})

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
        """Batched over each stack (or run of selected factors in it): Gram, Cholesky, GEMM. A whole stack
        is written into a spare stack of its shape, which then becomes the factors' storage (the old one
        is the next spare: no copy); a partial run goes through scratch and is copied back."""
        for st in self._layout():
            flags = [n in selected for n in st.names]
            for a, b in _runs(flags):
                A, names = st.data[a:b], st.names[a:b]
                whole = b - a == len(st.names)
                out = self._spare_for(A, exact=whole)[: b - a]
                info = orthonormalize_into(A, out)
                if whole:
                    self._spares[_key(out)], st.data = st.data, out
                    for n, row in zip(names, out.unbind(0)):
                        self._factor_of[n].data = row
                    st.ptrs = [row.data_ptr() for row in out.unbind(0)]
                else:
                    A.copy_(out)
                errors = drift(gram(st.data[a:b].double())).tolist() if measure_error else [None] * len(names)
                for name, d, e in zip(names, info.drift.tolist(), errors):
                    c = self.cache[name]
                    c.drift, c.skipped, c.error = d, False, e if measure_error else c.error
                    report.max_drift = max(report.max_drift, d)
                self._record(names, info.householder.tolist(), report)

    def _spare_for(self, A: Tensor, exact: bool) -> Tensor:
        """A free stack with ``A``'s row shape: exactly ``A``'s shape (``exact``, to swap with it) or at least
        as many rows (scratch). Spares are keyed by shape and reused across calls."""
        key = _key(A)
        spare = self._spares.get(key)
        if spare is None and not exact:
            spare = next((b for k, b in self._spares.items() if k[1:] == key[1:] and k[0] >= key[0]), None)
        if spare is None:
            spare = self._spares[key] = _new_stack(A.shape[0], A[0])
        return spare

    def _layout(self) -> list[_Stack]:
        """The stacks, (re)built when a factor is not (or no longer) where they put it. Same-shape factors
        are stacked in phase order (``RetractionSchedule.phases``) so that each step's due factors are
        contiguous runs; a stack holds at most ``stack_bytes`` (at least one factor)."""
        factors = self.factors()
        placed = {n: (self._factor_of[n], ptr, st.data.shape[1:]) for st in self._stacks for n, ptr in zip(st.names, st.ptrs)}
        if placed.keys() == factors.keys() and all((p, p.data_ptr(), p.shape) == placed[n] for n, p in factors.items()):
            return self._stacks
        phases = self.schedule.phases(factors)
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, p in factors.items():
            groups[(tuple(p.shape), p.dtype, p.device, phases[name])].append(name)
        self._stacks, self._spares, self._factor_of = [], {}, dict(factors)
        moved = 0
        for names in groups.values():
            p0 = factors[names[0]]
            per = max(1, self.stack_bytes // (p0.numel() * p0.element_size()))
            for i in range(0, len(names), per):
                chunk = names[i:i + per]
                data = _new_stack(len(chunk), factors[chunk[0]])
                for n, row in zip(chunk, data.unbind(0)):
                    row.copy_(factors[n].detach())
                    factors[n].data = row
                self._stacks.append(_Stack(chunk, data, [factors[n].data_ptr() for n in chunk]))
                moved += data.untyped_storage().nbytes()
                if moved >= TRIM_BYTES:
                    moved = release_freed_heap()
        release_freed_heap()
        return self._stacks

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


def release_freed_heap() -> int:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere); returns 0.

    Re-stacking frees every factor's old storage; glibc keeps those pages (holes between the optimizer
    state's blocks) and the stacks take new ones, so without this the resident size would grow by the
    factors' bytes (+0.87 GB measured at the 70B architecture, 80 layers)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
    return 0


_MALLOC_TRIM = None


def _new_stack(n: int, like: Tensor) -> Tensor:
    """An uninitialized ``(n, m, r)`` stack for factors shaped like ``like``: each ``(m, r)`` row is
    contiguous and starts on a ``STACK_ALIGN``-byte boundary, as a tensor of its own would. (Kernels
    round differently on misaligned data — vectorized body vs scalar tail — so an unaligned row would
    train a hair differently from the same factor stored alone.)"""
    m, r = like.shape
    per = -(-m * r * like.element_size() // STACK_ALIGN) * STACK_ALIGN // like.element_size()
    return torch.empty(n * per, dtype=like.dtype, device=like.device).as_strided((n, m, r), (per, r, 1))


def _key(stack: Tensor) -> tuple:
    return (*stack.shape, stack.dtype, stack.device)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of the maximal runs of True in ``flags``."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def attach_retraction(optimizer: torch.optim.Optimizer, model: nn.Module, method: str = "cholesky",
                      lazy_tol: float | None = None, every: int = 1) -> Retractor:
    """Retract after every ``optimizer.step()`` from now on (``every > 1``: amortized; call
    ``retractor.retract_all()`` before reading ``s`` as the spectrum); returns the ``Retractor`` (its
    cache and ``hook_handle``: ``retractor.hook_handle.remove()`` detaches it). Factors are stacked
    (``stack=True``): not for a model handed to DeepSpeed."""
    retractor = Retractor(model, method, lazy_tol, every=every, stack=True)
    retractor.hook_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: retractor.after_step())
    return retractor
