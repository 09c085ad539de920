"""CoreSnapshot: undoing one AdamW update of a few tensors (the non-finite ``s`` guard of both engines)."""

from __future__ import annotations

import math

import torch

from tsvd.engine.core_guard import CoreSnapshot, bad_cores_reason, finite_flags


def adamw_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_restore_undoes_values_and_moments_but_not_the_step_count():
    torch.manual_seed(0)
    s, other = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([s, other], lr=0.1)
    adamw_step([s, other], opt)
    snap = CoreSnapshot.take([s], opt)
    value, moments = s.detach().clone(), {k: opt.state[s][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    tensors = {k: opt.state[s][k] for k in moments}
    adamw_step([s, other], opt)
    assert not torch.equal(s, value)

    snap.restore_(opt)
    assert torch.equal(s, value)
    for k, v in moments.items():
        assert torch.equal(opt.state[s][k], v)
        assert opt.state[s][k] is tensors[k]  # restored in place: ZeRO's views of the state stay valid
    assert int(opt.state[s]["step"]) == int(opt.state[other]["step"]) == 2


def test_restore_before_any_state_zeroes_what_the_update_created():
    s = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([s], lr=0.1)
    snap = CoreSnapshot.take([s], opt)
    adamw_step([s], opt)
    snap.restore_(opt)
    assert torch.equal(s, torch.ones(4))
    assert not opt.state[s]["exp_avg"].any() and not opt.state[s]["exp_avg_sq"].any()
    assert int(opt.state[s]["step"]) == 1


def test_finite_flags_and_reason():
    flags = finite_flags([torch.ones(3), torch.tensor([1.0, math.nan]), torch.tensor([math.inf, 2.0]),
                          torch.tensor([3.0, -math.inf]), torch.zeros(0), torch.full((2, 3), 3e38)])
    assert flags.tolist() == [True, False, False, False, True, True]
    assert finite_flags([]).tolist() == []
    assert bad_cores_reason(["a", "b"]).startswith("non-finite s after the update in a, b:")
