"""``train.retract_every`` through the trainer and the single-process engine: exact retraction wherever
``s`` is read as the spectrum or the weights are handed on, and bitwise resume in the middle of a cycle.
(The retraction-level schedule is tested in test_retraction.py; DeepSpeed in test_deepspeed_engine.py.)"""

import torch

from tsvd.engine.torch_engine import STATE_FILE, read_state
from tsvd.retraction import spectral_factors
from tsvd.retraction_schedule import DRIFT_LIMIT
from tsvd.stiefel import orthonormality_error
from tsvd.trainer import Trainer, train

TOL = 1e-5  # fp32 Cholesky-QR leaves ~1e-6 (test_stiefel.py)


def max_error(factors) -> float:
    return max(float(orthonormality_error(p)) for p in factors)


def test_amortized_run_is_exact_wherever_s_is_read(tiny_config, monkeypatch):
    cfg = tiny_config("train.retract_every=4", "train.steps=13", "train.log_interval=5", "train.checkpoint_interval=6",
                      "rank.policy=energy", "rank.warmup_steps=3", "rank.interval=7", "rank.grow_directions=random")
    trainer = Trainer(cfg, progress=False)
    engine, seen = trainer.engine, []

    def exact(what):
        def check(*args, **kwargs):
            seen.append((what, trainer.step, engine.retractor.stale()))
            return original[what](*args, **kwargs)
        return check

    original = {"plan": trainer.controller.plan, "stats": trainer.metrics.spectral, "save": engine.save}
    monkeypatch.setattr(trainer.controller, "plan", exact("plan"))
    monkeypatch.setattr(trainer.metrics, "spectral", exact("stats"))
    monkeypatch.setattr(engine, "save", exact("save"))
    stale_between = []
    step = engine.train_step

    def spy_step(*args, **kwargs):
        result = step(*args, **kwargs)
        stale_between.append(len(engine.retractor.stale()))
        return result

    monkeypatch.setattr(engine, "train_step", spy_step)
    trainer.fit()
    trainer.close()
    whats = {(w, s) for w, s, _ in seen}
    assert {("plan", 3), ("stats", 5), ("stats", 10), ("save", 6), ("save", 12), ("save", 13)} <= whats
    assert all(not stale for _, _, stale in seen)  # every factor exact at every such point
    assert max(stale_between) > 0  # ... while between them factors were left for later
    saved = read_state(trainer.ckpt_root / "step-00000006" / STATE_FILE)["model"]
    assert max_error(v for k, v in saved.items() if k.endswith((".U", ".V"))) <= TOL


def test_amortized_resume_mid_cycle_equals_uninterrupted(tiny_config, tmp_path):
    over = ("train.retract_every=3", "train.steps=11", "train.checkpoint_interval=4", "train.log_interval=100",
            "train.eval_interval=100")
    full = train(tiny_config(*over, f"out_dir={tmp_path}/full"), progress=False)
    first = Trainer(tiny_config(*over, f"out_dir={tmp_path}/cut"), progress=False)
    first.fit(stop_at=6)  # the last checkpoint is step 4: one step into a 3-step cycle
    first.close()
    second = Trainer(tiny_config(*over, f"out_dir={tmp_path}/cut"), progress=False)
    assert second.step == 4 and second.engine.retractor.schedule.step == 4
    tail = second.fit()
    assert tail.train_losses == full.train_losses[4:]
    reference = read_state(tmp_path / "full" / "checkpoints" / "step-00000011" / STATE_FILE)
    for name, p in second.model.state_dict().items():
        assert torch.equal(p, reference["model"][name]), name
    assert second.engine.retractor.state_dict() == reference["retraction"]
    second.close()


def test_strict_engine_never_leaves_a_factor_stale(tiny_config):
    trainer = Trainer(tiny_config("train.steps=3"), progress=False)
    trainer.fit()
    assert not trainer.engine.retractor.stale() and not trainer.engine.retract_all().retracted
    assert max_error(spectral_factors(trainer.model).values()) <= TOL
    trainer.close()


def test_deepspeed_zero1_amortized_resume_mid_cycle_and_exact_checkpoints(tmp_path):
    """Two CPU processes, ZeRO-1, ``retract_every=3``: a run cut at step 4 (one step into a cycle) and
    resumed to step 7 ends bitwise where the uninterrupted run ends; every checkpoint holds exactly
    orthonormal factors; the last step retracted only the factors due (the first one retracted all: no
    drift rate known yet). (Constant lr after step 0, so the cut run's shorter schedule does not change
    the learning rate.)"""
    import json
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import tiny_raw
    from killable import write_config
    from test_deepspeed_engine import run_job

    from tsvd.distributed import free_port
    from tsvd.engine.ds_checkpoint import read_full_params
    from tsvd.metrics import read_jsonl

    def launch(name: str, out_dir: Path, steps: int) -> None:
        raw = tiny_raw(tmp_path)
        config = write_config(tmp_path / f"{name}.yaml", raw, f"out_dir={out_dir}", f"train.steps={steps}",
                              "train.retract_every=3", "train.checkpoint_interval=4", "train.log_interval=100",
                              "train.eval_interval=100", "train.warmup_steps=0", "train.min_lr_ratio=1.0",
                              # lr 1e-3: ≤ 0.02 drift per step, so a factor waiting k - 1 = 2 steps is
                              # predicted at ≤ 0.04, far below the 0.1 bound: no early retraction. (At 3e-3
                              # the first step's rates reach 0.053 and 2 × 0.053 > 0.1: whether a factor is
                              # early then hangs on the last digits of its drift.)
                              "train.lr=1e-3", "train.spectral_lr=1e-3", "train.core_lr=1e-3")
        if not (tmp_path / "data" / "meta.json").exists():
            run_job("prepare", [sys.executable, "-m", "tsvd.cli", "prepare", str(config), "--no-progress"], tmp_path)
        run_job(name, ["bash", "launch/multi_gpu.sh", str(config), "--no-progress", "--set", "engine.timeout_s=60"],
                tmp_path, env={"NUM_GPUS": "2", "ZERO": "1", "MASTER_PORT": str(free_port())})

    launch("full", tmp_path / "full", 7)
    launch("cut", tmp_path / "cut", 4)
    launch("resumed", tmp_path / "cut", 7)
    full = read_full_params(tmp_path / "full" / "checkpoints" / "step-00000007")
    resumed = read_full_params(tmp_path / "cut" / "checkpoints" / "step-00000007")
    assert full.keys() == resumed.keys()
    for name, t in full.items():
        assert torch.equal(t, resumed[name]), name
    for step in (4, 7):
        params = read_full_params(tmp_path / "full" / "checkpoints" / f"step-{step:08d}")
        assert max_error(t for n, t in params.items() if n.endswith((".U", ".V"))) <= TOL
    last = [r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "spectral/retracted" in r][-1]
    n_factors = sum(n.endswith((".U", ".V")) for n in full)
    assert last["spectral/max_drift"] < DRIFT_LIMIT / 2  # the regime this test needs: far from the bound
    assert 0 < last["spectral/retracted"] < n_factors and last["spectral/early_retractions"] == 0  # about a third
