"""Spectral factors stored as rows of a few same-shape stacks, retracted by one batched Cholesky-QR per stack.

``FactorStacks`` owns the factors' storage (``Retractor(stack=True)``, the single-process engine):
same-shape factors live as views of stacks of at most ``stack_bytes`` (every factor 64-byte aligned), so
a stack is one batched Gram, one batched Cholesky and one batched GEMM (``tsvd.stiefel.orthonormalize_into``)
into a spare stack of the same shape, which then becomes the factors' storage (the old one is the next
spare: nothing is copied back). A factor given new storage (a rank change, ``.to()``) is re-stacked.
Results are bitwise those of retracting each factor alone.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from tsvd.stiefel import OrthoInfo, drift, gram, orthonormalize_into

#: Upper bound on the bytes of one stack of same-shape factors: a stack and its scratch result fit the
#: last-level cache together, so the GEMM re-reads what the Gram just read.
STACK_BYTES = 8 * 2**20
#: Byte alignment of each factor in a stack (that of torch's CPU allocator).
STACK_ALIGN = 64
#: While (re)stacking, freed heap pages are handed back to the OS after every this many bytes stacked.
TRIM_BYTES = 64 * 2**20


@dataclass
class Stack:
    """Same-shape factors stored as the rows of one ``(n, m, r)`` tensor (``new_stack``; ``param.data`` is
    ``data[i]``); ``ptrs`` their data pointers, to notice a factor that was given new storage."""

    names: list[str]
    data: Tensor
    ptrs: list[int]


@dataclass
class StackedResult:
    """One batched retraction of consecutive rows of a stack: their names, what ``orthonormalize_into``
    saw and did, and (when measured) each result's ``‖QᵀQ − I‖_F``."""

    names: list[str]
    info: OrthoInfo
    errors: list[float] | None


class FactorStacks:
    """The stacks holding a model's factors, and one spare stack per stack shape (the next result's home).

    ``retract(factors, selected, order)`` lays the factors out (once, and again whenever one of them was
    given new storage) and retracts the ``selected`` ones exactly, stack by stack.
    """

    def __init__(self, stack_bytes: int = STACK_BYTES) -> None:
        self.stack_bytes = stack_bytes
        self.stacks: list[Stack] = []
        self.spares: dict[tuple, Tensor] = {}  # (n, m, r, dtype, device) → a free (n, m, r) stack
        self.factor_of: dict[str, nn.Parameter] = {}

    @torch.no_grad()
    def retract(self, factors: dict[str, nn.Parameter], selected: set[str],
                order: Callable[[dict[str, nn.Parameter]], dict[str, int]],
                measure_error: bool = False) -> list[StackedResult]:
        """Retract the ``selected`` factors; one ``StackedResult`` per batched call. A whole stack is
        written into the spare stack of its shape, which then becomes the factors' storage; a partial run
        of a stack goes through scratch and is copied back. ``order(factors)`` gives each factor's
        position key when (re)stacking (the schedule's phases: each step's due factors are whole runs)."""
        results = []
        for st in self.layout(factors, order):
            for a, b in runs([n in selected for n in st.names]):
                A, names = st.data[a:b], st.names[a:b]
                whole = b - a == len(st.names)
                out = self._spare_for(A, exact=whole)[: b - a]
                info = orthonormalize_into(A, out)
                if whole:
                    self.spares[stack_key(out)], st.data = st.data, out
                    for n, row in zip(names, out.unbind(0)):
                        self.factor_of[n].data = row
                    st.ptrs = [row.data_ptr() for row in out.unbind(0)]
                else:
                    A.copy_(out)
                errors = drift(gram(st.data[a:b].double())).tolist() if measure_error else None
                results.append(StackedResult(names, info, errors))
        return results

    def layout(self, factors: dict[str, nn.Parameter],
               order: Callable[[dict[str, nn.Parameter]], dict[str, int]]) -> list[Stack]:
        """The stacks, (re)built when a factor is not (or no longer) where they put it. Same-shape factors
        are grouped by ``order(factors)`` (then by name order); a stack holds at most ``stack_bytes`` (at
        least one factor)."""
        placed = {n: (self.factor_of[n], ptr, st.data.shape[1:]) for st in self.stacks for n, ptr in zip(st.names, st.ptrs)}
        if placed.keys() == factors.keys() and all((p, p.data_ptr(), p.shape) == placed[n] for n, p in factors.items()):
            return self.stacks
        position = order(factors)
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, p in factors.items():
            groups[(tuple(p.shape), p.dtype, p.device, position[name])].append(name)
        self.stacks, self.spares, self.factor_of = [], {}, dict(factors)
        moved = 0
        for names in groups.values():
            p0 = factors[names[0]]
            per = max(1, self.stack_bytes // (p0.numel() * p0.element_size()))
            for i in range(0, len(names), per):
                chunk = names[i:i + per]
                data = new_stack(len(chunk), factors[chunk[0]])
                for n, row in zip(chunk, data.unbind(0)):
                    row.copy_(factors[n].detach())
                    factors[n].data = row
                self.stacks.append(Stack(chunk, data, [factors[n].data_ptr() for n in chunk]))
                moved += data.untyped_storage().nbytes()
                if moved >= TRIM_BYTES:
                    moved = release_freed_heap()
        release_freed_heap()
        return self.stacks

    def _spare_for(self, A: Tensor, exact: bool) -> Tensor:
        """A free stack with ``A``'s row shape: exactly ``A``'s shape (``exact``, to swap with it) or at least
        as many rows (scratch). Spares are keyed by shape and reused across calls."""
        key = stack_key(A)
        spare = self.spares.get(key)
        if spare is None and not exact:
            spare = next((b for k, b in self.spares.items() if k[1:] == key[1:] and k[0] >= key[0]), None)
        if spare is None:
            spare = self.spares[key] = new_stack(A.shape[0], A[0])
        return spare


def new_stack(n: int, like: Tensor) -> Tensor:
    """An uninitialized ``(n, m, r)`` stack for factors shaped like ``like``: each ``(m, r)`` row is
    contiguous and starts on a ``STACK_ALIGN``-byte boundary, as a tensor of its own would. (Kernels
    round differently on misaligned data — vectorized body vs scalar tail — so an unaligned row would
    train a hair differently from the same factor stored alone.)"""
    m, r = like.shape
    per = -(-m * r * like.element_size() // STACK_ALIGN) * STACK_ALIGN // like.element_size()
    return torch.empty(n * per, dtype=like.dtype, device=like.device).as_strided((n, m, r), (per, r, 1))


def stack_key(stack: Tensor) -> tuple:
    """``(n, m, r, dtype, device)``: the key of a stack's spare."""
    return (*stack.shape, stack.dtype, stack.device)


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of the maximal runs of True in ``flags``."""
    out, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def release_freed_heap() -> int:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere); returns 0.

    Re-stacking frees every factor's old storage; glibc keeps those pages (holes between the optimizer
    state's blocks) and the stacks take new ones, so without this the resident size would grow by the
    factors' bytes (docs/results.md: the 70B architecture)."""
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
