"""Reliability guarantees of a training run (docs/reliability.md lists each one and its test).

- Ctrl-C checkpoints only at a step boundary; exact resume after ``SIGKILL`` of ``python -m tsvd.cli
  train`` (rank changes before and after the kill), and of a two-process DeepSpeed run;
- numeric guards: a non-finite ``s`` after an update is not accepted, N bad steps stop the run (CLI
  exit 1) with a usable checkpoint, an orthonormality error beyond tolerance is repaired (Householder);
- untrusted files: a malicious pickle in a checkpoint is refused, never executed; every ``torch.load``
  in the package is ``weights_only=True``; exports hold no pickles;
- distributed failure: a hung rank ends the job after ``engine.timeout_s``, a killed rank at once.

Every run is tiny (tests/conftest.py) with ``train.threads=1``: several test sessions share two cores,
and two threads per process made steps ~100× slower under that load. Child processes run in their own
session and their whole process tree is killed on return or timeout (tests/killable.py).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch

import tsvd
from conftest import tiny_raw
from ds_common import poison_s, sloppy_retraction
from killable import kill_when_blocked, launch, launch_script, run_cli, write_config
from tsvd import checkpoint as ckpt
from tsvd.cli import main
from tsvd.config import load_config
from tsvd.engine import torch_engine
from tsvd.errors import UserError
from tsvd.metrics import read_jsonl
from tsvd.retraction import Retractor, repair_tolerance, spectral_factors
from tsvd.stiefel import orthonormality_error
from tsvd.trainer import STOPPED_EXIT_CODE, Trainer

REPO = Path(__file__).resolve().parents[1]
FAST = ("train.threads=1",)


# --------------------------------------------------------------------------------------------
# Helpers shared by the tests below


def losses_by_step(out_dir: Path) -> dict[int, list[float]]:
    """Every ``train/loss`` logged in ``metrics.jsonl``, by step (a replayed step appears twice)."""
    out: dict[int, list[float]] = {}
    for rec in read_jsonl(Path(out_dir) / "metrics.jsonl"):
        if "train/loss" in rec:
            out.setdefault(rec["step"], []).append(rec["train/loss"])
    return out


def events(out_dir: Path, tag: str) -> list[dict]:
    return [r for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if r.get("event") == tag]


# --------------------------------------------------------------------------------------------
# Orthonormality repair


@pytest.fixture
def sloppy_cholesky():
    """Every Cholesky-QR result slightly non-orthonormal for the test (``ds_common.sloppy_retraction``)."""
    with sloppy_retraction():
        yield


def test_orthonormality_beyond_tolerance_is_repaired(sloppy_cholesky):
    torch.manual_seed(0)
    model = torch.nn.Sequential(tsvd.SpectralLinear(16, 40, 6), tsvd.SpectralLinear(40, 16, 6))
    retractor = Retractor(model)
    quiet = retractor()  # not measured: nothing is known, nothing repaired
    assert quiet.repaired == []
    assert max(float(orthonormality_error(p)) for p in spectral_factors(model).values()) > 1e-4

    report = retractor(measure_error=True)
    names = list(spectral_factors(model))
    assert sorted(report.repaired) == sorted(names)
    assert set(report.repaired) <= set(report.fallbacks)
    for name, p in spectral_factors(model).items():
        assert float(orthonormality_error(p)) <= repair_tolerance(torch.float32), name
        assert retractor.cache[name].error <= repair_tolerance(torch.float32)
        assert retractor.cache[name].householder


def test_good_retraction_is_not_repaired():
    torch.manual_seed(0)
    model = tsvd.SpectralLinear(16, 40, 6)
    with torch.no_grad():
        model.U.add_(1e-3 * torch.randn_like(model.U))
    report = Retractor(model)(measure_error=True)
    assert report.repaired == [] and report.fallbacks == []


def test_trainer_logs_repairs(tiny_config, sloppy_cholesky):
    cfg = tiny_config(*FAST, "train.steps=2", "train.log_interval=1", "train.eval_interval=100",
                      "train.checkpoint_interval=100")
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    trainer.close()
    logged = events(cfg.out_dir, "retraction_repair")
    assert [e["step"] for e in logged] == [1, 2]
    assert "layers.0.attn.q.U" in logged[0]["message"] and "Householder" in logged[0]["message"]
    for p in trainer.engine.retractor.factors().values():
        assert float(orthonormality_error(p)) <= 1e-5


def test_a_non_finite_state_is_never_checkpointed(tmp_path, monkeypatch, capsys):
    """An update that leaves a dense weight infinite (finite loss and gradients: the guards on ``s`` do
    not see it) right before a checkpoint: the state is not published, ``tsvd train`` stops with one
    line naming the parameter (exit 1), and ``latest`` still points at the last good checkpoint."""
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), *FAST, "train.steps=20",
                          "train.checkpoint_interval=3", "train.eval_interval=100")
    real_step, calls = torch_engine.TorchEngine.train_step, []

    def train_step(self, *args, **kwargs):
        calls.append(1)
        result = real_step(self, *args, **kwargs)
        if len(calls) == 6:  # the update of step 6, a checkpoint step
            with torch.no_grad():
                self.model.layers[1].mlp_norm.weight[0] = math.inf
        return result

    monkeypatch.setattr(torch_engine.TorchEngine, "train_step", train_step)
    assert main(["train", str(config), "--no-progress"]) == 1
    root = tmp_path / "run" / "checkpoints"
    assert capsys.readouterr().err.strip().splitlines() == [
        "tsvd: training stopped: non-finite values in layers.1.mlp_norm.weight at step 6: this state is not "
        f"saved. Last good checkpoint: {root / 'step-00000003'}"]
    assert ckpt.latest_checkpoint(root).name == "step-00000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003"]  # no step 6, no leftovers


# --------------------------------------------------------------------------------------------
# Interrupts (Ctrl-C): a checkpoint is only ever taken at a step boundary


@pytest.fixture
def default_sigint():
    """Python's default Ctrl-C handler for the test. A process started in the background (nohup, `&`,
    some CI runners) inherits SIGINT ignored, and the trainer then rightly leaves SIGINT alone."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_interrupt_checkpoints_only_at_a_step_boundary(tiny_config, tmp_path, monkeypatch, default_sigint):
    """Ctrl-C inside a step (here: right after the optimizer update) must not publish that half-done
    state; the first Ctrl-C is deferred to the end of the step, which is then checkpointed. Either way
    the resumed run reproduces the uninterrupted one bitwise."""
    over = (*FAST, "train.steps=8", "train.checkpoint_interval=4", "train.eval_interval=100", "train.log_interval=1")
    full = Trainer(tiny_config(*over, f"out_dir={tmp_path}/full"), progress=False)
    reference = full.fit().train_losses
    full.close()

    cut = tiny_config(*over, f"out_dir={tmp_path}/cut")
    first = Trainer(cut, progress=False)
    real_step = first.engine.train_step

    def update_then_interrupt(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if first.step == 6:  # inside step 7: updated, not yet counted
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(first.engine, "train_step", update_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.close()
    assert ckpt.latest_checkpoint(first.ckpt_root).name == "step-00000004"

    second = Trainer(tiny_config(*over, f"out_dir={tmp_path}/cut"), progress=False)
    assert second.step == 4
    real_step2 = second.engine.train_step

    def sigint_inside_step(*args, **kwargs):
        if second.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: deferred to the end of step 6
        return real_step2(*args, **kwargs)

    monkeypatch.setattr(second.engine, "train_step", sigint_inside_step)
    with pytest.raises(KeyboardInterrupt):
        second.fit()
    second.close()
    assert second.step == 6 and ckpt.latest_checkpoint(second.ckpt_root).name == "step-00000006"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    third = Trainer(tiny_config(*over, f"out_dir={tmp_path}/cut"), progress=False)
    assert third.step == 6
    tail = third.fit().train_losses
    third.close()
    assert reference == reference[:4] + [*losses_of(second, 4, 6)] + tail


def test_sigterm_checkpoints_at_the_step_boundary(tiny_config, tmp_path, monkeypatch, default_sigint):
    """SIGTERM (a scheduler preempting the job) inside a step: the step finishes, is checkpointed, the run
    stops; SIGTERM's default handling is back afterwards, and the resumed run equals the uninterrupted one."""
    over = (*FAST, "train.steps=6", "train.checkpoint_interval=100", "train.eval_interval=100", "train.log_interval=1")
    full = Trainer(tiny_config(*over, f"out_dir={tmp_path}/full"), progress=False)
    reference = full.fit().train_losses
    full.close()

    cut = Trainer(tiny_config(*over, f"out_dir={tmp_path}/cut"), progress=False)
    real_step = cut.engine.train_step

    def sigterm_inside_step(*args, **kwargs):
        if cut.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # deferred to the end of step 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(cut.engine, "train_step", sigterm_inside_step)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    cut.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert cut.step == 3 and ckpt.latest_checkpoint(cut.ckpt_root).name == "step-00000003"

    resumed = Trainer(tiny_config(*over, f"out_dir={tmp_path}/cut"), progress=False)
    tail = resumed.fit().train_losses
    resumed.close()
    assert reference == [*losses_of(cut, 0, 3)] + tail


def losses_of(trainer: Trainer, start: int, stop: int) -> list[float]:
    """Losses of steps ``start+1..stop`` as logged to metrics.jsonl by ``trainer``'s out_dir (the last entry per step)."""
    logged = losses_by_step(trainer.out_dir)
    return [logged[s][-1] for s in range(start + 1, stop + 1)]


# --------------------------------------------------------------------------------------------
# Numeric guards


def test_non_finite_s_after_the_update_is_not_accepted(tiny_config):
    cfg = tiny_config(*FAST, "train.steps=4", "train.log_interval=1", "train.eval_interval=100")
    trainer = Trainer(cfg, progress=False)
    trainer.fit(stop_at=2)
    opt = trainer.engine.optimizer
    cores = [m.s for m in trainer.model.modules() if isinstance(m, tsvd.SpectralModule)]
    before = [c.detach().clone() for c in cores]
    state_before = [{k: v.clone() for k, v in opt.state[c].items()} for c in cores]
    factors_before = {n: p.detach().clone() for n, p in spectral_factors(trainer.model).items()}

    with poison_s(trainer.engine, layer="layers.0.mlp.up"):  # the update of step 3 overflows one s
        trainer.fit(stop_at=3)
    for c, b, st in zip(cores, before, state_before):  # every s and its Adam moments as before the step
        assert torch.equal(c, b)
        assert all(torch.equal(opt.state[c][k], st[k]) for k in ("exp_avg", "exp_avg_sq"))
        assert int(opt.state[c]["step"]) == int(st["step"]) + 1 == int(opt.state[trainer.model.layers[0].attn.q.U]["step"])
    for name, p in spectral_factors(trainer.model).items():  # the factors took their step, retracted
        assert not torch.equal(p, factors_before[name]) and float(orthonormality_error(p)) <= 1e-5, name
    bad = events(cfg.out_dir, "bad_step")
    assert [e["step"] for e in bad] == [3]
    assert "non-finite s after the update in layers.0.mlp.up" in bad[0]["message"]

    summary = trainer.fit()  # the next step is normal again
    trainer.close()
    assert summary.step == 4 and math.isfinite(summary.train_losses[-1])
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_consecutive_bad_steps_stop_the_cli_with_exit_1(tmp_path, monkeypatch, capsys):
    """``tsvd train``: three bad steps in a row (non-finite ``s`` from the update) stop the run with one
    line on stderr and exit code 1; the last checkpoint (before the trouble) resumes cleanly."""
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), *FAST, "train.steps=20",
                          "train.checkpoint_interval=5", "train.eval_interval=100", "train.max_bad_steps=3")
    real_step, calls = torch_engine.TorchEngine.train_step, []

    def train_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) < 7:
            return real_step(self, *args, **kwargs)
        with poison_s(self, layer="layers.1.attn.v"):
            return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch_engine.TorchEngine, "train_step", train_step)
    assert main(["train", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    root = tmp_path / "run" / "checkpoints"
    assert err == [f"tsvd: training stopped: 3 consecutive non-finite steps at step 9; stopping. "
                   f"Last good checkpoint: {root / 'step-00000005'}"]
    assert ckpt.latest_checkpoint(root).name == "step-00000005"
    assert len(events(tmp_path / "run", "bad_step")) == 3

    monkeypatch.undo()
    resumed = Trainer(load_config(config), progress=False)
    assert resumed.step == 5 and all(bool(torch.isfinite(p).all()) for p in resumed.model.parameters())
    resumed.close()


# --------------------------------------------------------------------------------------------
# Untrusted files


class Payload:
    """Unpickling this creates ``path`` (as ``open(path, "w")`` would): proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_in_a_checkpoint_is_refused_not_executed(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), *FAST, "train.steps=2",
                          "train.checkpoint_interval=1", "train.eval_interval=100")
    assert main(["train", str(config), "--no-progress"]) == 0
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    state_file = latest / torch_engine.STATE_FILE
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe.pt"
    torch.save({"x": Payload(marker)}, probe)  # the payload is live: a plain load would run it
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    state = torch.load(state_file, weights_only=True)
    state["client_state"]["evil"] = Payload(marker)  # a real checkpoint with one hostile object inside
    torch.save(state, state_file)
    capsys.readouterr()
    for argv in (["train", str(config), "--set", "train.steps=3", "--no-progress"], ["export", str(tmp_path / "run"),
                                                                                         str(tmp_path / "hf")]):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("tsvd: error: ") and str(state_file) in err, err
        assert not marker.exists()
    assert "io.open" in err or "refused" in err or "cannot be read safely" in err

    # the same through a real process: one line, exit 2, no traceback, nothing executed
    proc = run_cli(["train", str(config), "--set", "train.steps=3", "--no-progress"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refused" in proc.stderr and "io.open" in proc.stderr
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """A static guard: no ``torch.load`` without ``weights_only=True``, no ``pickle.load(s)``, no
    ``numpy.load(allow_pickle=True)`` anywhere in tsvd/."""
    offenders, loads = [], 0
    for path in sorted((REPO / "tsvd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                loads += 1
                if kw.get("weights_only") != "True":
                    offenders.append(f"{where}: {ast.unparse(node)}")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                offenders.append(f"{where}: {name}")
            if name.endswith("np.load") and kw.get("allow_pickle") not in (None, "False"):
                offenders.append(f"{where}: {ast.unparse(node)}")
    assert loads == 2  # torch_engine.read_state (engine resume and HF export) and the DeepSpeed loader: seen
    assert offenders == []


# --------------------------------------------------------------------------------------------
# Exact resume after SIGKILL


ADAPTIVE = (*FAST, "train.steps=16", "train.grad_accum=2", "train.log_interval=1", "train.checkpoint_interval=5",
            "train.eval_interval=8", "rank.policy=energy", "rank.warmup_steps=3", "rank.interval=3", "rank.energy=0.9")


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    """``python -m tsvd.cli train`` with the energy rank policy (ranks change at steps 3, 9, 12 and 15:
    growth from the sketched gradient and shrinking) is killed with SIGKILL inside step 13; the last
    checkpoint is step 10. ``tsvd train`` again resumes there and every logged loss, validation loss,
    rank change and the final parameters equal the uninterrupted run's, bitwise."""
    # The reference runs in a child too: same environment (OMP_NUM_THREADS=1 also single-threads LAPACK,
    # which the gradient sketch uses; this test process may use more threads there).
    ref_config = write_config(tmp_path / "ref.yaml", tiny_raw(tmp_path), *ADAPTIVE, f"out_dir={tmp_path}/ref")
    proc = run_cli(["train", str(ref_config), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses = {step: v[0] for step, v in losses_by_step(tmp_path / "ref").items()}
    ref_changes = events(tmp_path / "ref", "rank_change")
    change_steps = sorted({e["step"] for e in ref_changes})
    assert any(s < 10 for s in change_steps) and any(10 < s < 13 for s in change_steps), change_steps

    config = write_config(tmp_path / "cut.yaml", tiny_raw(tmp_path), *ADAPTIVE, f"out_dir={tmp_path}/cut")
    kill_when_blocked(["train", str(config), "--no-progress"], "step:13", tmp_path)
    root = tmp_path / "cut" / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step-00000010"
    client = torch.load(latest / torch_engine.STATE_FILE, weights_only=True)["client_state"]
    assert client["sampler"]["step"] == 20  # two micro-batches per step: the data position is saved
    assert set(ckpt.read_meta(latest)["ranks"].values()) != {8}  # saved after rank changes (all started at 8)

    proc = run_cli(["train", str(config), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    logged = losses_by_step(tmp_path / "cut")
    assert sorted(logged) == sorted(ref_losses)
    for step, values in logged.items():  # steps 11–12 were logged twice: before the kill and after resuming
        assert values == [ref_losses[step]] * len(values), step
    assert [len(logged[s]) for s in (10, 11, 12, 13)] == [1, 2, 2, 1]
    # rank changes: the killed run logged those of steps 3–12, the resumed run replayed 12 and went on
    before_kill = [e for e in ref_changes if e["step"] <= 12]
    after_resume = [e for e in ref_changes if e["step"] > 10]
    assert events(tmp_path / "cut", "rank_change") == before_kill + after_resume
    assert val_losses(tmp_path / "cut") == val_losses(tmp_path / "ref")

    final = [torch.load(d / "checkpoints" / "step-00000016" / torch_engine.STATE_FILE, weights_only=True)
             for d in (tmp_path / "ref", tmp_path / "cut")]
    assert_bitwise_equal(final[0], final[1])  # parameters, Adam moments and steps, sampler, controller


def val_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in read_jsonl(out_dir / "metrics.jsonl") if "val/loss" in r]


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values: same structure, same bits."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------------------------
# Two processes (DeepSpeed, ZeRO-1, through torchrun: a free port per launch)


@pytest.fixture
def deepspeed_engine():
    if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("tsvd.engine.deepspeed_engine") is None:
        pytest.skip("needs deepspeed and tsvd.engine.deepspeed_engine")


DS_TIMEOUT_S = 10
DISTRIBUTED = (*FAST, "train.steps=6", "train.checkpoint_interval=2", "train.eval_interval=100", "train.log_interval=1",
               "engine.kind=deepspeed", f"engine.deepspeed_config={REPO / 'configs' / 'ds' / 'zero1.json'}",
               f"engine.timeout_s={DS_TIMEOUT_S}", "rank.policy=energy", "rank.warmup_steps=2", "rank.interval=2",
               "rank.energy=0.9")


def test_two_process_failures_end_the_job_and_resume_is_exact(tmp_path, deepspeed_engine):
    """2 ranks, ranks changing at steps 2 (growth) and 6 (shrink). (1) A rank that hangs (alive, out of the collectives) ends
    the job non-zero after ``engine.timeout_s``, not the 10-minute default. (2) A rank killed by SIGKILL
    ends the job non-zero at once. (3) ``tsvd train`` again resumes the killed run from its last
    checkpoint and reproduces the uninterrupted two-process run's losses and rank changes bitwise."""
    def config(name: str, *extra: str) -> list[str]:
        path = write_config(tmp_path / f"{name}.yaml", tiny_raw(tmp_path), *DISTRIBUTED, f"out_dir={tmp_path}/{name}", *extra)
        return ["train", str(path), "--no-progress"]

    ref = launch(config("ref"), tmp_path, nproc=2)
    assert ref.returncode == 0, ref.log[-3000:]
    ref_losses = {step: v[0] for step, v in losses_by_step(tmp_path / "ref").items()}
    ref_changes = events(tmp_path / "ref", "rank_change")
    assert sorted(ref_losses) == list(range(1, 7)) and {e["step"] for e in ref_changes} == {2, 6}, ref_changes

    hang = launch(config("hang"), tmp_path, block="step:2:1", nproc=2, wait_for_block=False, timeout=240)
    hung_for = hang.ended - Path(hang.marker).stat().st_mtime
    assert hang.returncode not in (0, None), hang.log[-3000:]
    assert f"Timed out waiting {DS_TIMEOUT_S * 1000}ms" in hang.log
    assert DS_TIMEOUT_S - 1 <= hung_for <= DS_TIMEOUT_S + 45, hung_for
    assert re.search(r"^tsvd: training stopped: rank 0: a collective operation failed in step \d+ \(.*Timed out "
                     r".*\); usually another rank died or stopped answering", hang.log, re.M), hang.log[-3000:]

    # torchrun would terminate rank 0 as soon as it sees rank 1 dead — possibly before rank 0's collective
    # fails and it can say so; a slower monitor lets the survivor speak first (it notices within ms).
    died = launch(config("cut", "engine.timeout_s=600"), tmp_path, block="die:5:1", nproc=2, wait_for_block=False,
                  timeout=240, monitor_interval=10)
    assert died.returncode not in (0, None), died.log[-3000:]
    assert died.ended - Path(died.marker).stat().st_mtime < 60  # far below the 600 s process-group timeout
    latest = ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert latest.name == "step-00000004"
    stopped = [line for line in died.log.splitlines() if line.startswith("tsvd: training stopped: rank 0:")]
    assert len(stopped) == 1 and "a collective operation failed in step 5" in stopped[0], died.log[-3000:]
    assert stopped[0].endswith(f"Last checkpoint: {latest}; run the same command again to resume from it")

    resumed = launch(config("cut"), tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.log[-3000:]
    logged = losses_by_step(tmp_path / "cut")
    assert sorted(logged) == sorted(ref_losses)
    for step, values in logged.items():
        assert values == [ref_losses[step]] * len(values), step
    before_kill = [e for e in ref_changes if e["step"] <= 4]
    after_resume = [e for e in ref_changes if e["step"] > 4]
    assert events(tmp_path / "cut", "rank_change") == before_kill + after_resume


def test_exports_hold_no_pickles(tmp_path):
    """What tsvd writes for exchange (``tsvd export``: dense HF checkpoint or factors) is safetensors and
    JSON/text only — nothing a reader has to unpickle."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs the 'hf' extra")
    from safetensors import safe_open

    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), *FAST, "train.steps=1", "train.eval_interval=100")
    assert main(["train", str(config), "--no-progress"]) == 0
    for extra, name in (([], "dense"), (["--factors"], "factors")):
        assert main(["export", str(tmp_path / "run"), str(tmp_path / name), *extra]) == 0
        files = [p for p in (tmp_path / name).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), files
        for p in files:
            head = p.read_bytes()[:4]
            assert p.suffix in (".safetensors", ".json", ".txt", ".md", ".jinja"), p
            assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{p} looks like a pickle / torch.save file"
            if p.suffix == ".safetensors":
                with safe_open(str(p), "pt") as f:
                    assert len(list(f.keys())) > 0


def test_deepspeed_checkpoint_loader_refuses_pickled_code(tmp_path, deepspeed_engine):
    """DeepSpeed's own loader unpickles freely; the DeepSpeed engine replaces it by a ``weights_only``
    loader (three DeepSpeed classes allow-listed) for every file of a checkpoint; a refusal is a UserError."""
    from tsvd.engine.deepspeed_engine import weights_only_loader

    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"mp_rank_00_model_states.pt: refused: .*Unsupported global"):
        weights_only_loader(str(path), map_location="cpu")
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}}, path)
    assert torch.equal(weights_only_loader(str(path))["module"]["w"], torch.ones(2))


# --------------------------------------------------------------------------------------------
# Preemption of a multi-process run (launch/multi_gpu.sh: the DeepSpeed launcher, two CPU ranks, ZeRO-2)


PREEMPT = (*FAST, "train.steps=24", "train.log_interval=1", "train.checkpoint_interval=100", "train.eval_interval=8",
           "engine.timeout_s=60", "rank.policy=energy", "rank.warmup_steps=4", "rank.interval=4", "rank.energy=0.9")


def stopped_at(log: str) -> int:
    """The step of the one ``tsvd: stopped at step N on SIGTERM`` line (rank 0's) in a launch log."""
    lines = [line for line in log.splitlines() if line.startswith("tsvd: stopped at step")]
    assert len(lines) == 1, log[-3000:]
    assert log.count("SIGTERM: stopping after this step with a checkpoint") == 1, log[-3000:]
    return int(re.match(r"tsvd: stopped at step (\d+) on SIGTERM with checkpoint ", lines[0]).group(1))


def test_preempted_two_process_run_stops_together_saves_and_resumes_exactly(tmp_path, deepspeed_engine):
    """(1) SIGTERM to every process of the job, as SLURM preempts one (the launcher passes it on to ranks
    that got it already: that copy is not a second signal): both ranks stop at the same step boundary and
    save one checkpoint of it. (2) Resumed, then SIGTERM to the ranks only: the same, and the job's exit
    status is 75 (``STOPPED_EXIT_CODE``) through the launcher. (3) Resumed to the end: every loss,
    validation loss and rank change equals the uninterrupted two-process run's, bitwise; no step ran twice."""
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), *PREEMPT)

    def run(name: str, **kwargs):
        return launch_script([str(config), "--set", f"out_dir={tmp_path / name}"], tmp_path, **kwargs)

    ref = run("ref")
    assert ref.returncode == 0, ref.log[-3000:]
    ref_losses = {step: v[0] for step, v in losses_by_step(tmp_path / "ref").items()}
    assert sorted(ref_losses) == list(range(1, 25))
    # the log of a launcher: one plain progress line per logged step, from rank 0 only, no carriage return
    assert len(re.findall(r"^step \d+/24 \| loss ", ref.log, re.M)) == 24 and "\r" not in ref.log
    root = tmp_path / "cut" / "checkpoints"

    job = run("cut", signal_at=3, to="job")
    first = stopped_at(job.log)
    assert 3 <= first < 24 and ckpt.latest_checkpoint(root).name == ckpt.step_dir_name(first)

    ranks = run("cut", signal_at=first + 3, to="ranks")
    assert ranks.returncode == STOPPED_EXIT_CODE == 75, ranks.log[-3000:]
    second = stopped_at(ranks.log)
    assert first + 3 <= second < 24 and ckpt.latest_checkpoint(root).name == ckpt.step_dir_name(second)

    last = run("cut")
    assert last.returncode == 0, last.log[-3000:]
    logged = losses_by_step(tmp_path / "cut")
    assert {step: v for step, v in logged.items()} == {step: [loss] for step, loss in ref_losses.items()}
    assert val_losses(tmp_path / "cut") == val_losses(tmp_path / "ref")
    changes = events(tmp_path / "ref", "rank_change")
    assert changes and events(tmp_path / "cut", "rank_change") == changes


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tiny_config, monkeypatch, default_sigint):
    """SIGTERM asks for a checkpoint at the step boundary; a second SIGTERM while that checkpoint is being
    written (after ``REPEAT_S``) stops at once: nothing half-written is published, ``latest`` stays the
    previous good checkpoint and resumes. A repeat within ``REPEAT_S`` is the same request (no effect)."""
    from tsvd.trainer import stop as stop_module

    cfg = tiny_config(*FAST, "train.steps=8", "train.checkpoint_interval=2", "train.eval_interval=100")
    cut = Trainer(cfg, progress=False)
    real_step, real_save = cut.engine.train_step, cut.engine.save

    def signal_twice_inside_step(*args, **kwargs):
        if cut.step == 2:  # inside step 3: a signal and its copy from a launcher
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    def save_then_signal(path, client_state):
        real_save(path, client_state)
        if cut.step == 3:  # the stop's checkpoint is written but not published: the second signal lands
            monkeypatch.setattr(stop_module, "REPEAT_S", 0.0)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cut.engine, "train_step", signal_twice_inside_step)
    monkeypatch.setattr(cut.engine, "save", save_then_signal)
    with pytest.raises(KeyboardInterrupt) as stop:
        cut.fit()
    cut.close()
    assert type(stop.value) is KeyboardInterrupt  # not a clean Stopped: the save was cut short
    assert cut.step == 3 and ckpt.latest_checkpoint(cut.ckpt_root).name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    resumed = Trainer(cfg, progress=False)
    assert resumed.step == 2
    resumed.close()
