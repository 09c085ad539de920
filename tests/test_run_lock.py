"""RunLock: one writer per ``out_dir`` — refused while held (even in the same process), dropped when the
holder exits however it exits, and wired into ``tsvd train``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_raw
from killable import write_config
from tsvd.cli import main
from tsvd.config import load_config
from tsvd.errors import UserError
from tsvd.run_lock import RunLock
from tsvd.trainer import Trainer


def test_second_holder_is_refused_until_release(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run)
    first.acquire()  # creates the directory, and nothing in it
    assert run.is_dir() and list(run.iterdir()) == []
    first.acquire()  # idempotent for its holder
    with pytest.raises(UserError, match=f"out_dir: {run} is in use by another running tsvd job"):
        RunLock(run).acquire()
    first.release()
    first.release()
    second = RunLock(run)
    second.acquire()
    assert second.held
    second.release()


def test_lock_dies_with_a_killed_holder(tmp_path):
    """A holder killed by SIGKILL leaves no stale lock: the kernel drops it with the process."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tsvd.run_lock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run)
    lock.acquire()
    lock.release()


def test_train_refuses_an_out_dir_in_use_and_changes_nothing(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), "train.steps=2", "train.eval_interval=100")
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    capsys.readouterr()

    trainer = Trainer(load_config(config), progress=False)  # a live run holds the directory
    try:
        trainer.metrics.writer.flush()  # the live run's own writes, done before the snapshot
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert main(["train", str(config), "--no-progress", "--set", "train.steps=4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"tsvd: error: out_dir: {run} is in use by another running tsvd job; wait for it to end "
                       "or choose another out_dir"]
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        trainer.close()
    assert main(["train", str(config), "--no-progress", "--set", "train.steps=4"]) == 0  # released on close


def test_a_failed_start_releases_the_lock(tmp_path):
    raw = tiny_raw(tmp_path)
    config = write_config(tmp_path / "run.yaml", raw, "train.steps=1", "train.eval_interval=100")
    assert main(["train", str(config), "--no-progress"]) == 0
    with pytest.raises(UserError, match="model.dim"):  # refused after the lock was taken
        Trainer(load_config(config, ["model.dim=48"]), progress=False)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()
