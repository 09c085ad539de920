"""How a run ends before its last step: on a signal, at a step boundary agreed by every rank, with a
checkpoint (``Stopped``, exit status ``STOPPED_EXIT_CODE``), or because it cannot go on
(``TrainingError``)."""

from __future__ import annotations

import signal
import threading
import time

from tsvd.progress import say

STOPPED_EXIT_CODE = 75  # `tsvd train` stopped on a signal with a checkpoint at a step boundary (EX_TEMPFAIL: run again)
REPEAT_S = 2.0  # a signal this soon after the first is the same request delivered twice, not "stop at once"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); the last checkpoint is usable."""


class Stopped(KeyboardInterrupt):
    """The run stopped on SIGINT / SIGTERM at a step boundary, every rank at the same ``step``, after
    saving ``checkpoint`` (a ``KeyboardInterrupt``, so plain callers see an interrupt)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name, self.step, self.checkpoint, self.is_main = signal_name, 0, None, True


class StopRequest:
    """Deferred SIGINT / SIGTERM and where the loop stands (installed in the main thread of every rank).

    The first Ctrl-C (SIGINT) or SIGTERM (how schedulers such as SLURM preempt a job) only sets
    ``requested``. At every step boundary the ranks agree (``Engine.any_rank``: one small all-reduce
    when there are several) whether any of them got one; if so every rank stops there (``Stopped``) and
    the trainer saves one checkpoint of that step. A second signal interrupts at once (no checkpoint if
    that is inside a step) — unless it comes within ``REPEAT_S`` of the first: launchers pass a signal on
    to workers that often got it already (a terminal's Ctrl-C reaches the whole process group, a
    scheduler signals every process of the job), and that copy is not a second request. A signal whose
    handler is not the default one is left alone. ``at_boundary``: model, optimizer and sampler are
    exactly "after step ``trainer.step``". ``restore()`` puts the handlers back."""

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, announce: bool = True) -> None:
        self.requested, self.previous, self.at_boundary = None, {}, True  # requested: (signal name, time)
        self.announce = announce  # say so on receiving the first signal (rank 0)
        if threading.current_thread() is threading.main_thread():
            for signum, default in self.DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self.requested[1] < REPEAT_S:
                return
            raise KeyboardInterrupt
        self.requested = (signal.Signals(signum).name, time.monotonic())
        if self.announce:
            say(f"{self.requested[0]}: stopping after this step with a checkpoint (again to stop at once)")

    def check(self, engine) -> None:
        """At a step boundary (every rank): ``Stopped`` when any rank got a signal."""
        if engine.any_rank(self.requested is not None):
            raise Stopped(self.requested[0] if self.requested else "a signal to another rank")

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
