"""Global rank allocation: one parameter budget for a set of layers, spent where it saves the most loss.

A spectral ``out×in`` layer of rank ``r`` stores ``r·(in + out + 1)`` numbers (``U``, ``V``, ``s``).

- ``uniform_ranks``: every layer keeps the same fraction of its dense parameters.
- ``greedy_ranks``: given each layer's loss per dropped direction (``gains[name][i]``, descending in
  ``i``), keep the directions with the largest loss per parameter until the budget is spent. For
  losses that add over directions and layers this is the optimum of the budgeted problem up to the
  last rank (the per-layer cost of a direction is constant and the gains are sorted).
- Gains in the model's loss rather than each layer's own output error: ``tsvd convert`` whitens both
  sides of each weight (``tsvd.whitening.whitened_svd(curvature=G)``), whose ``σᵢ²`` are then loss
  estimates and go to ``greedy_ranks`` as they are. ``fisher_gains`` / ``loss_aware_allocation`` weigh
  the input-only whitened directions instead, each ``σᵢ²`` by the loss curvature along its output
  vector (the earlier rule, kept for the comparison in ``bench/smollm2.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsvd.errors import UserError
from tsvd.whitening import WhitenedSVD


def rank_cost(in_features: int, out_features: int) -> int:
    """Parameters one rank of a spectral ``out×in`` layer stores: a column of ``U``, of ``V``, and ``s``."""
    return in_features + out_features + 1


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise UserError(f"params ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def ratio_budget(shapes: dict[str, tuple[int, int]], ratio: float) -> int:
    """``ratio`` of the layers' dense parameters (``shapes[name] = (out, in)``), rounded down."""
    return int(math.floor(check_ratio(ratio) * sum(o * i for o, i in shapes.values())))


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Each layer at the largest rank whose factors hold at most ``ratio`` of its dense parameters
    (at least 1, at most ``min(out, in)``)."""
    ratio = check_ratio(ratio)
    return {n: max(1, min(min(o, i), int(ratio * o * i // rank_cost(i, o)))) for n, (o, i) in shapes.items()}


def greedy_ranks(gains: dict[str, Tensor], costs: dict[str, int], budget: int, min_rank: int = 1) -> dict[str, int]:
    """Ranks maximizing the kept ``Σ gains[name][:rank]`` with ``Σ rank·costs[name] ≤ budget``.

    ``gains[name]`` (descending) is the loss of dropping each direction; every layer keeps at least
    ``min_rank``. The spent budget is within one rank's cost of ``budget`` unless every direction fits.
    """
    ranks = {n: min(min_rank, g.numel()) for n, g in gains.items()}
    left = budget - sum(ranks[n] * costs[n] for n in gains)
    if left < 0:
        raise UserError(f"a budget of {budget:,} parameters cannot give every layer rank {min_rank} "
                        f"(needs {budget - left:,})")
    names = list(gains)
    per_param = torch.cat([gains[n][ranks[n]:].double() / costs[n] for n in names])
    owner = torch.cat([torch.full((gains[n].numel() - ranks[n],), k) for k, n in enumerate(names)])
    for k in owner[torch.argsort(per_param, descending=True, stable=True)].tolist():
        c = costs[names[k]]
        if c <= left:
            ranks[names[k]] += 1
            left -= c
    return ranks


def fisher_gains(whitened: WhitenedSVD, grad_moment: Tensor) -> Tensor:
    """Loss of dropping each whitened direction, to second order: ``σᵢ² · pᵢᵀ G pᵢ`` with ``G = Σ g gᵀ``
    the layer's output-gradient moment (``tsvd.calibration.OutputGradientMoments``), ``pᵢ`` the
    direction's output vector. Dropping it changes the outputs by ``Δy = σᵢ pᵢ (bᵢᵀ x)``; the loss by
    ``½ E[(gᵀ Δy)²]`` in the Fisher approximation, which is ``∝ σᵢ² pᵢᵀ G pᵢ`` when the gradient is
    independent of the input's whitened coordinate ``bᵢᵀ x`` (unit second moment by construction); the
    whitened coordinates are uncorrelated, so the directions' losses add."""
    P = whitened.P
    curvature = ((grad_moment.to(P) @ P) * P).sum(0)
    return whitened.direction_loss() * curvature.clamp_min(0)


def loss_aware_allocation(whitened: dict[str, WhitenedSVD], grad_moments: dict[str, Tensor], costs: dict[str, int],
                          budget: int, per_direction: bool = False) -> tuple[dict[str, WhitenedSVD], dict[str, int]]:
    """``(SVDs, ranks)`` spending ``budget`` by the Fisher-weighted loss of each direction (``fisher_gains``).

    ``per_direction=False`` keeps each layer's whitened order (optimal for its own output error) and
    scales its ``σᵢ²`` by the layer's mean curvature ``Σ σᵢ² pᵢᵀGpᵢ / Σ σᵢ²``; ``True`` keeps, in every
    layer, the directions of largest estimated loss (the SVDs come back reordered, so that a rank keeps
    a prefix).
    """
    gains, ordered = {}, {}
    for name, w in whitened.items():
        g = fisher_gains(w, grad_moments[name])
        if per_direction:
            order = torch.argsort(g, descending=True, stable=True)
            ordered[name], gains[name] = w.reordered(order), g[order]
        else:
            d = w.direction_loss()
            ordered[name], gains[name] = w, d * (g.sum() / d.sum().clamp_min(1e-300))
    return ordered, greedy_ranks(gains, costs, budget)


def budget_spent(ranks: dict[str, int], costs: dict[str, int]) -> int:
    return sum(r * costs[n] for n, r in ranks.items())
