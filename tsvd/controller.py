"""Rank control: read every spectral layer's spectrum ``s`` at intervals and decide its next rank.

The math lives in pure functions (``energy_target``, ``allocate_budget``, ``guard``); the
``RankController`` only adds the schedule (``due``), the budget resolved at the first decision and
a one-decision memory of which layers just grew. It returns a ``RankPlan`` (what to change); applying
it is ``tsvd.surgery``'s job (or an engine's ``apply_rank_plan``). See docs/adaptive-rank.md.

What a direction is worth (``rank.score``, budget policy): its energy share ``sᵢ²/Σs²`` (``energy``,
normalised per layer), or its *Fisher saliency* ``sᵢ² · E[(∂L/∂sᵢ)²]`` (``fisher_scores``: the loss a
direction's removal costs, in loss units, comparable across layers without normalisation). The
expectation is Adam's running mean of the squared gradient of ``s``, which the trainer reads from the
engine (``Engine.core_grad_sq``) and passes to ``plan`` as ``grad_sq``.

New directions can be *protected* (``rank.protect``): the controller remembers the step each column of
every layer was added (``born``, mirrored through every plan it returns: kept columns in order, new
ones appended), excludes protected columns from the policy's judgement, keeps them through shrinks
(``RankPlan.keep`` names the kept columns) and lets no layer grow again while it still holds some.

Conventions: a layer's rank is ``r = len(s)``; ``rows = (rows of U, rows of V)`` so ``min(rows)`` is
the largest possible rank; one direction costs ``rows[0] + rows[1] + 1`` parameters (a column of
``U``, a column of ``V``, one entry of ``s``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from tsvd.config import RankConfig
from tsvd.errors import UserError
from tsvd.spectrum import energy, energy_shares, kept_tail_shares, rank_for_energy, tail_count, tail_share


@dataclass(frozen=True)
class RankChange:
    """One applied change. ``energy_*`` are the layer's ``Σ sᵢ² = ‖W‖_F²`` before and after: a shrink
    loses exactly the dropped directions' energy, a growth none (new directions have ``s = 0``)."""

    layer: str
    old: int
    new: int
    energy_before: float
    energy_after: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RankPlan:
    """The decision taken at ``step``: ``ranks`` maps every layer that changes to its new rank;
    ``before`` records the ranks it was decided from (so a replay can check it applies to the same
    model state); ``keep`` the columns a shrinking layer keeps, ascending (absent: its largest ``|s|``);
    ``grow_init``: new directions start at ``s ≠ 0`` (see ``tsvd.surgery.apply_plan``). JSON round trip:
    ``RankPlan.from_dict(json.loads(json.dumps(plan.to_dict())))``."""

    step: int
    ranks: dict[str, int]
    before: dict[str, int] = field(default_factory=dict)
    keep: dict[str, list[int]] = field(default_factory=dict)
    grow_init: float = 0.0

    def to_dict(self) -> dict:
        return {"step": self.step, "ranks": dict(self.ranks), "before": dict(self.before),
                "keep": {k: list(v) for k, v in self.keep.items()}, "grow_init": self.grow_init}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RankPlan":
        def ranks(key: str) -> dict[str, int]:
            value = d.get(key, {})
            if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
                raise UserError(f"rank plan: '{key}' must map layer names to integer ranks, got {value!r}")
            return dict(value)

        if not isinstance(d, Mapping) or isinstance(d.get("step"), bool) or not isinstance(d.get("step"), int):
            raise UserError(f"rank plan: expected a mapping with an integer 'step', got {d!r}")
        keep = d.get("keep", {})
        if not isinstance(keep, Mapping) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                for v in keep.values()):
            raise UserError(f"rank plan: 'keep' must map layer names to lists of column indices, got {keep!r}")
        init = d.get("grow_init", 0.0)
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise UserError(f"rank plan: 'grow_init' must be a number, got {init!r}")
        return cls(step=d["step"], ranks=ranks("ranks"), before=ranks("before"),
                   keep={k: list(v) for k, v in keep.items()}, grow_init=float(init))


# --------------------------------------------------------------------------------------------
# Pure policy math. ``s``: one layer's spectrum (any order, any sign); ranks are ints.


def rank_bounds(cfg: RankConfig, rows: tuple[int, int]) -> tuple[int, int]:
    """``(lowest, highest)`` rank the controller may give a layer with factors of ``rows`` rows."""
    cap = min(rows)
    return min(cfg.min_rank, cap), min(cfg.max_rank, cap)


def shrink_floor(rank: int, cfg: RankConfig, lowest: int) -> int:
    """Lowest rank reachable in one decision: at most ``⌊max_shrink·r⌋`` dropped, never below ``lowest``."""
    return min(rank, max(lowest, rank - math.floor(cfg.max_shrink * rank)))


def growth_ceiling(rank: int, cfg: RankConfig, highest: int) -> int:
    """Highest rank reachable in one decision: ``⌈growth_factor·r⌉`` capped at ``highest`` (never below ``r``)."""
    return max(rank, min(highest, math.ceil(cfg.growth_factor * rank)))


def energy_target(s: Tensor, cfg: RankConfig, rows: tuple[int, int]) -> int:
    """The energy policy's rank for one layer (before hysteresis).

    Grow to ``growth_ceiling`` when the tail (``tail_count(r)`` smallest directions) holds more than
    ``grow_tail`` of ``Σ sᵢ²``. Otherwise shrink to the smallest ``k`` with ``ρ(k) ≥ energy`` whose own
    kept tail is at most ``grow_tail`` (never shrink into a state that would trigger growth at the
    next decision), bounded by ``shrink_floor``. An all-zero spectrum keeps its rank.
    """
    r = s.numel()
    lowest, highest = rank_bounds(cfg, rows)
    if energy(s) == 0.0:
        return r
    if r < highest and tail_share(s, tail_count(r, cfg.tail_fraction)) > cfg.grow_tail:
        return growth_ceiling(r, cfg, highest)
    k = rank_for_energy(s, cfg.energy)
    calm = (kept_tail_shares(s, cfg.tail_fraction) <= cfg.grow_tail).nonzero().flatten() + 1  # ranks, ascending
    calm = calm[calm >= k]
    k = int(calm[0]) if calm.numel() else r
    return max(min(k, highest), shrink_floor(r, cfg, lowest))


def allocate_budget(shares: Mapping[str, Tensor], cost: Mapping[str, int], low: Mapping[str, int],
                    high: Mapping[str, int], budget: int) -> dict[str, int]:
    """Split ``budget`` parameters across layers by pooled per-direction worth (greedy top-K).

    ``shares[l]``: layer ``l``'s directions' worth sorted descending — energy shares ``sᵢ²/Σs²``
    (``energy_shares``) or Fisher saliencies (``fisher_scores``);
    ``cost[l]``: parameters per direction; ``low[l] ≤ rank ≤ high[l]``. Every layer first gets ``low``;
    the remaining budget goes to candidate directions in decreasing order of ``share / cost``
    (the energy fraction a parameter buys). Directions beyond the current rank ``len(shares[l])`` are
    *virtual*, valued like the layer's weakest direction: a flat spectrum (saturated layer) bids high
    for more rank, a decaying one low. Shares are non-increasing per layer, so each layer receives a
    prefix — i.e. a rank. Ties are broken by layer order, then index (deterministic).
    """
    layers = list(shares)
    ranks = {name: low[name] for name in layers}
    spent = sum(low[name] * cost[name] for name in layers)
    candidates: list[tuple[float, int, int, str]] = []
    for order, name in enumerate(layers):
        e = shares[name].double()
        weakest = float(e[-1]) if e.numel() else 0.0
        for i in range(low[name], high[name]):
            value = float(e[i]) if i < e.numel() else weakest
            candidates.append((-value / cost[name], order, i, name))
    for _, _, _, name in sorted(candidates):
        if spent + cost[name] <= budget:
            ranks[name] += 1
            spent += cost[name]
    return ranks


def fisher_scores(s: Tensor, grad_sq: Tensor) -> Tensor:
    """``sᵢ² · gᵢ`` (float64): the Fisher saliency of each direction of one layer, ``grad_sq = g`` being a
    running mean of ``(∂L/∂sᵢ)²``. Setting ``sᵢ`` to 0 changes the loss by ``−gᵢsᵢ + ½hᵢᵢsᵢ² + …``; near a
    minimum of ``s`` the first term averages out, and with the empirical Fisher for the curvature ``hᵢᵢ``
    the cost is ``½ sᵢ² gᵢ`` — Optimal Brain Damage's saliency (LeCun et al., 1990), the Fisher weighting of
    FWSVD. The common ½ is left out. Non-negative; 0 for a new direction (``s = 0``)."""
    return s.detach().double().square() * grad_sq.detach().double().clamp_min(0.0)


def kept_columns(s: Tensor, protected: Tensor, k: int) -> list[int]:
    """The ``k`` columns a shrink keeps: every protected one, then the largest-``|s|`` others (stable
    order on ties, as ``SpectralModule.truncate_``), ascending. ``s`` may be any per-direction worth
    (a Fisher saliency keeps the directions the loss needs most)."""
    free = (~protected).nonzero().flatten()
    order = free[torch.argsort(s[free].abs(), descending=True, stable=True)]
    chosen = torch.cat([protected.nonzero().flatten(), order[: k - int(protected.sum())]])
    return sorted(int(i) for i in chosen)


def ramp(step: int, cfg: RankConfig) -> float:
    """Budget multiplier at ``step``: 1 at the first decision, ``budget_growth`` at the last one before
    ``stop_step``, linear in between (``budget_growth == 1``: always 1)."""
    if cfg.budget_growth == 1.0:
        return 1.0
    span = max(1, cfg.stop_step - cfg.warmup_steps - 1) // cfg.interval * cfg.interval
    return 1.0 + (cfg.budget_growth - 1.0) * min(1.0, max(0.0, (step - cfg.warmup_steps) / max(span, 1)))


def guard(rank: int, target: int, cfg: RankConfig, just_grew: bool) -> int:
    """Guardrails on a proposed rank: hysteresis (ignore ``|Δ| < hysteresis·r``) and no shrink right
    after a growth (new directions start at ``s = 0`` and get one interval to earn energy)."""
    if abs(target - rank) < cfg.hysteresis * rank or (just_grew and target < rank):
        return rank
    return target


# --------------------------------------------------------------------------------------------


class RankController:
    """Decides rank changes for the layers ``layers: {name: (rows of U, rows of V)}`` under ``cfg``.

    The trainer calls ``due(step)`` every step and, when due, ``plan(step, spectra)`` after that step's
    update; it must apply every plan it gets (the controller remembers growths it planned).
    ``state_dict``/``load_state_dict`` make a resumed run decide exactly as an uninterrupted one.
    """

    def __init__(self, cfg: RankConfig, layers: dict[str, tuple[int, int]]) -> None:
        self.cfg = cfg
        self.layers = {name: (int(rows[0]), int(rows[1])) for name, rows in layers.items()}
        self.budget: int | None = cfg.budget_params or None  # resolved at the first plan when 0
        self.last_growth: dict[str, int] = {}  # layer -> step of its last planned growth
        self.born: dict[str, list[int]] = {}  # layer -> step each column was added (0: from the start)

    def due(self, step: int) -> bool:
        c = self.cfg
        return (c.policy != "static" and step > 0 and step >= c.warmup_steps and (step - c.warmup_steps) % c.interval == 0
                and (c.stop_step == 0 or step < c.stop_step))

    def protected(self, name: str, step: int, rank: int) -> Tensor:
        """Bool mask over the layer's ``rank`` columns: added less than ``protect`` decisions ago."""
        born = self.born.get(name)
        if born is None or len(born) != rank:  # unknown (first decision, or a model resized elsewhere): none
            return torch.zeros(rank, dtype=torch.bool)
        horizon = self.cfg.protect * self.cfg.interval
        return torch.tensor([b > 0 and step - b <= horizon for b in born], dtype=torch.bool)

    def cost(self, layer: str) -> int:
        """Parameters one direction of ``layer`` costs: a column of ``U`` and of ``V``, one ``s``."""
        m, n = self.layers[layer]
        return m + n + 1

    def sketch_width(self, step: int, spectra: Mapping[str, Tensor],
                     grad_sq: Mapping[str, Tensor] | None = None) -> dict[str, int]:
        """``{layer: k}``: the layers a decision at ``step`` on these spectra would grow, and by how much —
        a dry run of ``plan`` (no state changes) for sizing the ``GradientSketch`` of the step before the
        decision. Spectra move little in one step; a layer that grows without having been predicted
        simply gets random directions."""
        targets = self._targets(step, spectra, self._worth(spectra, grad_sq))
        return {n: new - spectra[n].numel() for n, new in targets.items() if new > spectra[n].numel()}

    def plan(self, step: int, spectra: Mapping[str, Tensor], grad_sq: Mapping[str, Tensor] | None = None) -> RankPlan:
        """``spectra``: ``{layer: s}`` for (a subset of) the controller's layers, current after the step;
        ``grad_sq``: ``{layer: running mean of (∂L/∂s)²}``, needed by ``rank.score: fisher``."""
        ranks = {name: s.numel() for name, s in spectra.items()}
        worth = self._worth(spectra, grad_sq)
        planned = {n: new for n, new in self._targets(step, spectra, worth).items() if new != ranks[n]}
        self.last_growth.update({n: step for n, new in planned.items() if new > ranks[n]})
        keep = {}
        for n, r in ranks.items():
            born = self.born.get(n) if len(self.born.get(n, [])) == r else [0] * r
            new = planned.get(n, r)
            if new < r:
                keep[n] = kept_columns(worth[n], self.protected(n, step, r), new)
                born = [born[i] for i in keep[n]]
            self.born[n] = born + [step] * max(0, new - r)
        return RankPlan(step, planned, {n: ranks[n] for n in planned}, keep, self.cfg.grow_init)

    def _worth(self, spectra: Mapping[str, Tensor], grad_sq: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Each layer's per-direction worth under ``rank.score``: ``|s|`` (energy) or ``fisher_scores``."""
        if self.cfg.score != "fisher":
            return {n: s.detach().float().cpu().abs() for n, s in spectra.items()}
        if grad_sq is None or any(n not in grad_sq or grad_sq[n].shape != s.shape for n, s in spectra.items()):
            raise ValueError("rank.score 'fisher' needs grad_sq shaped like every layer's s")
        return {n: fisher_scores(s.cpu(), grad_sq[n].cpu()) for n, s in spectra.items()}

    def _targets(self, step: int, spectra: Mapping[str, Tensor], worth: Mapping[str, Tensor]) -> dict[str, int]:
        """Every layer's next rank under the policy and the guardrails (reads state, changes none but
        the budget resolved at the first decision)."""
        unknown = [name for name in spectra if name not in self.layers]
        if unknown:
            raise ValueError(f"spectra for layers the controller does not know: {unknown}")
        ranks = {name: s.numel() for name, s in spectra.items()}
        # Legacy guard (protect = 0): a layer that just grew may not shrink. With protection, the new
        # columns are set aside instead: the policy judges the others, and the layer may not grow again.
        legacy = self.cfg.protect == 0
        just_grew = {name: legacy and step - self.last_growth.get(name, -math.inf) <= self.cfg.interval
                     for name in ranks}
        mask = {name: self.protected(name, step, r) for name, r in ranks.items()}
        free = {name: s.detach().float().cpu()[~mask[name]] for name, s in spectra.items()}
        held = {name: int(m.sum()) for name, m in mask.items()}
        if self.cfg.policy == "energy":
            targets = {}
            for name, s in free.items():
                t = energy_target(s, self.cfg, self.layers[name])
                targets[name] = min(t, s.numel()) + held[name] if held[name] else t
        elif self.cfg.policy == "budget":
            values = ({n: worth[n][~mask[n]].sort(descending=True).values for n in free}
                      if self.cfg.score == "fisher" else {n: energy_shares(s) for n, s in free.items()})
            targets = self._budget_targets(step, free, held, just_grew, values)
        else:
            targets = dict(ranks)
        return {name: guard(r, targets[name], self.cfg, just_grew[name]) for name, r in ranks.items()}

    def _budget_targets(self, step: int, free: Mapping[str, Tensor], held: Mapping[str, int],
                        just_grew: Mapping[str, bool], values: Mapping[str, Tensor]) -> dict[str, int]:
        """Allocation under the guardrails over the unprotected columns ``free``, worth ``values`` (sorted
        descending: energy shares or Fisher saliencies); the ``held`` protected columns are paid first. A layer that may not shrink now has its current rank as floor; one with
        protected columns may not grow."""
        names = list(free)
        if self.budget is None:
            self.budget = sum((free[n].numel() + held[n]) * self.cost(n) for n in names)
        low, high = {}, {}
        for n in names:
            r, h = free[n].numel() + held[n], held[n]
            lowest, highest = rank_bounds(self.cfg, self.layers[n])
            low[n] = r - h if just_grew[n] else max(0, shrink_floor(r, self.cfg, lowest) - h)
            high[n] = r - h if h else max(low[n], min(highest, growth_ceiling(r, self.cfg, highest)))
        budget = int(self.budget * ramp(step, self.cfg)) - sum(held[n] * self.cost(n) for n in names)
        costs = {n: self.cost(n) for n in names}
        # hysteresis inside the allocation: a layer whose change would be too small to make keeps its rank
        # and the others share the rest of the budget (applied afterwards, it would overspend the budget)
        pinned: set[str] = set()
        while True:
            lo = {n: free[n].numel() if n in pinned else low[n] for n in names}
            hi = {n: free[n].numel() if n in pinned else high[n] for n in names}
            ranks = allocate_budget(values, costs, lo, hi, budget)
            small = {n for n in names if n not in pinned and ranks[n] != free[n].numel()
                     and abs(ranks[n] - free[n].numel()) < self.cfg.hysteresis * (free[n].numel() + held[n])}
            if not small:
                return {n: ranks[n] + held[n] for n in names}
            pinned |= small

    def state_dict(self) -> dict:
        return {"budget": self.budget, "last_growth": dict(self.last_growth),
                "born": {k: list(v) for k, v in self.born.items()}}

    def load_state_dict(self, d: Mapping) -> None:
        self.budget = d["budget"]
        self.last_growth = {str(k): int(v) for k, v in d["last_growth"].items()}
        self.born = {str(k): [int(b) for b in v] for k, v in d.get("born", {}).items()}
