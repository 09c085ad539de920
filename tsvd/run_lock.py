"""One writer per run directory: an exclusive lock on ``out_dir`` held while a run may write into it.

The lock is ``flock(2)`` on the directory itself, so it creates no file, and the kernel drops it when
the holding process exits, however it exits (a ``SIGKILL``ed run leaves no stale lock behind). Two
``tsvd train`` on one ``out_dir`` would interleave metrics and race on checkpoints; the second one is
refused. Locks are per open file description: a second ``RunLock`` on the same directory is refused
even within one process. Advisory, local: a network filesystem may not honour it across machines.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from tsvd.errors import UserError


class RunLock:
    """``acquire()`` takes the lock on ``path`` (created if missing) or raises a ``UserError`` naming it;
    ``release()`` (idempotent) lets it go."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        if self.held:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"out_dir: {self.path} is in use by another running tsvd job; wait for it to end "
                            "or choose another out_dir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the description drops the lock
            self.fd = None
