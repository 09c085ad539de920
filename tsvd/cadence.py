"""When the trainer logs, evaluates, saves and decides ranks.

Steps are numbered from 1: ``step`` is the step just run (the state is "after step ``step``"). Every
boundary also fires at the last step (``train.steps``), so a run always ends logged, evaluated and
saved. Rank decisions follow the rank controller's own schedule (``RankController.due``): the
component that acts decides its cadence, the trainer only asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from tsvd.config import TrainConfig


@dataclass(frozen=True)
class Cadence:
    """``should_*(step)`` for one run. ``rank_due``: the controller's ``due`` (``None``: static ranks)."""

    steps: int
    log_interval: int
    eval_interval: int
    checkpoint_interval: int
    rank_due: Optional[Callable[[int], bool]] = None

    @classmethod
    def from_config(cls, train: TrainConfig, rank_due: Optional[Callable[[int], bool]] = None) -> "Cadence":
        return cls(train.steps, train.log_interval, train.eval_interval, train.checkpoint_interval, rank_due)

    def _every(self, interval: int, step: int) -> bool:
        return step % interval == 0 or step == self.steps

    def should_log(self, step: int) -> bool:
        return self._every(self.log_interval, step)

    def should_eval(self, step: int) -> bool:
        return self._every(self.eval_interval, step)

    def should_save(self, step: int) -> bool:
        return self._every(self.checkpoint_interval, step)

    def should_decide_ranks(self, step: int) -> bool:
        return self.rank_due is not None and self.rank_due(step)
