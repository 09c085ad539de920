"""tsvd.retraction_schedule: which factors are retracted after each step with ``train.retract_every = k``
— on the schedule alone (plain tensors) and through ``Retractor.after_step`` (model and steps:
tests/retraction_common.py). ``tests/test_retract_every.py`` covers the trainer and both engines."""

from __future__ import annotations

import copy

import pytest
import torch
from retraction_common import NAMES, TOL, make_net, ortho, run_steps

from tsvd import Retractor
from tsvd.retraction import spectral_factors
from tsvd.retraction_schedule import RetractionSchedule


def test_a_factor_without_a_known_rate_is_retracted_at_once():
    """No drift rate yet (the first step), a factor never seen before: due on the next step whatever its
    phase ("early"); once measured, it waits for its phase again."""
    factors = {n: torch.zeros(8, 2) for n in ("a", "b", "c")}  # one shape: phases 0, 1, 2
    schedule = RetractionSchedule(every=3)
    assert schedule.due(factors) == (["a"], ["b", "c"])  # step 0: a's turn; b and c have no rate
    schedule.advance(factors, {"a": 0.01, "b": 0.01, "c": 0.01})
    assert schedule.rate == {"a": 0.01, "b": 0.01, "c": 0.01} and schedule.age == {"a": 0, "b": 0, "c": 0}
    assert schedule.due(factors) == (["c"], [])  # step 1: c's turn (phase 2); 0.01 · 1 ≤ 0.1 for a and b

    factors["d"] = torch.zeros(16, 2)  # a shape of its own: phase 0, not its turn at step 1
    assert schedule.due(factors) == (["c"], ["d"])


def test_a_factor_measured_at_another_shape_is_retracted_at_once():
    """A rank change gives a factor a new shape: the rate measured at the old one does not bound its
    drift, so it is due on the next step; it is then measured at its new shape."""
    factors = {"a": torch.zeros(8, 2), "b": torch.zeros(16, 2)}  # two shapes: both phase 0
    schedule = RetractionSchedule(every=3)
    assert schedule.due(factors) == (["a", "b"], [])
    schedule.advance(factors, {"a": 0.01, "b": 0.01})
    assert schedule.due(factors) == ([], [])

    factors["b"] = torch.zeros(16, 3)  # b grew from rank 2 to 3
    assert schedule.due(factors) == ([], ["b"])
    schedule.advance(factors, {"b": 0.05})
    assert schedule.shape == {"a": (8, 2), "b": (16, 3)} and schedule.rate == {"a": 0.01, "b": 0.05}
    assert schedule.due(factors) == ([], [])  # a: 0.01 · 3, b: 0.05 · 1, both ≤ 0.1


def test_state_round_trips_and_older_state_keeps_no_rate():
    factors = {n: torch.zeros(8, 2) for n in ("a", "b")}
    schedule = RetractionSchedule(every=2)
    for _ in range(3):
        scheduled, early = schedule.due(factors)
        schedule.advance(factors, {n: 0.01 for n in scheduled + early})
    restored = RetractionSchedule(every=2)
    restored.load_state_dict(copy.deepcopy(schedule.state_dict()))
    assert restored.state_dict() == schedule.state_dict() and restored.due(factors) == schedule.due(factors)

    older = {k: v for k, v in schedule.state_dict().items() if k != "shape"}  # saved before rates had shapes
    restored.load_state_dict(older)
    assert restored.step == schedule.step and restored.rate == {}
    scheduled, early = restored.due(factors)
    assert sorted(scheduled + early) == ["a", "b"]  # strict until measured


# ---- through the Retractor -------------------------------------------------------------------


@pytest.mark.parametrize("stack", [True, False])
def test_amortized_schedule_retracts_each_factor_once_per_every_steps(stack):
    """The first step retracts every factor (no drift rate is known yet: its phase-0 factors on schedule,
    the others early); from the second step on, each factor exactly once in every window of 3 steps,
    and no early retraction at this small lr."""
    retractor = Retractor(make_net(), every=3, stack=stack)
    reports = run_steps(retractor, 10)
    assert sorted(reports[0].retracted) == sorted(NAMES) and reports[0].early
    for start in range(1, 10, 3):
        window = [n for r in reports[start:start + 3] for n in r.retracted]
        assert sorted(window) == sorted(NAMES)  # each exactly once per 3 steps
    # spread: the same-shape group {a,b,c}.{U,V} (6 factors of 16×4 / 32×4) is split evenly over the phases
    per_step = [sorted(r.retracted) for r in reports[1:4]]
    assert [sum(n in ("a.U", "b.U", "c.U") for n in step) for step in per_step] == [1, 1, 1]
    assert not any(r.early for r in reports[1:])


@pytest.mark.parametrize("stack", [True, False])
def test_first_step_is_exact_and_the_drift_bound_holds_from_the_start(stack):
    """Every factor is retracted after the first step (none has a drift rate yet), so it is exact, not
    one step off the manifold while waiting up to k steps for its phase; from then on no factor's
    measured drift passes the limit by more than one step's drift."""
    model = make_net()
    retractor = Retractor(model, every=4, stack=stack)
    first = run_steps(retractor, 1, lr=4e-3)[0]  # one step: drift 0.05–0.09 per factor here
    assert sorted(first.retracted) == sorted(NAMES) and len(first.early) > len(NAMES) / 2
    assert max(ortho(p) for p in spectral_factors(model).values()) <= TOL
    for k in range(1, 12):
        report = run_steps(retractor, 1, lr=4e-3, first_seed=k)[0]
        assert report.predicted_drift <= retractor.schedule.drift_limit
        worst = max(ortho(p) for p in spectral_factors(model).values())
        assert max(worst, report.max_drift) <= retractor.schedule.drift_limit + first.max_drift


def test_amortized_drift_bound_retracts_early():
    retractor = Retractor(make_net(), every=4, drift_limit=0.05)
    reports = run_steps(retractor, 12, lr=4e-3)  # ~0.02–0.04 drift per step on these small factors
    early = [n for r in reports[1:] for n in r.early]
    assert early, "no early retraction although the predicted drift passes the limit"
    for r in reports[1:]:  # every factor has a measured rate from the first step on
        assert r.max_drift <= 0.05 + max(retractor.schedule.rate.values())  # at most one step past the limit
        assert r.predicted_drift <= 0.05
    assert all(a <= 3 for a in retractor.schedule.age.values())


@pytest.mark.parametrize("stack", [True, False])
def test_amortized_state_resumes_bitwise(stack):
    full = Retractor(make_net(), every=3, stack=stack, drift_limit=0.02)
    run_steps(full, 8, lr=3e-3)

    head = Retractor(make_net(), every=3, stack=stack, drift_limit=0.02)
    run_steps(head, 4, lr=3e-3)  # mid-cycle
    saved_params, saved_state = copy.deepcopy(head.model.state_dict()), copy.deepcopy(head.state_dict())
    tail = Retractor(make_net(seed=1), every=3, stack=stack, drift_limit=0.02)
    tail.model.load_state_dict(saved_params)
    tail.load_state_dict(saved_state)
    run_steps(tail, 4, lr=3e-3, first_seed=4)
    for name, p in spectral_factors(full.model).items():
        assert torch.equal(p, spectral_factors(tail.model)[name]), name
    assert full.state_dict() == tail.state_dict()
