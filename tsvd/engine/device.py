"""The device a single process trains on: ``train.device`` resolved, TF32, clocks that are true on a GPU,
and the CUDA memory high-water marks.

CUDA kernels run asynchronously: a host clock read after a launch measures the launch, not the work.
``Stopwatch`` synchronises the device before and after what it times, and only when the device is
CUDA, so the CPU path makes no CUDA call and pays nothing.
"""

from __future__ import annotations

import contextlib
import re
import time

import torch

from tsvd.errors import UserError

DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"  # the values train.device accepts


def resolve_device(name: str) -> torch.device:
    """``train.device`` (``auto | cpu | cuda | cuda:N``) as a ``torch.device``: ``auto`` is CUDA when this
    machine has it, else the CPU. A malformed name, or CUDA where there is none, is a ``UserError``."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise UserError(f"train.device: {name!r} is not a device; expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"train.device: {name!r} is not usable here: {why} (torch {torch.__version__}); "
                            "use cpu, or auto to take CUDA only when present")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"train.device: {name!r} is not usable here: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def set_tf32(device: torch.device, enabled: bool) -> None:
    """``train.tf32``: TF32 tensor-core matmuls and convolutions (Ampere and later) for the model's float32
    work. Nothing on the CPU (the flags only concern CUDA kernels)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def exact_fp32_matmul(device: torch.device):
    """TF32 off for the duration (CUDA only): the retraction's Gram matrix and Cholesky need float32's
    24-bit mantissa (TF32 keeps 10 bits: the orthonormality error would be ~1e-3, not ~1e-7)."""
    if device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


class Stopwatch:
    """Wall seconds of a block of device work: ``with clock: ...`` then ``clock.seconds``. On CUDA the
    device is synchronised on entry and exit (the time is the work's, not its launch's); on the CPU it is
    a plain host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.device, self.seconds = device.type == "cuda", device, 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


def cuda_memory_stats() -> dict[str, float]:
    """Peak CUDA memory allocated and reserved by this process (GB), when it has used CUDA; ``{}``
    otherwise (no CUDA call is made by a process that never touched CUDA)."""
    if not torch.cuda.is_initialized():
        return {}
    return {"memory/device_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "memory/device_max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
