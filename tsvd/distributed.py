"""Process setup for multi-process training: launcher environment, CPU threads, free ports, process group.

Every launcher this project supports (``deepspeed``, ``torchrun``, the SLURM script in ``launch/``)
exports the same variables to each rank: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` and the number of ranks on this node (``LOCAL_SIZE`` from ``deepspeed``,
``LOCAL_WORLD_SIZE`` from ``torchrun``). A process started without a launcher is rank 0 of 1 and
gets a free local port, so ``python -m tsvd.cli train`` with a DeepSpeed config just works.

Threads: launchers do not divide the CPU between ranks, and ranks whose threads together outnumber the
cores oversubscribe it: OpenMP threads spin while waiting for cores another rank holds, which makes the
retraction's QR many times slower. ``configure_threads`` gives each rank ``cores // local ranks``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

#: Variables every rank needs before the process group can be created.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job (from the launcher's environment)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose).

    Another process may take it before it is used; callers that start a job right away are fine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_info() -> LaunchInfo:
    """Read this rank's place from the environment, filling a single-process default when no launcher ran.

    Without ``RANK``/``WORLD_SIZE`` the process is rank 0 of 1 and the missing variables are set
    (``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``) so that process-group creation needs no launcher.
    """
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ["WORLD_SIZE"] = "1"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    missing = [v for v in LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"incomplete launcher environment: {', '.join(missing)} not set "
                           f"(use deepspeed, torchrun or launch/slurm.sbatch; see docs/distributed.md)")
    world = int(os.environ["WORLD_SIZE"])
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return LaunchInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                      world_size=world, local_world_size=int(local) if local else world)


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity, e.g. under SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_rank(requested: int, local_world_size: int) -> int:
    """``requested`` if positive, else an equal share of this node's cores (at least 1)."""
    if requested > 0:
        return requested
    return max(1, available_cores() // max(1, local_world_size))


def configure_threads(threads: int) -> None:
    """Set the intra-op thread count for torch and for OpenMP code started later (child processes)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def disable_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op (a C++ build at start-up that
    needs ninja and a compiler).

    The op only serves inference all-reduce; training does not use it. The switch is not a documented
    setting: DeepSpeed 0.19.8 builds the op only when ``deepspeed.ops.__compatible_ops__`` marks it
    compatible (``deepspeed/comm/torch.py``). Without the op, no ``/dev/shm/deepspeed_allreduce_buffer_*``
    file is left behind per rank either.
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_process_group(timeout_s: int, local_rank: int = 0) -> None:
    """Create the default process group through DeepSpeed (gloo on CPU, nccl on GPUs), once per process.

    ``timeout_s`` bounds how long a rank waits in a collective that another rank never joins (a
    crashed or diverged rank); the 10-minute default is too long for tests.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    disable_shm_comm_op()
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)  # nccl wants the device chosen before the first collective
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), auto_mpi_discovery=False, verbose=False)


def is_collective_failure(e: BaseException) -> bool:
    """Did a collective fail in the communication backend — typically because another rank died (its
    connections closed) or stopped answering (``engine.timeout_s`` ran out)? torch raises ``DistError``
    for NCCL and a plain ``RuntimeError`` from gloo's sources for gloo."""
    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/" in str(e))
