"""Retractor / retract_ / attach_retraction on a small model with several same-shape factors
(tests/retraction_common.py). The stacked layout is tested in test_factor_stacks.py, the amortized
schedule in test_retraction_schedule.py.

Tolerances: orthonormality after a fp32 retraction is ~1e-6 (see test_stiefel.py); 1e-5 is the
contract. Chunked vs unchunked runs execute the same LAPACK/BLAS calls on identical inputs, but a
batched GEMM may block differently from a single one, so they are compared to 1e-6 (≈ 10 ulp at O(0.1)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from retraction_common import NAMES, TOL, make_net, ortho, perturb_, run_steps, snapshot
from torch import nn

from tsvd import Retractor, SpectralLinear, attach_retraction, retract_
from tsvd.retraction import spectral_factors
from tsvd.stiefel import drift, gram, householder_qr


def test_spectral_factors_names_and_root_module():
    assert list(spectral_factors(make_net())) == NAMES
    layer = SpectralLinear(8, 4, 2)
    factors = spectral_factors(layer)
    assert list(factors) == ["U", "V"] and factors["U"] is layer.U


@pytest.mark.parametrize("method", ["cholesky", "householder"])
def test_attach_retraction_keeps_factors_orthonormal_after_every_step(method):
    model = make_net(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    retractor = attach_retraction(opt, model, method=method)
    g = torch.Generator().manual_seed(2)
    ids, target = torch.randint(0, 50, (8, 5), generator=g), torch.randint(0, 3, (8, 5), generator=g)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten()).backward()
        opt.step()
        for name, p in spectral_factors(model).items():
            assert ortho(p) <= TOL, name
            assert p.is_contiguous(), name
        # the step really moved the factors off the manifold before the hook pulled them back
        assert max(retractor.cache[n].drift for n in NAMES) > 1e-3
    assert set(retractor.cache) == set(NAMES)

    retractor.hook_handle.remove()  # detaching works: the next step leaves drift behind
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten()).backward()
    opt.step()
    assert max(ortho(p) for p in spectral_factors(model).values()) > 1e-3


@pytest.mark.parametrize("method", ["cholesky", "householder"])
def test_retract_restores_orthonormality_in_place(method):
    model = make_net(3)
    perturb_(model, 1e-2)
    before = snapshot(model)
    params = dict(spectral_factors(model))
    assert min(ortho(p) for p in before.values()) > 1e-3
    report = retract_(model, method)
    assert report.retracted and sorted(report.retracted) == sorted(NAMES)
    for name, p in spectral_factors(model).items():
        assert p is params[name]  # written in place, Parameter objects survive
        assert ortho(p) <= TOL, name
        # same column span as the perturbed input, and the sign-corrected QR's Q
        torch.testing.assert_close(p.detach(), householder_qr(before[name])[0], rtol=0, atol=TOL)


def test_lazy_tol_skips_small_drift_and_retracts_large_drift():
    model = make_net(4)
    with torch.no_grad():
        model.a.U.add_(1e-6)  # drift ~1e-5: below the tolerance
        model.b.U.mul_(1.5)  # drift 1.25·√4 = 2.5
    before = snapshot(model)
    retractor = Retractor(model, lazy_tol=1e-3)
    report = retractor(measure_error=True)
    assert torch.equal(model.a.U.detach(), before["a.U"])  # left alone, bitwise
    assert retractor.cache["a.U"].skipped and not retractor.cache["b.U"].skipped
    assert "a.U" not in report.retracted and "b.U" in report.retracted
    assert ortho(model.b.U) <= TOL
    torch.testing.assert_close(model.b.U.detach(), before["b.U"] / 1.5, rtol=0, atol=TOL)
    assert retractor.cache["b.U"].drift == pytest.approx(2.5, rel=1e-5)
    assert report.max_drift == pytest.approx(2.5, rel=1e-5)


def test_lazy_tol_skipping_everything_is_a_no_op():
    model = make_net(5)
    before = snapshot(model)
    report = Retractor(model, lazy_tol=1e-2)()
    assert report.retracted == []
    for name, p in spectral_factors(model).items():
        assert torch.equal(p.detach(), before[name])


def test_cache_records_drift_fallback_and_error():
    model = make_net(6)
    perturb_(model, 1e-3, seed=1)
    with torch.no_grad():
        model.c.V.mul_(2.0)  # Gram 4·I: drift 3·√4 = 6 > MAX_CHOLESKY_DRIFT → Householder fallback
    expected = {n: float(drift(gram(p.detach().double()))) for n, p in spectral_factors(model).items()}
    retractor = Retractor(model, method="cholesky")
    report = retractor(measure_error=True)
    assert report.fallbacks == ["c.V"]
    for name in NAMES:
        c = retractor.cache[name]
        assert c.drift == pytest.approx(expected[name], rel=1e-4)  # fp32 Gram vs fp64 reference
        assert c.householder == (name == "c.V")
        assert not c.skipped
        assert c.error is not None and c.error <= TOL
    assert report.max_drift == pytest.approx(max(expected.values()), rel=1e-4)
    assert report.seconds > 0


def test_householder_method_does_not_report_fallbacks():
    model = make_net(7)
    with torch.no_grad():
        model.c.V.mul_(2.0)
    retractor = Retractor(model, method="householder")
    report = retractor()
    assert report.fallbacks == [] and not retractor.cache["c.V"].householder
    assert ortho(model.c.V) <= TOL


@pytest.mark.parametrize("method", ["cholesky", "householder"])
def test_chunked_batches_match_unchunked(method):
    model = make_net(8)
    perturb_(model, 1e-2, seed=2)
    with torch.no_grad():
        model.b.U.mul_(3.0)  # one element of the stacked (16, 4) batch falls back, its neighbours do not
    twin = copy.deepcopy(model)
    small = Retractor(model, method=method, chunk_bytes=1)  # one factor per batch
    big = Retractor(twin, method=method)  # all same-shape factors stacked together
    assert max(len(b) for b in small._batches(small.factors())) == 1
    assert max(len(b) for b in big._batches(big.factors())) >= 4  # emb.V, a.U, b.U, c.U are (16, 4)
    r1, r2 = small(), big()
    assert sorted(r1.retracted) == sorted(r2.retracted) and r1.fallbacks == r2.fallbacks
    for (n1, p1), (n2, p2) in zip(spectral_factors(model).items(), spectral_factors(twin).items()):
        assert n1 == n2
        torch.testing.assert_close(p1.detach(), p2.detach(), rtol=0, atol=1e-6)
        assert ortho(p1) <= TOL


def test_only_restricts_the_retracted_factors():
    model = make_net(9)
    perturb_(model, 1e-2, seed=3)
    before = snapshot(model)
    report = Retractor(model)(only=["a.U", "d.V"])
    assert sorted(report.retracted) == ["a.U", "d.V"]
    for name, p in spectral_factors(model).items():
        if name in ("a.U", "d.V"):
            assert ortho(p) <= TOL
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_custom_writer_receives_every_factor():
    model = make_net(10)
    perturb_(model, 1e-2, seed=4)
    before = snapshot(model)
    params = spectral_factors(model)
    received: dict[str, torch.Tensor] = {}

    def writer(name: str, param: nn.Parameter, Q: torch.Tensor) -> None:
        assert param is params[name] and Q.shape == param.shape
        received[name] = Q.clone()

    Retractor(model)(write=writer)
    assert sorted(received) == sorted(NAMES)
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name])  # the writer, not the Retractor, owns the storage
        assert ortho(received[name]) <= TOL


def test_bad_method_is_rejected():
    with pytest.raises(ValueError, match="retraction method must be one of"):
        Retractor(make_net(), method="qr")




# ---- amortized mode: the Retractor's side (the schedule itself: test_retraction_schedule.py) -------------


def test_retract_all_makes_every_factor_exact_and_is_a_no_op_when_strict():
    model = make_net()
    retractor = Retractor(model, every=4, stack=True)
    run_steps(retractor, 6)
    stale = retractor.stale()
    assert stale and max(ortho(spectral_factors(model)[n]) for n in stale) > 1e-4
    report = retractor.retract_all(measure_error=True)
    assert sorted(report.retracted) == sorted(stale)
    assert max(ortho(p) for p in spectral_factors(model).values()) <= TOL
    assert not retractor.stale() and not retractor.retract_all().retracted

    strict = Retractor(make_net(), stack=True)
    run_steps(strict, 2)
    assert not strict.stale() and not strict.retract_all().retracted


def test_every_and_lazy_tol_are_exclusive():
    with pytest.raises(ValueError, match="lazy_tol"):
        Retractor(make_net(), every=2, lazy_tol=0.1)
