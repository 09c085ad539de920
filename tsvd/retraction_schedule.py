"""When each spectral factor is retracted: strict (after every step) or amortized (``train.retract_every``).

``RetractionSchedule`` is plain state (step count, per-factor age, drift rate and the shape the rate was
measured at) with ``state_dict`` for an exact resume; ``tsvd.retraction.Retractor`` asks it which factors
are due after each optimizer step and tells it which were retracted and how far they had drifted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from torch import Tensor

#: Predicted drift ``‖AᵀA − I‖_F`` past which an amortized factor is retracted before its turn.
#: Well inside one Cholesky-QR pass's range (``tsvd.stiefel.REFINE_DRIFT`` = 0.5); at 0.1 the
#: singular values of a factor stay within ±5% of 1, so ``s`` stays within 5% of the spectrum.
DRIFT_LIMIT = 0.1


def factor_shape(p: Tensor) -> tuple[int, ...]:
    """The whole factor's shape (a ZeRO-3 partitioned parameter keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


@dataclass
class RetractionSchedule:
    """Which factors to retract after each optimizer step.

    Factor ``j`` of each same-shape group has phase ``j mod every`` and is retracted after a step when
    ``(step + phase) mod every == 0``: once every ``every`` steps, each step doing about ``1/every`` of
    every shape's work. Drift between retractions is predicted from the last measurement: at each
    retraction the Gram gives the exact drift ``d`` accumulated over ``age`` steps, ``rate = d / age``
    (first-order growth: linear in the summed updates); a factor whose ``rate · (age + 1)`` would pass
    ``drift_limit`` is retracted this step instead ("early"). So is a factor whose rate is not known —
    never measured (the first step of a run, or of a resume without saved schedule state) or measured at
    another shape (a rank change): nothing bounds its drift until one step has been measured.
    """

    every: int = 1
    drift_limit: float = DRIFT_LIMIT
    step: int = 0  # optimizer steps seen
    age: dict[str, int] = field(default_factory=dict)  # steps since the factor's last retraction
    rate: dict[str, float] = field(default_factory=dict)  # drift per step at its last retraction
    shape: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the factor's shape when ``rate`` was measured

    def phases(self, factors: dict[str, Tensor]) -> dict[str, int]:
        """``{name: phase}``: same-shape factors numbered in order, modulo ``every``."""
        seen: dict[tuple, int] = defaultdict(int)
        out = {}
        for name, p in factors.items():
            key = (factor_shape(p), p.dtype, p.device)
            out[name], seen[key] = seen[key] % self.every, seen[key] + 1
        return out

    def known_rate(self, name: str, p: Tensor) -> float | None:
        """The factor's drift per step, or ``None`` when it was never measured at its present shape."""
        return self.rate[name] if self.shape.get(name) == factor_shape(p) else None

    def due(self, factors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
        """``(scheduled, early)`` names for the step about to be recorded by ``advance``."""
        if self.every == 1:
            return list(factors), []
        scheduled, early = [], []
        for name, phase in self.phases(factors).items():
            rate = self.known_rate(name, factors[name])
            if (self.step + phase) % self.every == 0:
                scheduled.append(name)
            elif rate is None or rate * (self.age.get(name, 0) + 1) > self.drift_limit:
                early.append(name)
        return scheduled, early

    def advance(self, factors: dict[str, Tensor], drifts: dict[str, float]) -> None:
        """One optimizer step moved every factor in ``factors``; those in ``drifts`` (measured drift) were
        retracted after it."""
        self.step += 1
        for name in factors:
            self.age[name] = self.age.get(name, 0) + 1
        self.mark_exact(factors, drifts)

    def mark_exact(self, factors: dict[str, Tensor], drifts: dict[str, float]) -> None:
        """The factors named in ``drifts`` were just retracted; ``drifts``: the drift each had accumulated."""
        for name, d in drifts.items():
            age = self.age.get(name, 0)
            if age > 0:
                self.rate[name], self.shape[name] = d / age, factor_shape(factors[name])
            self.age[name] = 0

    def stale(self, names: Iterable[str]) -> list[str]:
        """The names whose factor has moved since its last retraction."""
        return [n for n in names if self.age.get(n, 0) > 0]

    def predicted(self, names: Iterable[str]) -> float:
        """The largest predicted drift (``rate · age``) among ``names``."""
        return max((self.rate.get(n, 0.0) * self.age.get(n, 0) for n in names), default=0.0)

    def state_dict(self) -> dict:
        return {"step": self.step, "age": dict(self.age), "rate": dict(self.rate),
                "shape": {n: list(s) for n, s in self.shape.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; a state saved without shapes (older checkpoints) keeps no rate."""
        self.step, self.age = int(state["step"]), dict(state["age"])
        self.shape = {n: tuple(s) for n, s in state.get("shape", {}).items()}
        self.rate = {n: r for n, r in state["rate"].items() if n in self.shape}
