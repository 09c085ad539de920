"""``bench/step_in_backward.py``: fused AdamW applied block by block inside backward equals "backward,
step, retract", holds one block's gradients at a time, and refuses blocks that do not partition the model.
Tolerances as in tests/test_optim.py (same per-parameter AdamW arithmetic; 1e-6 after 4 steps)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from test_optim import TOL, backward, batch, max_ortho, spectral_model, train_cfg
from tsvd.optim import build_adamw
from tsvd.retraction import Retractor, spectral_factors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not a package

from step_in_backward import StepInBackward, model_blocks  # noqa: E402


def test_step_in_backward_equals_step_after_backward():
    t = train_cfg(1e-2)
    a = spectral_model(3)
    b = copy.deepcopy(a)
    stepper = StepInBackward(a, t)
    opt, retractor = build_adamw(b, t, "cpu"), Retractor(b)
    for step in range(4):
        backward(a, step)  # updates a, block by block, inside backward
        report = stepper.finish()  # … then retracts every factor
        assert len(report.retracted) == len(spectral_factors(a))
        backward(b, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        retractor()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert pa.grad is None
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=1e-6, msg=f"{name} at step {step}")
    assert max_ortho(a) <= TOL
    assert stepper.optimizer_seconds > 0 and set(stepper.retractor.cache) == set(retractor.cache)


def test_step_in_backward_holds_one_block_of_gradients_at_a_time():
    model = spectral_model(4)
    stepper = StepInBackward(model, train_cfg())
    params = list(model.parameters())
    live: list[int] = []
    for p in params:  # registered after the stepper's hooks, so they run after a block has stepped
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    backward(model, 0)
    largest_block = max(len(u.params) for u in stepper.units)
    assert len(params) > 2 * largest_block
    assert max(live) <= largest_block  # never all gradients at once
    assert all(p.grad is None for p in params)
    assert [type(m).__name__ for m in model_blocks(model)] == ["SpectralEmbedding", "Block", "Block", "RMSNorm",
                                                               "SpectralLinear"]


def test_step_in_backward_finish_steps_blocks_that_missed_a_gradient():
    model = spectral_model(5)
    stepper = StepInBackward(model, train_cfg())
    before = model.lm_head.U.detach().clone()
    x, _ = batch(0)
    model.norm(model.tok_emb(x)).sum().backward()  # the layers and the head get no gradient
    assert model.tok_emb.U.grad is None and model.norm.weight.grad is None  # complete blocks stepped
    stepper.finish()  # nothing partial: the head and layers were never touched
    torch.testing.assert_close(model.lm_head.U.detach(), before, rtol=0, atol=1e-6)  # retracted only
    model.lm_head.s.sum().backward()  # only part of the head's block
    assert model.lm_head.s.grad is not None
    stepper.finish()
    assert model.lm_head.s.grad is None and max_ortho(model) <= TOL


def test_step_in_backward_rejects_overlapping_or_incomplete_blocks():
    model = spectral_model(6)
    with pytest.raises(ValueError, match="overlap"):
        StepInBackward(model, train_cfg(), blocks=[model, model.norm])
    with pytest.raises(ValueError, match="do not cover"):
        StepInBackward(model, train_cfg(), blocks=[model.norm])
    stepper = StepInBackward(model, train_cfg())
    stepper.remove()
    backward(model, 0)  # hooks detached: gradients stay
    assert all(p.grad is not None for p in model.parameters())
