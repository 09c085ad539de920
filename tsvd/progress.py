"""Training progress for a person at a terminal, or for a launcher's log file.

On a terminal (stdout and stderr both TTYs) a live tqdm bar. Otherwise (SLURM, ``deepspeed``, ``nohup``,
``> log``) no bar at all and one plain line per log interval, never a carriage return::

    step 120/150 | loss 4.1234 | lr 2.10e-03 | 12,345 tok/s | elapsed 1:02 | ETA 0:15

ETA is the remaining steps at this process's average step time so far. Messages (``say``) go to
stdout either way, between the bar's frames on a terminal.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def is_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def say(message: str) -> None:
    """One line on stdout, between a live bar's frames, flushed (a log file gets it at once)."""
    tqdm.write(message)
    sys.stdout.flush()


class Progress:
    """``step`` after every step (drives the bar), ``line`` at log intervals (prints in plain mode).
    ``enabled=False`` (``--no-progress``, ranks other than 0) shows neither."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, live: bool | None = None) -> None:
        self.total, self.initial = total, initial
        self.live = is_terminal() if live is None else live
        self.plain = enabled and not self.live
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and self.live), unit="step",
                        dynamic_ncols=True)
        self.t_start = time.perf_counter()

    def step(self, loss: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        self.bar.update(1)

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.plain:
            return
        elapsed = time.perf_counter() - self.t_start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        print(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
              f"elapsed {clock(elapsed)} | ETA {clock(eta) if eta == eta else '?'}", flush=True)

    def close(self) -> None:
        self.bar.close()
