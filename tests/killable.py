"""Run the real CLI in child processes that can be stopped at an exact point and killed with SIGKILL.

The child is ``python CHILD <tsvd args>`` (or one ``CHILD`` per rank under ``torchrun``): it wraps the
engine's ``train_step`` (and ``TorchEngine.save``) — nothing in the library knows about tests — and then
runs ``tsvd.cli`` exactly as ``python -m tsvd.cli`` would. ``TSVD_TEST_BLOCK`` says what to do:

- ``save:N`` — in the N-th checkpoint save of the process (torch engine), after the engine wrote its
  file into the unpublished ``.tmp-*`` directory, cut that file in half (a torn write) and block;
- ``step:N[:RANK]`` — block at the start of the N-th ``train_step`` (its batches already drawn), on every
  rank or only on ``RANK``;
- ``die:N[:RANK]`` — the same, but the process SIGKILLs itself (a crashed rank).

A blocked child writes the marker file ``TSVD_TEST_READY``. ``launch_script`` runs the repository's
``launch/multi_gpu.sh`` instead (CPU ranks) and can send SIGTERM to the ranks or the whole job mid-run. Every launch runs in its own session; on
return, on failure and on timeout the whole process tree is SIGKILLed (``torchrun`` starts its workers
in sessions of their own, so killing a process group is not enough).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from tsvd.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, runpy, signal, sys, time
from pathlib import Path
import tsvd.engine
from tsvd.engine import torch_engine as te

what, n, *only = os.environ["TSVD_TEST_BLOCK"].split(":")
n, ready, calls = int(n), Path(os.environ["TSVD_TEST_READY"]), {"save": 0, "step": 0}
me = int(os.environ.get("RANK", "0"))

def block(note):
    tmp = ready.with_name(f"{ready.name}.{me}.part")
    tmp.write_text(note)
    os.replace(tmp, ready)
    while True:
        time.sleep(1)

real_save, real_build = te.TorchEngine.save, tsvd.engine.build_engine

def save(self, path, client_state):
    real_save(self, path, client_state)
    calls["save"] += 1
    if what == "save" and calls["save"] == n:
        f = Path(path) / te.STATE_FILE
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        block(str(path))

def build_engine(cfg, model):
    engine = real_build(cfg, model)
    real_step = engine.train_step

    def train_step(*args, **kwargs):
        calls["step"] += 1
        if calls["step"] == n and (not only or int(only[0]) == me):
            if what == "step":
                block("step")
            if what == "die":
                tmp = ready.with_name(f"{ready.name}.{me}.part")
                tmp.write_text("died")
                os.replace(tmp, ready)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)

    engine.train_step = train_step
    return engine

te.TorchEngine.save, tsvd.engine.build_engine = save, build_engine
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


def child_script(workdir: Path) -> Path:
    path = workdir / "tsvd_child.py"
    if not path.exists():
        path.write_text(CHILD)
    return path


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process below it (collected first: orphans would be lost)."""
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    for p in [proc.pid, *(v.pid for v in victims)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs(victims, timeout=10)


@dataclass
class Launch:
    returncode: int | None  # None: still running when killed (blocked, or timed out)
    ended: float  # time.time() at exit (or kill)
    log: str
    marker: str  # the file a blocked (or dying) child writes; its mtime is when that happened
    note: str = ""  # what the blocked child wrote (the checkpoint directory for ``save:N``)


def launch(args: list[str], workdir: Path, block: str = "", nproc: int = 1, timeout: float = 240,
           wait_for_block: bool = True, monitor_interval: float = 0.1) -> Launch:
    """Run ``tsvd ARGS`` through ``CHILD`` (under ``torchrun --standalone`` for ``nproc > 1``: a free port;
    ``monitor_interval``: how often torchrun looks for failed workers, and then terminates the others).

    With ``block`` and ``wait_for_block``, return as soon as a child reports being blocked (everything is
    then SIGKILLed, ``returncode=None``); otherwise wait for the exit. Fails with the log's tail when a
    child exits before blocking or the timeout passes."""
    tag = f"{block.replace(':', '-') or 'run'}-{time.monotonic_ns()}"
    ready, log = workdir / f"ready-{tag}", workdir / f"{tag}.log"
    script = str(child_script(workdir))
    cmd = [sys.executable, script, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "--monitor-interval", str(monitor_interval), script, *args]
    env = child_env(TSVD_TEST_BLOCK=block or "none:0", TSVD_TEST_READY=str(ready))
    if nproc > 1:  # CPU ranks (gloo); a JIT build of a DeepSpeed op would land in workdir, not in ~/.cache
        env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(workdir / "torch_extensions"))
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while proc.poll() is None:
            if block and wait_for_block and ready.exists():
                break
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"tsvd {' '.join(args)} ({block}) still running after {timeout} s:\n"
                                     f"{log.read_text()[-3000:]}")
            time.sleep(0.05)
        if block and wait_for_block and not ready.exists():
            raise AssertionError(f"child exited ({proc.returncode}) before reaching {block}:\n{log.read_text()[-3000:]}")
    finally:
        returncode, ended = proc.poll(), time.time()
        kill_tree(proc)
    return Launch(returncode, ended, log.read_text(), str(ready), ready.read_text() if ready.exists() else "")


def kill_when_blocked(args: list[str], block: str, workdir: Path, timeout: float = 240) -> str:
    """Run ``tsvd ARGS`` in a child that blocks at ``block``, SIGKILL it there, return the child's note."""
    return launch(args, workdir, block, timeout=timeout).note


def run_cli(args: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m tsvd.cli ARGS`` in its own process group (killed whole on timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", "tsvd.cli", *args], cwd=REPO, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch_script(args: list[str], workdir: Path, nproc: int = 2, signal_at: int = 0, to: str = "ranks",
                  timeout: float = 300) -> Launch:
    """``launch/multi_gpu.sh ARGS`` with ``nproc`` CPU processes (the DeepSpeed launcher; ``DS_ACCELERATOR=cpu``)
    in a session of its own. With ``signal_at``: once ``metrics.jsonl`` in the run's ``out_dir`` (``--set
    out_dir=…`` in ARGS) logs a training step ≥ ``signal_at``, send SIGTERM to the ranks (``to="ranks"``)
    or to every process of the job, launchers included (``to="job"``, as SLURM preempts a job)."""
    out_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("out_dir=")))
    log = workdir / f"script-{time.monotonic_ns()}.log"
    env = child_env(DS_ACCELERATOR="cpu", NUM_GPUS=str(nproc), TORCH_EXTENSIONS_DIR=str(workdir / "torch_extensions"),
                    PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "launch" / "multi_gpu.sh"), *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    job: list[psutil.Process] = []
    try:
        while signal_at and proc.poll() is None and _logged_step(out_dir) < signal_at:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"no step {signal_at} after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        if signal_at and proc.poll() is None:
            job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            ranks = [p for p in job if _runs_module(p.cmdline(), "tsvd.cli")]
            assert len(ranks) == nproc, [p.cmdline() for p in job]
            for p in ranks if to == "ranks" else job:
                os.kill(p.pid, signal.SIGTERM)
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        # The launcher may die first (SIGTERM to the whole job): wait for every process of the job.
        _, alive = psutil.wait_procs(job, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        assert not alive, f"still running after {timeout} s: {[p.cmdline() for p in alive]}"
    finally:
        returncode, ended = proc.poll(), time.time()
        for p in job:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        kill_tree(proc)
    return Launch(returncode, ended, log.read_text(), "")


def _runs_module(cmdline: list[str], module: str) -> bool:
    """``python … -m MODULE …`` (the ranks; the launchers name the module only as an argument)."""
    return any(a == "-m" and b == module for a, b in zip(cmdline, cmdline[1:]))


def _logged_step(out_dir: Path) -> int:
    """The last training step in ``out_dir/metrics.jsonl`` (0 if none yet; a half-written line is skipped)."""
    step = 0
    path = out_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if '"train/loss"' in line:
            try:
                step = max(step, json.loads(line)["step"])
            except json.JSONDecodeError:
                pass
    return step
