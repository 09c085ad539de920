"""``train.retract_every`` through the trainer and the single-process engine: exact retraction wherever
``s`` is read as the spectrum or the weights are handed on, and bitwise resume in the middle of a cycle.
(The retraction-level schedule is tested in test_retraction.py; DeepSpeed in test_deepspeed_engine.py.)"""

import torch

from tsvd.engine.torch_engine import STATE_FILE, read_state
from tsvd.retraction import spectral_factors
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
