"""Run the real CLI in a child process that can be stopped at an exact point and killed with SIGKILL.

The child is ``python -c CHILD <tsvd args>``: it wraps two ``TorchEngine`` methods (nothing in the
library knows about tests) and then runs ``tsvd.cli`` exactly as ``python -m tsvd.cli`` would.
``TSVD_TEST_BLOCK`` says where to stop:

- ``save:N`` — in the N-th checkpoint save of this process, after the engine wrote its file into the
  unpublished ``.tmp-*`` directory, cut that file in half (a torn write) and block;
- ``step:N`` — at the start of the N-th ``train_step`` of this process (its batches already drawn).

When blocked, the child writes the marker file ``TSVD_TEST_READY``; the parent then sends SIGKILL to
the child's process group. Every child runs in its own session and is killed whole on any failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tsvd.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, runpy, sys, time
from pathlib import Path
from tsvd.engine import torch_engine as te

what, n = os.environ["TSVD_TEST_BLOCK"].split(":")
n, ready, calls = int(n), Path(os.environ["TSVD_TEST_READY"]), {"save": 0, "step": 0}

def block(note):
    tmp = ready.with_name(ready.name + ".part")
    tmp.write_text(note)
    os.replace(tmp, ready)
    while True:
        time.sleep(1)

real_save, real_step = te.TorchEngine.save, te.TorchEngine.train_step

def save(self, path, client_state):
    real_save(self, path, client_state)
    calls["save"] += 1
    if what == "save" and calls["save"] == n:
        f = Path(path) / te.STATE_FILE
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        block(str(path))

def train_step(self, *args, **kwargs):
    calls["step"] += 1
    if what == "step" and calls["step"] == n:
        block("step")
    return real_step(self, *args, **kwargs)

te.TorchEngine.save, te.TorchEngine.train_step = save, train_step
sys.argv = ["tsvd", *sys.argv[1:]]
runpy.run_module("tsvd.cli", run_name="__main__")
"""


def child_env(**extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, **extra)


def write_config(path: Path, raw: dict, *overrides: str) -> Path:
    """A YAML config file at ``path`` from a raw mapping (e.g. ``conftest.tiny_raw``) plus overrides."""
    path.write_text(yaml.safe_dump(apply_overrides(raw, list(overrides)), sort_keys=False))
    return path


def kill_when_blocked(args: list[str], block: str, workdir: Path, timeout: float = 240) -> str:
    """Run ``tsvd ARGS`` in a child that blocks at ``block`` (see module doc), SIGKILL its process group
    once it is there, and return the child's note (the checkpoint directory for ``save:N``)."""
    ready = workdir / f"ready-{block.replace(':', '-')}-{time.monotonic_ns()}"
    log = workdir / f"{ready.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(TSVD_TEST_BLOCK=block, TSVD_TEST_READY=str(ready)),
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"child exited ({proc.returncode}) before reaching {block}:\n"
                                     f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"child did not reach {block} within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return ready.read_text()


def run_cli(args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m tsvd.cli ARGS`` in its own process group (killed whole on timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", "tsvd.cli", *args], cwd=REPO, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
