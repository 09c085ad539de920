"""Retraction spread over data-parallel ranks: each factor has one owner rank, which retracts it with
the shared ``Retractor`` and broadcasts the result, so every rank ends with identical, orthonormal
factors in both the working copy and ZeRO's fp32 master.

Owners are assigned once per (re)build, balancing the Cholesky-QR cost ``rows·rank²`` greedily. Stage 0
never re-synchronizes replicas by itself, so broadcasting from owners is also what keeps its factors
bitwise equal across ranks. ZeRO 1–3 keep a separate fp32 master that the optimizer updates: a
retraction written only into the working copy would be overwritten by the next step, so the master is
written too (stages 1–2: the full value, no communication; stage 3: this rank's slice of the
zero-padded value, inside a gather of at most ``GATHER_BYTES``).
"""

from __future__ import annotations

import math
import time

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
from torch import nn

from tsvd.engine.zero_params import GATHER_BYTES, chunks_by_bytes, full_shape, zero3_local_slice
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

    def __init__(self, retractor: Retractor, factors: list[tuple[str, nn.Parameter]], stage: int,
                 device: torch.device) -> None:
        self.retractor, self.factors, self.stage, self.device = retractor, factors, stage, device
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
        if self.stage == 3:
            for chunk in chunks_by_bytes(factors, GATHER_BYTES):
                with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=0):
                    self._retract_owned_and_share(chunk, measure)
                    for _, p in chunk:
                        safe_set_local_fp32_param(p, zero3_local_slice(p, p.data))
                # leaving the context re-broadcasts from rank 0 (identical by now) and re-partitions
        else:
            self._retract_owned_and_share(factors, measure)
            if self.stage in (1, 2):
                for _, p in factors:
                    safe_set_full_fp32_param(p, p.data)
        report = self._merge_reports([n for n, _ in factors])
        report.seconds = time.perf_counter() - t0
        return report

    def _retract_owned_and_share(self, factors: list[tuple[str, nn.Parameter]], measure: bool) -> None:
        """Retract this rank's factors among ``factors`` (full tensors in ``p.data``), then broadcast each
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
