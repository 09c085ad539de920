"""RankController policies (energy, budget), guardrails, plan serialization, exact resume; and the
spectrum helpers they use. Spectra are hand-made so every expected rank is computed by hand below;
shares are float64 (compared to 1e-12)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tsvd.config import RankConfig
from tsvd.controller import (RankChange, RankController, RankPlan, allocate_budget, energy_target, fisher_scores,
                             kept_columns, ramp)
from tsvd.errors import UserError
from tsvd.spectrum import energy_shares, kept_tail_shares, tail_count, tail_share

GEOM = torch.tensor([0.5 ** (i / 2) for i in range(20)])  # sᵢ² = 0.5ⁱ: each direction half the previous
FLAT = torch.ones(20)


def energy_cfg(**kw) -> RankConfig:
    base = dict(policy="energy", warmup_steps=100, interval=100, energy=0.9, grow_tail=0.05, tail_fraction=0.1,
                growth_factor=1.5, min_rank=2, max_rank=64, max_shrink=0.5, hysteresis=0.05)
    return RankConfig(**(base | kw))


# ---------------------------------------------------------------- spectrum helpers


def test_tail_count_and_energy_shares():
    assert [tail_count(r, 0.1) for r in (1, 4, 5, 15, 20, 32)] == [1, 1, 1, 2, 2, 3]
    sh = energy_shares(torch.tensor([1.0, -3.0, 0.0]))
    assert sh.tolist() == pytest.approx([0.9, 0.1, 0.0], rel=1e-12)
    assert torch.allclose(energy_shares(8.0 * GEOM), energy_shares(GEOM), rtol=1e-12, atol=0)
    assert energy_shares(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_kept_tail_shares_match_brute_force():
    s = torch.randn(17, generator=torch.Generator().manual_seed(0))
    sorted_s = s.abs().sort(descending=True).values
    got = kept_tail_shares(s, 0.2)
    for k in range(1, 18):
        assert float(got[k - 1]) == pytest.approx(tail_share(sorted_s[:k], tail_count(k, 0.2)), rel=1e-12)


# ---------------------------------------------------------------- schedule


def test_due_schedule():
    c = RankController(energy_cfg(warmup_steps=100, interval=50), {"a": (64, 64)})
    assert [s for s in range(0, 260) if c.due(s)] == [100, 150, 200, 250]
    c0 = RankController(energy_cfg(warmup_steps=0, interval=50), {"a": (64, 64)})
    assert not c0.due(0) and c0.due(50)
    static = RankController(RankConfig(policy="static", warmup_steps=0, interval=1), {"a": (64, 64)})
    assert not any(static.due(s) for s in range(10))


# ---------------------------------------------------------------- energy policy


def test_energy_shrink_bounded_by_max_shrink_and_min_rank():
    rows = (128, 96)
    # ρ(3) = 0.875 < 0.9 ≤ ρ(4) = 0.9375; but at k=4 the kept tail (1 direction) holds
    # 0.125/1.875 = 6.7% > grow_tail, at k=5 it holds 0.0625/1.9375 = 3.2%: the target is 5.
    assert energy_target(GEOM, energy_cfg(max_shrink=0.9), rows) == 5
    assert energy_target(GEOM, energy_cfg(max_shrink=0.5), rows) == 10  # at most ⌊0.5·20⌋ dropped
    assert energy_target(GEOM, energy_cfg(max_shrink=0.9, min_rank=8), rows) == 8
    assert energy_target(GEOM, energy_cfg(max_shrink=0.0), rows) == 20


def test_energy_grow_capped():
    # tail = 2 of 20 equal directions = 10% > 5%: grow by 1.5×, capped by max_rank and min(rows)
    assert energy_target(FLAT, energy_cfg(), (128, 96)) == 30
    assert energy_target(FLAT, energy_cfg(max_rank=24), (128, 96)) == 24
    assert energy_target(FLAT, energy_cfg(), (128, 22)) == 22
    assert energy_target(FLAT, energy_cfg(), (128, 20)) == 20  # already full rank
    assert energy_target(torch.zeros(20), energy_cfg(), (128, 96)) == 20  # nothing to judge


def test_no_shrink_into_the_growth_region():
    # 10 equal strong directions + 10 weak ones: ρ(10) ≥ 0.9, but a flat rank-10 layer would look
    # saturated (tail 1/10 > grow_tail) and regrow at once; the policy stops where the kept tail is calm.
    s = torch.cat([torch.ones(10), torch.full((10,), 0.05)])
    k = energy_target(s, energy_cfg(max_shrink=0.9), (128, 96))
    assert k > 10 and float(kept_tail_shares(s, 0.1)[k - 1]) <= 0.05
    assert float(kept_tail_shares(s, 0.1)[k - 2]) > 0.05  # and it is the smallest such rank


def test_hysteresis_ignores_small_changes():
    s = torch.cat([torch.ones(19) * 10, torch.tensor([0.01])])  # energy target 19 (Δ = 1 of 20)
    cfg = energy_cfg(energy=0.99, hysteresis=0.1, grow_tail=0.2)
    c = RankController(cfg, {"a": (128, 96)})
    assert energy_target(s, cfg, (128, 96)) == 19
    assert c.plan(100, {"a": s}).ranks == {}
    c = RankController(energy_cfg(energy=0.99, hysteresis=0.0, grow_tail=0.2), {"a": (128, 96)})
    assert c.plan(100, {"a": s}).ranks == {"a": 19}


def test_no_shrink_right_after_growth_and_exact_resume():
    cfg = energy_cfg(max_shrink=0.9)
    layers = {"a": (128, 96), "b": (128, 96)}
    seq = [{"a": FLAT, "b": GEOM},  # a grows 20→30, b shrinks 20→5
           {"a": torch.cat([FLAT, torch.zeros(10)]), "b": GEOM[:5]},  # a's new directions still at 0
           {"a": torch.cat([FLAT, torch.zeros(10)]), "b": GEOM[:5]}]
    c = RankController(cfg, layers)
    plans = [c.plan(100 * (i + 1), spectra) for i, spectra in enumerate(seq)]
    assert plans[0].ranks == {"a": 30, "b": 5} and plans[0].before == {"a": 20, "b": 20}
    assert plans[1].ranks == {}  # a may not shrink one interval after growing
    # the new directions earned nothing: dropped, but one — at rank 20 the flat layer's tail (2/20 > 5%)
    # would trigger growth again; at 21 the kept tail is (1 + 0)/20 = 5%
    assert plans[2].ranks == {"a": 21}
    # resume after the first decision from a JSON round trip of the state: identical decisions
    c1 = RankController(cfg, layers)
    c1.plan(100, seq[0])
    c2 = RankController(cfg, layers)
    c2.load_state_dict(json.loads(json.dumps(c1.state_dict())))
    assert [c2.plan(200, seq[1]).ranks, c2.plan(300, seq[2]).ranks] == [plans[1].ranks, plans[2].ranks]


def test_protected_directions_are_kept_and_judged_later():
    """protect=1: directions added at a decision cannot be dropped at the next one (the policy judges the
    other columns, and the layer may not grow meanwhile); one interval later they are judged like the rest."""
    cfg = energy_cfg(max_shrink=0.9, protect=1)
    c = RankController(cfg, {"a": (128, 96)})
    assert c.plan(100, {"a": FLAT}).ranks == {"a": 30}
    assert c.born["a"] == [0] * 20 + [100] * 10
    # next decision: the 20 old directions now decay (GEOM), the 10 new ones are still small: the old
    # ones shrink by the energy rule (to 5, as test_energy_shrink_bounded_by_max_shrink_and_min_rank),
    # every new one is kept although it is weaker than all of them, and there is no further growth
    s = torch.cat([GEOM, torch.full((10,), 1e-3)])
    plan = c.plan(200, {"a": s})
    assert plan.ranks == {"a": 15} and plan.keep == {"a": list(range(5)) + list(range(20, 30))}
    assert c.born["a"] == [0] * 5 + [100] * 10
    # a decision later (no longer protected) the idle new directions are dropped like any weak direction
    plan = c.plan(300, {"a": torch.cat([GEOM[:5], torch.full((10,), 1e-3)])})
    assert plan.ranks["a"] < 15 and plan.keep["a"] == list(range(plan.ranks["a"]))
    # state (with the columns' birth steps) survives a JSON round trip: identical decisions after resume
    c1 = RankController(cfg, {"a": (128, 96)})
    c1.plan(100, {"a": FLAT})
    c2 = RankController(cfg, {"a": (128, 96)})
    c2.load_state_dict(json.loads(json.dumps(c1.state_dict())))
    assert c2.plan(200, {"a": s}).to_dict() == RankController.plan(c1, 200, {"a": s}).to_dict()


def test_kept_columns_match_truncation_without_protection():
    s = torch.tensor([0.3, -2.0, 0.3, 1.0, 0.0, -0.3])
    none = torch.zeros(6, dtype=torch.bool)
    assert kept_columns(s, none, 3) == [0, 1, 3]  # ties (|0.3| ×3) broken by position, as truncate_
    assert kept_columns(s, torch.tensor([False, False, False, False, True, False]), 3) == [1, 3, 4]


def test_stop_step_and_budget_ramp():
    cfg = budget_cfg(warmup_steps=100, interval=100, stop_step=1000, budget_growth=2.0)
    c = RankController(cfg, {"a": (64, 64)})
    assert [s for s in range(0, 1600) if c.due(s)] == list(range(100, 1000, 100))
    # ×1 at the first decision, ×2 at the last one (900), linear in between
    assert [ramp(s, cfg) for s in (100, 500, 900, 1000)] == [1.0, 1.5, 2.0, 2.0]
    assert ramp(500, budget_cfg()) == 1.0
    # the allocation follows the ramp: a flat layer of rank 8 may grow by 1.5× per decision
    layers = {"a": (64, 64), "b": (64, 64)}
    c = RankController(cfg, layers)
    def total(plan, spectra):
        return sum(plan.ranks.get(n, s.numel()) for n, s in spectra.items())

    first = {"a": torch.ones(8), "b": torch.ones(8)}
    assert total(c.plan(100, first), first) == 16  # budget = the initial count
    later = {"a": torch.ones(10), "b": torch.ones(10)}  # (no columns protected: protect = 0)
    assert total(c.plan(500, later), later) == 24  # 1.5 × 16 directions


def test_unknown_layer_in_spectra():
    with pytest.raises(ValueError, match="does not know"):
        RankController(energy_cfg(), {"a": (8, 8)}).plan(100, {"b": torch.ones(4)})


# ---------------------------------------------------------------- budget policy


def budget_cfg(**kw) -> RankConfig:
    return energy_cfg(**(dict(policy="budget", warmup_steps=0, interval=10, hysteresis=0.0) | kw))


def test_budget_moves_rank_from_decaying_to_flat_layer():
    layers = {"flat": (64, 64), "decay": (64, 64)}  # one direction costs 129 parameters in each
    spectra = {"flat": torch.ones(8), "decay": GEOM[:8]}
    c = RankController(budget_cfg(), layers)
    plan = c.plan(10, spectra)
    # budget = initial 16 directions; both floors are 4 (max_shrink 0.5); the 8 left go to "flat"
    # (its real and virtual directions are worth 1/8 each, "decay"'s 5th only ~3%), capped at 1.5·8.
    assert plan.ranks == {"flat": 12, "decay": 4}
    assert c.budget == 16 * 129
    # scale-free: multiplying a layer's s by 1000 changes nothing
    scaled = RankController(budget_cfg(), layers).plan(10, {"flat": torch.ones(8), "decay": 1000 * GEOM[:8]})
    assert scaled.ranks == plan.ranks
    # explicit budget: 10 directions → floors (8) + 2 for "flat"
    small = RankController(budget_cfg(budget_params=10 * 129), layers).plan(10, spectra)
    assert small.ranks == {"flat": 6, "decay": 4}


def test_budget_holds_when_a_layer_just_grew():
    layers = {"flat": (64, 64), "decay": (64, 64)}
    c = RankController(budget_cfg(), layers)
    assert c.plan(10, {"flat": torch.ones(8), "decay": GEOM[:8]}).ranks == {"flat": 12, "decay": 4}
    # "decay" now looks saturated and bids high, but "flat" may not give back its new directions yet:
    # the budget (16 directions) leaves "decay" nothing to grow with
    plan = c.plan(20, {"flat": torch.cat([torch.ones(8), torch.full((4,), 1e-3)]), "decay": torch.ones(4)})
    assert plan.ranks == {}
    # one interval later "flat" may shrink: its 4 idle directions go to "decay" (capped at 1.5·4 = 6)
    plan = c.plan(30, {"flat": torch.cat([torch.ones(8), torch.full((4,), 1e-3)]), "decay": torch.ones(4)})
    assert plan.ranks == {"flat": 10, "decay": 6}


def test_budget_respects_bounds_and_total():
    gen = torch.Generator().manual_seed(0)
    layers = {f"l{i}": shape for i, shape in enumerate([(64, 32), (128, 48), (96, 96), (200, 40), (48, 48)])}
    cfg = budget_cfg(budget_params=30_000, min_rank=3, max_rank=40)
    c = RankController(cfg, layers)
    spectra = {n: torch.randn(int(torch.randint(4, 30, (1,), generator=gen)), generator=gen) ** 3 for n in layers}
    plan = c.plan(10, spectra)
    new = {n: plan.ranks.get(n, s.numel()) for n, s in spectra.items()}
    assert sum(new[n] * c.cost(n) for n in layers) <= 30_000
    for n, s in spectra.items():
        r = s.numel()
        assert max(3, r - math.floor(0.5 * r)) <= new[n] <= min(40, min(layers[n]), math.ceil(1.5 * r))


def test_budget_hysteresis_keeps_small_changes_and_the_budget():
    """A layer whose allocated change is below ``hysteresis · r`` keeps its rank *inside* the allocation:
    the others share what is left, so the budget is never overspent (applied after the allocation, a
    kept small shrink would pay for another layer's growth twice)."""
    layers = {"flat": (64, 64), "decay": (64, 64), "mid": (64, 64)}
    spectra = {"flat": torch.ones(8), "decay": GEOM[:8], "mid": torch.cat([torch.ones(7), torch.full((1,), 1e-3)])}
    free = RankController(budget_cfg(), layers).plan(10, spectra).ranks
    assert free["mid"] == 7  # without hysteresis "mid" gives up one direction (1 < 0.25 · 8)
    c = RankController(budget_cfg(hysteresis=0.25), layers)
    new = {n: c.plan(10, spectra).ranks.get(n, s.numel()) for n, s in spectra.items()}
    assert new["mid"] == 8 and new["flat"] > 8  # "mid" held; "flat" still grows
    assert sum(new[n] * c.cost(n) for n in layers) <= c.budget == 24 * 129
    assert all(new[n] == s.numel() or abs(new[n] - s.numel()) >= 0.25 * s.numel() for n, s in spectra.items())


def test_fisher_scores_are_s_squared_times_the_mean_squared_gradient():
    s, g = torch.tensor([2.0, -1.0, 0.0, 0.5]), torch.tensor([0.25, 4.0, 9.0, -1e-9])
    assert fisher_scores(s, g).tolist() == [1.0, 4.0, 0.0, 0.0]  # a new direction (s = 0) is worth nothing yet
    assert fisher_scores(s, g).dtype == torch.float64


def test_fisher_budget_follows_the_loss_where_energy_follows_the_spectrum():
    """Two layers of equal cost: "flat" has a flat spectrum the loss barely depends on (tiny mean squared
    gradient), "decay" a decaying one the loss depends on strongly. The energy score moves rank to the
    flat layer (test above); the Fisher score moves it to the layer the loss needs, in loss units —
    scaling a layer's s by 1000 now matters, as it changes what removing a direction costs."""
    layers = {"flat": (64, 64), "decay": (64, 64)}
    spectra = {"flat": torch.ones(8), "decay": GEOM[:8]}
    grad_sq = {"flat": torch.full((8,), 1e-6), "decay": torch.ones(8)}
    cfg = budget_cfg(score="fisher")
    plan = RankController(cfg, layers).plan(10, spectra, grad_sq)
    # floors 4 + 4; 8 directions left. Worth per direction: "flat" 1e-6, "decay" 0.5ⁱ (≥ 0.0078 for
    # i < 8, and its virtual directions beyond 8 are valued like its weakest, 0.5⁷): "decay" takes
    # them up to its cap 1.5·8 = 12, "flat" keeps its floor
    assert plan.ranks == {"flat": 4, "decay": 12}
    with pytest.raises(ValueError, match="needs grad_sq"):
        RankController(cfg, layers).plan(10, spectra)


def test_fisher_shrink_keeps_the_directions_the_loss_needs():
    """A shrink under the Fisher score keeps the largest ``s²·g``, not the largest ``|s|``."""
    layers = {"a": (64, 64), "b": (64, 64)}
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    g = torch.tensor([1e-8, 1e-8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # the two largest |s| barely matter
    c = RankController(budget_cfg(score="fisher", budget_params=12 * 129), layers)
    plan = c.plan(10, {"a": s, "b": torch.ones(8)}, {"a": g, "b": torch.full((8,), 0.5)})
    # budget 12 directions, floors 4 + 4; the 4 left: "a"'s saliencies 4, 1, 1, 1 | 1, 1 | 1.6e-7, 9e-8
    # against "b"'s 0.5 each — "a" takes two (rank 6), "b" two; "a" drops its two largest |s|
    assert plan.ranks == {"a": 6, "b": 6} and plan.keep["a"] == [2, 3, 4, 5, 6, 7]


def test_fisher_score_only_with_the_budget_policy():
    from tsvd.config import Config, validate

    cfg = Config()
    cfg.model.spectral.targets = ["q"]
    cfg.rank.policy, cfg.rank.score = "energy", "fisher"
    with pytest.raises(UserError, match="rank.score: 'fisher' ranks directions for the budget policy"):
        validate(cfg)
    cfg.rank.policy = "budget"
    validate(cfg)


def test_allocate_budget_prefers_cheap_parameters():
    # equal shares, but "cheap" directions cost half as much: the greedy spends on them first
    shares = {"cheap": torch.full((4,), 0.25, dtype=torch.float64), "dear": torch.full((4,), 0.25, dtype=torch.float64)}
    out = allocate_budget(shares, {"cheap": 10, "dear": 20}, {"cheap": 1, "dear": 1}, {"cheap": 6, "dear": 6}, 100)
    assert out == {"cheap": 6, "dear": 2}  # 10+20 floors, 5 more cheap (50), then one dear (20)


# ---------------------------------------------------------------- serialization


def test_plan_and_change_round_trip_json():
    plan = RankPlan(step=300, ranks={"layers.0.mlp.up": 48}, before={"layers.0.mlp.up": 32})
    assert RankPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    plan = RankPlan(step=300, ranks={"a": 4}, before={"a": 8}, keep={"a": [0, 2, 5, 7]}, grow_init=0.5)
    assert RankPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert RankPlan.from_dict({"step": 1, "ranks": {}}) == RankPlan(1, {})  # plans written before keep/grow_init
    change = RankChange("layers.0.mlp.up", 32, 48, 1.5, 1.5)
    assert json.loads(json.dumps(change.to_dict())) == {"layer": "layers.0.mlp.up", "old": 32, "new": 48,
                                                         "energy_before": 1.5, "energy_after": 1.5}
    for bad in ({"ranks": {}}, {"step": 1, "ranks": {"a": "32"}}, {"step": True, "ranks": {}}, [1],
                {"step": 1, "ranks": {}, "keep": {"a": [0.5]}}, {"step": 1, "ranks": {}, "grow_init": "x"}):
        with pytest.raises(UserError):
            RankPlan.from_dict(bad)


def test_sketch_width_is_a_dry_run_of_the_next_decision():
    layers = {"a": (128, 96), "b": (128, 96), "c": (16, 16)}
    c = RankController(energy_cfg(max_rank=40, max_shrink=0.9), layers)
    spectra = {"a": FLAT, "b": GEOM, "c": torch.ones(12)}  # a grows 20→30, b shrinks, c is capped at 16
    assert c.sketch_width(100, spectra) == {"a": 10, "c": 4}
    assert c.state_dict() == RankController(energy_cfg(), layers).state_dict()  # nothing recorded
    assert c.plan(100, spectra).ranks == {"a": 30, "b": 5, "c": 16}
