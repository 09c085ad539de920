"""Cadence: which steps log, evaluate, save and decide ranks."""

from tsvd.cadence import Cadence
from tsvd.config import RankConfig, TrainConfig
from tsvd.controller import RankController


def fired(predicate, steps: int) -> list[int]:
    return [n for n in range(1, steps + 1) if predicate(n)]


def test_intervals_and_the_last_step():
    c = Cadence.from_config(TrainConfig(steps=23, log_interval=5, eval_interval=10, checkpoint_interval=7))
    assert fired(c.should_log, 23) == [5, 10, 15, 20, 23]
    assert fired(c.should_eval, 23) == [10, 20, 23]
    assert fired(c.should_save, 23) == [7, 14, 21, 23]
    assert fired(c.should_decide_ranks, 23) == []  # static ranks: no controller


def test_an_interval_of_one_fires_every_step():
    c = Cadence.from_config(TrainConfig(steps=4, log_interval=1, eval_interval=1, checkpoint_interval=1))
    for predicate in (c.should_log, c.should_eval, c.should_save):
        assert fired(predicate, 4) == [1, 2, 3, 4]


def test_rank_decisions_follow_the_controller():
    controller = RankController(RankConfig(policy="energy", warmup_steps=3, interval=4), {"a": (8, 8)})
    c = Cadence.from_config(TrainConfig(steps=20), controller.due)
    assert fired(c.should_decide_ranks, 20) == fired(controller.due, 20) == [3, 7, 11, 15, 19]
