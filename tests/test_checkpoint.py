"""Crash-safe checkpoints (tsvd.checkpoint): whatever point a save dies at, ``latest`` names a complete,
loadable checkpoint, and the debris of the failed save is ignored and removed by the next one.

The first test kills a real ``tsvd train`` with SIGKILL in the middle of writing a checkpoint
(deterministically: the child blocks after a torn write, see tests/killable.py). The others drive
``save_checkpoint`` directly and make it fail at each step of the publish sequence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_raw
from killable import kill_when_blocked, write_config
from tsvd import checkpoint as ckpt
from tsvd.engine.torch_engine import STATE_FILE
from tsvd.errors import UserError
from tsvd.trainer import Trainer


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, tiny_config):
    over = ("train.threads=1", "train.steps=10", "train.checkpoint_interval=5", "train.eval_interval=100")
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), *over)
    torn = Path(kill_when_blocked(["train", str(config), "--no-progress"], "save:2", tmp_path))

    root = tmp_path / "run" / "checkpoints"
    assert torn == root / ".tmp-step-00000010"  # killed while writing step 10's checkpoint
    assert (torn / STATE_FILE).is_file() and not (torn / ckpt.META_FILE).exists()
    assert not (root / "step-00000010").exists()
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step-00000005"
    state = torch.load(latest / STATE_FILE, weights_only=True)
    assert state["client_state"]["step"] == 5

    # The next run resumes from step 5; its first save (a different step) removes the torn directory.
    resumed = Trainer(tiny_config(*over, "train.checkpoint_interval=3"), progress=False)
    assert resumed.step == 5
    resumed.fit(stop_at=6)
    resumed.close()
    assert not torn.exists() and not list(root.glob(".tmp-*"))
    assert ckpt.latest_checkpoint(root).name == "step-00000006"


# --------------------------------------------------------------------------------------------
# save_checkpoint, failing at each point of the publish sequence


def writer(value: str):
    def write(d: Path) -> None:
        (d / "state.txt").write_text(value)
    return write


def save(root: Path, step: int, value: str = "", **kw) -> Path:
    return ckpt.save_checkpoint(root, step, {"note": value or f"step {step}"}, writer(value or f"step {step}"), **kw)


def content(root: Path) -> str:
    return (ckpt.latest_checkpoint(root) / "state.txt").read_text()


def test_publish_layout(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "step-00000007"
    assert (tmp_path / ckpt.LATEST).read_text() == "step-00000007"
    assert json.loads((path / ckpt.META_FILE).read_text()) == {"step": 7, "note": "step 7"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000007"]  # no debris


def test_failure_while_writing_leaves_previous_latest(tmp_path):
    save(tmp_path, 1)

    def dies(d: Path) -> None:
        (d / "state.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {}, dies)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001" and content(tmp_path) == "step 1"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000001"  # debris is never picked up
    assert (tmp_path / ".tmp-step-00000002").is_dir()
    save(tmp_path, 3)  # another step: the stale directory goes anyway
    assert not list(tmp_path.glob(".tmp-*"))
    assert content(tmp_path) == "step 3"


@pytest.mark.parametrize("fail_on", ["dir", "pointer"])
def test_failure_while_publishing_leaves_a_complete_latest(tmp_path, monkeypatch, fail_on):
    """The rename of the directory, or of the new ``latest`` pointer, fails (a crash at that instant)."""
    save(tmp_path, 1)
    real = os.replace

    def replace(src, dst):
        if (fail_on == "dir") == Path(src).name.startswith(".tmp-"):
            raise OSError("crash")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001" and content(tmp_path) == "step 1"
    assert not (tmp_path / ".latest.tmp").exists() or (tmp_path / ckpt.LATEST).read_text() == "step-00000001"


def test_resaving_the_latest_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    """Replacing the checkpoint ``latest`` points at (same step saved again): a crash after the old one
    is removed but before the new one is published leaves ``latest`` at an older complete checkpoint."""
    save(tmp_path, 1)
    save(tmp_path, 2, "old 2")
    real = os.replace

    def crash_on_publish(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("crash")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_publish)
    with pytest.raises(OSError):
        save(tmp_path, 2, "new 2")
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001" and content(tmp_path) == "step 1"
    save(tmp_path, 2, "new 2")
    assert content(tmp_path) == "new 2"


def test_resaving_the_only_checkpoint_falls_back_to_no_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1, "old")
    monkeypatch.setattr(ckpt.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        save(tmp_path, 1, "new")
    assert ckpt.latest_checkpoint(tmp_path) is None  # a fresh start, never a dangling pointer


def test_keeps_the_newest_and_never_the_published_one_away(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004", "step-00000005"]
    # resuming an older checkpoint among newer leftovers: the new save stays published and kept
    save(tmp_path, 2, "again", keep=1)
    assert content(tmp_path) == "again"


def test_broken_pointer_and_meta_are_user_errors(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ckpt.LATEST).write_text("step-00000042")
    with pytest.raises(UserError, match="points to step-00000042, which is missing or incomplete"):
        ckpt.latest_checkpoint(tmp_path)
    (tmp_path / ckpt.LATEST).write_text("step-00000001")
    (tmp_path / "step-00000001" / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ckpt.read_meta(tmp_path)
