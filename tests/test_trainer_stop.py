"""Stopping a run (tsvd/trainer/stop.py): a signal is deferred to the step boundary, its copy from a
launcher is the same request, a second signal interrupts at once, handlers are put back.
Multi-process stops and resumes: tests/test_reliability.py."""

import os
import signal

import pytest

from tsvd.trainer import stop as stop_module
from tsvd.trainer.stop import Stopped, StopRequest


class OneRank:
    """``any_rank`` of a single process: its own flag."""

    @staticmethod
    def any_rank(flag: bool) -> bool:
        return flag


@pytest.fixture()
def default_sigterm():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_stops_at_the_next_boundary(default_sigterm):
    stop = StopRequest(announce=False)
    stop.check(OneRank)  # nothing requested: goes on
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy, within REPEAT_S: the same request
    with pytest.raises(Stopped) as e:
        stop.check(OneRank)
    assert e.value.signal_name == "SIGTERM" and isinstance(e.value, KeyboardInterrupt)
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_signal_interrupts_at_once(default_sigterm, monkeypatch):
    monkeypatch.setattr(stop_module, "REPEAT_S", 0.0)
    stop = StopRequest(announce=False)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as e:
        os.kill(os.getpid(), signal.SIGTERM)
    assert type(e.value) is KeyboardInterrupt  # not Stopped: no agreed boundary
    stop.restore()


def test_a_handler_someone_installed_is_left_alone():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        stop = StopRequest(announce=False)
        assert signal.getsignal(signal.SIGTERM) is mine
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
