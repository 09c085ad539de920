"""Retraction spread over data-parallel ranks: each factor has one owner rank, which retracts its fp32
master with the shared ``Retractor`` and broadcasts the result, so every rank ends with identical,
orthonormal masters and working copies (the rounding of the master under bf16/fp16).

Owners are assigned once per (re)build, balancing the Cholesky-QR cost ``rows·rank²`` greedily. Stage 0
never re-synchronizes replicas by itself, so broadcasting from owners is also what keeps its factors
bitwise equal across ranks. The masters are read and written through ``MasterWeights``: where each rank
holds them whole (stage 0; fp32 working copies at stages 1–2) the owner retracts them in place;
otherwise each owner first receives its factors' masters, summed from every rank's pieces (one reduce
per owner, at most ``GATHER_BYTES`` of fp32 at a time). The ``Retractor`` works on the parameters it
finds in the model, so while it runs each factor's ``.data`` is its fp32 master value.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Iterator

import deepspeed.comm as dist
import torch
from torch import Tensor, nn

from tsvd.engine.mixed_precision import MasterWeights
from tsvd.engine.zero_params import full_shape
from tsvd.retraction import RetractionReport, Retractor


def assign_owners(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """Give each item to a rank so that the summed costs are balanced (greedy, largest first).

    Deterministic: every rank computes the same assignment from the same ``costs``.
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def retraction_cost(shape: tuple[int, ...]) -> int:
    """Cholesky-QR flops of an ``m×r`` factor, up to a constant: ``m·r²``."""
    m, r = shape
    return m * r * r


class OwnedRetraction:
    """``__call__(names, measure) -> RetractionReport``: retract those of ``factors`` (name, parameter of
    the DeepSpeed-wrapped model) on their owner ranks and share the results and diagnostics with all
    ranks. All ranks call it together with the same names (the amortized schedule is the same everywhere)."""

    def __init__(self, retractor: Retractor, factors: list[tuple[str, nn.Parameter]], masters: MasterWeights,
                 device: torch.device) -> None:
        self.retractor, self.factors, self.masters, self.device = retractor, factors, masters, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.owners = assign_owners({n: retraction_cost(full_shape(p)) for n, p in factors}, self.world_size)

    @torch.no_grad()
    def __call__(self, names: list[str] | None, measure: bool) -> RetractionReport:
        """Retract ``names`` (``None``: every factor); the ``Retract`` signature of ``Retractor.after_step``."""
        t0 = time.perf_counter()
        factors = self.factors
        if names is not None:
            keep = set(names)
            factors = [(n, p) for n, p in factors if n in keep]
        for chunk in self.masters.chunks(factors):
            params = [p for _, p in chunk]
            values = self._masters_on_owners(chunk)
            with holding(params, values):
                self._retract_owned_and_share(chunk, measure)
            for p, value in zip(params, values):
                self.masters.write_(p, value)
        report = self._merge_reports([n for n, _ in factors])
        report.seconds = time.perf_counter() - t0
        return report

    def _masters_on_owners(self, chunk: list[tuple[str, nn.Parameter]]) -> list[Tensor]:
        """Full fp32 masters of ``chunk``: every one on every rank where they are held whole, else each on
        its owner (scratch elsewhere, overwritten by the owner's broadcast)."""
        if not self.masters.partitioned:
            return self.masters.full([p for _, p in chunk])
        values: dict[str, Tensor] = {}
        for owner in range(self.world_size):
            owned = [(n, p) for n, p in chunk if self.owners[n] == owner]
            if owned:
                values.update(zip([n for n, _ in owned], self.masters.full([p for _, p in owned], dst=owner)))
        return [values[n] for n, _ in chunk]

    def _retract_owned_and_share(self, factors: list[tuple[str, nn.Parameter]], measure: bool) -> None:
        """Retract this rank's factors among ``factors`` (full fp32 masters in ``p.data``), then broadcast each
        rank's results so that every rank holds all of them."""
        self.retractor(only=[n for n, _ in factors if self.owners[n] == self.rank], measure_error=measure)
        if self.world_size == 1:
            return
        for owner in range(self.world_size):
            owned = [p for n, p in factors if self.owners[n] == owner]
            if not owned:
                continue
            flat = torch.cat([p.data.reshape(-1) for p in owned])
            dist.broadcast(flat, owner)
            if owner != self.rank:
                for p, piece in zip(owned, flat.split([p.numel() for p in owned])):
                    p.data.copy_(piece.view_as(p))

    def _merge_reports(self, names: list[str]) -> RetractionReport:
        """Share every owner's cache entries (one small all-reduce) so that each rank's ``retractor.cache``
        and the returned report (retracted, fallbacks, repairs, drift) cover all factors."""
        rows = []
        for name in names:
            c = self.retractor.cache[name]
            rows.append([c.drift, float(c.householder), float(c.skipped), float(c.repaired),
                         math.nan if c.error is None else c.error] if self.owners[name] == self.rank else [0.0] * 5)
        stats = torch.tensor(rows, dtype=torch.float64, device=self.device).reshape(len(names), 5)
        if self.world_size > 1:
            stats = stats.nan_to_num(nan=-1.0)
            dist.all_reduce(stats)
            stats[:, 4] = torch.where(stats[:, 4] == -1.0, torch.full_like(stats[:, 4], math.nan), stats[:, 4])
        report = RetractionReport()
        for name, (d, householder, skipped, repaired, error) in zip(names, stats.tolist()):
            c = self.retractor.cache[name]
            c.drift, c.householder, c.skipped, c.repaired = d, bool(householder), bool(skipped), bool(repaired)
            c.error = None if math.isnan(error) else error
            report.max_drift = max(report.max_drift, d)
            if not c.skipped:
                report.retracted.append(name)
            if c.householder:
                report.fallbacks.append(name)
            if c.repaired:
                report.repaired.append(name)
        return report


@contextlib.contextmanager
def holding(params: list[nn.Parameter], values: list[Tensor]) -> Iterator[None]:
    """While active, each parameter's ``.data`` is the matching value (its full fp32 master), so that
    the ``Retractor``, which reads and writes the model's parameters, works on the masters."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d
