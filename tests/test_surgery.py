"""Rank surgery: exact energy accounting on shrink, unchanged function on growth, optimizer state
that follows the columns (fused and for-loop AdamW), released memory, compute that follows the rank,
plan replay, and the single-device engine's ``apply_rank_plan`` in a training loop.

Tolerances: fp32 eps ≈ 1.2e-7. ``‖W − W'‖_F²`` is computed in float64 from fp32 factors that are
orthonormal to ~1e-6, so it equals ``Σ dropped sᵢ²`` to ~2·1e-6 relative: checked at 1e-5. Outputs
after growth differ from before only by the summation order of extra zero terms inside the GEMM:
~eps·√r relative, checked at 1e-5 as the brief asks.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from tsvd.config import Config
from tsvd.controller import RankPlan
from tsvd.engine.torch_engine import TorchEngine
from tsvd.errors import UserError
from tsvd.retraction import retract_
from tsvd.sketch import GradientSketch
from tsvd.spectral import SpectralLinear
from tsvd.stiefel import orthonormality_error
from tsvd.surgery import apply_plan, grow_values

VOCAB, DIM = 64, 48


class TinyLM(nn.Module):
    """Embedding → two spectral layers → head; ``forward(idx, targets) -> (logits, loss)`` like tsvd.model."""

    def __init__(self, rank: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.a = SpectralLinear(DIM, 96, rank, bias=False)
        self.b = SpectralLinear(96, DIM, rank, bias=False)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx, targets=None):
        logits = self.head(self.b(F.gelu(self.a(self.emb(idx)))))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def batch(seed: int, B: int = 4, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def trained(fused: bool, steps: int = 3) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    for i in range(steps):
        model(*batch(i))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        retract_(model)
    return model, opt


def dense(layer: SpectralLinear) -> torch.Tensor:
    return (layer.V.detach().double() * layer.s.detach().double()) @ layer.U.detach().double().T


def test_shrink_removes_exactly_the_dropped_energy():
    model, opt = trained(fused=True)
    layer = model.a
    s = layer.s.detach().clone()
    W = dense(layer)
    changes = apply_plan(model, opt, RankPlan(10, {"a": 5}))
    dropped = s.double().abs().sort().values[:7].square().sum()  # the 7 smallest |s|
    assert float(((W - dense(layer)) ** 2).sum()) == pytest.approx(float(dropped), rel=1e-5)
    (c,) = changes
    assert (c.layer, c.old, c.new) == ("a", 12, 5)
    assert c.energy_before - c.energy_after == pytest.approx(float(dropped), rel=1e-9)
    assert torch.equal(layer.s.detach().abs().sort().values, s.abs().sort().values[7:])


@pytest.mark.parametrize("with_sketch", [False, True])
def test_growth_leaves_output_and_loss_unchanged(with_sketch):
    model, opt = trained(fused=True)
    x, y = batch(99)
    sketch = None
    if with_sketch:
        with GradientSketch(model, generator=torch.Generator().manual_seed(1)) as sketch:
            model(x, y)[1].backward()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits0, loss0 = model(x, y)
    U_old, V_old = model.a.U.detach().clone(), model.a.V.detach().clone()
    changes = apply_plan(model, opt, RankPlan(10, {"a": 20, "b": 16}), sketch)
    with torch.no_grad():
        logits1, loss1 = model(x, y)
    assert float((logits1 - logits0).norm() / logits0.norm()) <= 1e-5
    assert abs(float(loss1 - loss0)) <= 1e-5 * abs(float(loss0))
    assert [(c.old, c.new) for c in changes] == [(12, 20), (12, 16)]
    assert all(c.energy_after == pytest.approx(c.energy_before, rel=1e-12) for c in changes)
    assert torch.equal(model.a.U[:, :12].detach(), U_old) and torch.equal(model.a.V[:, :12].detach(), V_old)
    assert model.a.s[12:].abs().sum() == 0
    for layer in (model.a, model.b):
        assert float(orthonormality_error(layer.U.detach())) < 1e-5
        assert float(orthonormality_error(layer.V.detach())) < 1e-5
        assert all(p.is_contiguous() for p in (layer.U, layer.V, layer.s))


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_state_follows_the_columns(fused):
    model, opt = trained(fused)
    a_state = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in (("U", model.a.U), ("V", model.a.V), ("s", model.a.s))}
    b_state = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in (("U", model.b.U), ("V", model.b.V), ("s", model.b.s))}
    kept = model.a.s.detach().abs().argsort(descending=True, stable=True)[:6].sort().values
    params_before = [id(p) for g in opt.param_groups for p in g["params"]]
    apply_plan(model, opt, RankPlan(10, {"a": 6, "b": 18}))
    assert [id(p) for g in opt.param_groups for p in g["params"]] == params_before
    for name, p in (("U", model.a.U), ("V", model.a.V), ("s", model.a.s)):
        st = opt.state[p]
        assert torch.equal(st["step"], a_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], a_state[name][key].index_select(-1, kept))
            assert st[key].shape == p.shape and st[key].is_contiguous()
    for name, p in (("U", model.b.U), ("V", model.b.V), ("s", model.b.s)):
        st = opt.state[p]
        assert torch.equal(st["step"], b_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key][..., :12], b_state[name][key])
            assert st[key][..., 12:].abs().sum() == 0 and st[key].shape == p.shape
    # training goes on: the (fused) step accepts the resized state, and the new directions learn
    model(*batch(50))[1].backward()
    opt.step()
    retract_(model)
    assert model.b.s[12:].detach().abs().min() > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grow_values():
    s = torch.tensor([2.0, -0.5, 1.0])
    gain = torch.tensor([0.4, -0.2, 0.0])
    assert grow_values(gain, s, 0.5).tolist() == pytest.approx([-0.25, 0.125, 0.0], rel=1e-6)
    assert grow_values(gain, s, 0.0).abs().sum() == 0  # off
    assert grow_values(torch.zeros(3), s, 0.5).abs().sum() == 0  # no gradient (random directions)
    assert grow_values(gain, torch.zeros(0), 0.5).abs().sum() == 0  # no direction to scale by


def test_grown_directions_start_against_the_gradient():
    """``grow_init``: new ``s`` one step against the sketched core gradient — the loss on the sketched
    batch drops; the strongest new ``|s|`` is ``grow_init ×`` the layer's weakest old one."""
    model, opt = trained(fused=True)
    x, y = batch(99)
    with GradientSketch(model, generator=torch.Generator().manual_seed(1)) as sketch:
        model(x, y)[1].backward()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss0 = float(model(x, y)[1])
    weakest = float(model.a.s.detach().abs().min())
    changes = apply_plan(model, opt, RankPlan(10, {"a": 16}, grow_init=0.05), sketch)
    with torch.no_grad():
        loss1 = float(model(x, y)[1])
    new = model.a.s.detach()[12:]
    assert float(new.abs().max()) == pytest.approx(0.05 * weakest, rel=1e-5)
    assert loss1 < loss0
    assert changes[0].energy_after > changes[0].energy_before
    # random growth has no gradient to follow: s = 0
    apply_plan(model, opt, RankPlan(11, {"b": 14}, grow_init=0.05))
    assert model.b.s.detach()[12:].abs().sum() == 0


def test_shrink_keeps_the_planned_columns():
    model, opt = trained(fused=True)
    s = model.a.s.detach().clone()
    exp_avg = opt.state[model.a.s]["exp_avg"].clone()
    keep = [0, 3, 4, 11]  # not the largest |s|: e.g. protected columns
    apply_plan(model, opt, RankPlan(10, {"a": 4}, keep={"a": keep}))
    assert torch.equal(model.a.s.detach(), s[keep])
    assert torch.equal(opt.state[model.a.s]["exp_avg"], exp_avg[keep])
    for bad in ([0, 3, 4], [3, 0, 4, 11], [0, 3, 4, 12], [0, 0, 3, 4]):
        with pytest.raises(UserError, match="keeps columns"):
            apply_plan(model, opt, RankPlan(11, {"a": 3 if len(bad) == 4 else 2}, keep={"a": bad}))


def test_memory_follows_the_rank():
    torch.manual_seed(0)
    model = TinyLM(rank=40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(*batch(0))[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    params = [model.a.U, model.a.V, model.a.s]

    def nbytes() -> int:
        return sum(t.untyped_storage().nbytes() for p in params
                   for t in [p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]])

    before = nbytes()
    apply_plan(model, opt, RankPlan(1, {"a": 4}))
    assert nbytes() == before * 4 // 40  # the old storages are gone, not sliced views of them


def test_compute_follows_the_rank():
    torch.manual_seed(0)
    model = TinyLM(rank=32)
    x, _ = batch(0)

    def flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.a(model.emb(x))
        return counter.get_total_flops()

    full = flops()
    apply_plan(model, None, RankPlan(1, {"a": 8}))
    assert flops() * 4 == full


def test_plan_replays_exactly_and_refuses_a_mismatched_model():
    model, opt = trained(fused=True)
    twin = copy.deepcopy(model)
    plan = RankPlan(7, {"a": 8, "b": 15}, before={"a": 12, "b": 12})
    apply_plan(model, opt, plan)
    replayed = RankPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    apply_plan(twin, None, replayed)  # random growth directions are seeded by the plan's step
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(UserError, match="plan was made for rank 12"):
        apply_plan(model, opt, plan)
    with pytest.raises(UserError, match="not a spectral layer"):
        apply_plan(model, opt, RankPlan(7, {"head": 4}))
    with pytest.raises(UserError, match="planned rank"):
        apply_plan(model, opt, RankPlan(7, {"a": 49}))


def test_engine_applies_plans_between_steps():
    cfg = Config()
    cfg.train.grad_accum = 2
    torch.manual_seed(0)
    engine = TorchEngine(cfg, TinyLM())
    micro = [batch(1), batch(2)]
    engine.train_step(micro, 1.0)
    with GradientSketch(engine.model, generator=torch.Generator().manual_seed(0)) as sketch:
        engine.train_step(micro, 1.0)
    changes = engine.apply_rank_plan(RankPlan(2, {"a": 18, "b": 6}), sketch)
    assert [(c.layer, c.old, c.new) for c in changes] == [("a", 12, 18), ("b", 12, 6)]
    assert {n: s.numel() for n, s in engine.spectra().items()} == {"a": 18, "b": 6}
    losses = [engine.train_step(micro, 1.0).loss for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert float(orthonormality_error(engine.model.a.U.detach())) < 1e-5
