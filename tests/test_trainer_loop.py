"""The training loop (tsvd/trainer/loop.py), single device: learning, determinism, exact resume, metrics,
guards."""

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tsvd import checkpoint as ckpt
from tsvd.inspect import describe
from tsvd.stiefel import orthonormality_error
from tsvd.trainer import Trainer, TrainingError, train


def test_short_run_learns_and_writes_everything(tiny_config):
    cfg = tiny_config("train.steps=60", "train.eval_interval=30", "train.checkpoint_interval=30")
    summary = train(cfg, progress=False)
    losses = summary.train_losses
    assert summary.step == 60 and len(losses) == 60
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # byte-level text: clearly learns
    assert summary.val_loss < summary.unigram_loss
    assert (ckpt.latest_checkpoint(f"{cfg.out_dir}/checkpoints")).name == "step-00000060"
    assert "layers.1.mlp.down" in describe(cfg.out_dir)

    events = EventAccumulator(f"{cfg.out_dir}/tb").Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "perf/tokens_per_s", "perf/retraction_share", "memory/rss_gb",
                "val/loss", "val/perplexity", "spectral/rank/layers.0.attn.q", "spectral/rank_at_tau/layers.0.attn.q",
                "spectral/effective_rank/layers.1.mlp.up", "spectral/ortho_error/layers.1.mlp.up",
                "spectral/s_max/layers.0.attn.o", "spectral/s_min/layers.0.attn.o"]:
        assert tag in tags, tag
    assert "spectrum/layers.0.attn.q" in events.Tags()["histograms"]
    assert max(e.value for e in events.Scalars("spectral/max_ortho_error")) <= 1e-5


def test_factors_stay_orthonormal(tiny_config):
    trainer = Trainer(tiny_config("train.steps=5"), progress=False)
    trainer.fit()
    for name, p in trainer.engine.retractor.factors().items():
        assert float(orthonormality_error(p)) <= 1e-5, name  # fp32 QR: ~1e-6
    trainer.close()


def test_seeded_runs_are_identical(tiny_config, tmp_path):
    a = train(tiny_config("train.steps=6", f"out_dir={tmp_path}/a"), progress=False)
    b = train(tiny_config("train.steps=6", f"out_dir={tmp_path}/b"), progress=False)
    assert a.train_losses == b.train_losses


def test_resume_reproduces_uninterrupted_run(tiny_config, tmp_path):
    full = train(tiny_config("train.steps=20", f"out_dir={tmp_path}/full"), progress=False)

    cfg = tiny_config("train.steps=20", f"out_dir={tmp_path}/cut")
    first = Trainer(cfg, progress=False)
    head = first.fit(stop_at=12)  # "crash" after step 12; the last checkpoint is step 10
    first.close()
    second = Trainer(tiny_config("train.steps=20", f"out_dir={tmp_path}/cut"), progress=False)
    assert second.step == 10
    tail = second.fit()
    second.close()
    assert head.train_losses[:10] + tail.train_losses == full.train_losses  # bitwise on CPU


def test_non_finite_steps_are_skipped_then_stop(tiny_config):
    trainer = Trainer(tiny_config("train.steps=20", "train.max_bad_steps=3"), progress=False)
    trainer.fit(stop_at=10)  # a good checkpoint at step 10
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.layers[0].mlp.up.s.fill_(float("nan"))  # poisons every forward from now on
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        trainer.fit()
    for k, v in trainer.model.state_dict().items():
        if "mlp.up.s" not in k:
            assert torch.equal(v, before[k]), f"{k} changed during skipped steps"
    assert ckpt.latest_checkpoint(trainer.ckpt_root).name == "step-00000010"
    trainer.close()
    resumed = Trainer(tiny_config("train.steps=20"), progress=False)
    assert resumed.step == 10 and all(math.isfinite(float(p.sum())) for p in resumed.model.parameters())
    resumed.close()


def test_fisher_budget_run_reads_adams_second_moment_and_resumes_exactly(tiny_config, tmp_path):
    """``rank.score: fisher``: the controller gets ``TorchEngine.core_grad_sq`` — AdamW's ``exp_avg_sq``
    of every ``s``, zeros before the first step — changes ranks within the budget, and a resumed run
    decides exactly as the uninterrupted one."""
    fisher = ("rank.policy=budget", "rank.score=fisher", "rank.warmup_steps=4", "rank.interval=4", "rank.protect=1",
              "train.steps=16", "train.checkpoint_interval=6")
    trainer = Trainer(tiny_config(*fisher, f"out_dir={tmp_path}/probe"), progress=False)
    assert all(torch.equal(v, torch.zeros_like(m.s)) for (n, v), m in
               zip(trainer.engine.core_grad_sq().items(), trainer.engine.spectral.values()))
    trainer.fit(stop_at=1)
    got = trainer.engine.core_grad_sq()
    for name, module in trainer.engine.spectral.items():
        want = trainer.engine.optimizer.state[module.s]["exp_avg_sq"]
        assert torch.equal(got[name], want) and float(got[name].sum()) > 0, name
    trainer.close()

    full = Trainer(tiny_config(*fisher, f"out_dir={tmp_path}/full"), progress=False)
    full_summary = full.fit()
    ranks = {n: m.rank for n, m in full.engine.spectral.items()}
    full.close()
    assert len(set(ranks.values())) > 1  # the budget moved rank between layers
    cut = Trainer(tiny_config(*fisher, f"out_dir={tmp_path}/cut"), progress=False)
    head = cut.fit(stop_at=9)  # the last checkpoint is step 6, before the decisions at 8, 12 and 16
    cut.close()
    again = Trainer(tiny_config(*fisher, f"out_dir={tmp_path}/cut"), progress=False)
    tail = again.fit()
    assert head.train_losses[:6] + tail.train_losses == full_summary.train_losses
    assert {n: m.rank for n, m in again.engine.spectral.items()} == ranks
    again.close()
