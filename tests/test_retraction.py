"""Retractor / retract_ / attach_retraction on a small model with several same-shape factors.

Tolerances: orthonormality after a fp32 retraction is ~1e-6 (see test_stiefel.py); 1e-5 is the
contract. Chunked vs unchunked runs execute the same LAPACK/BLAS calls on identical inputs, but a
batched GEMM may block differently from a single one, so they are compared to 1e-6 (≈ 10 ulp at O(0.1)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tsvd import Retractor, SpectralEmbedding, SpectralLinear, attach_retraction, retract_
from tsvd.retraction import spectral_factors
from tsvd.stiefel import drift, gram, householder_qr, orthonormality_error

TOL = 1e-5


class Net(nn.Module):
    """Spectral embedding + three same-shape spectral linears (batched together) + a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = SpectralEmbedding(50, 16, 4)
        self.a = SpectralLinear(16, 32, 4)
        self.b = SpectralLinear(16, 32, 4)
        self.c = SpectralLinear(16, 32, 4)
        self.d = SpectralLinear(32, 16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.a(h) + self.b(h) * self.c(h))
        return self.head(torch.tanh(self.d(h)))


NAMES = ["emb.U", "emb.V", "a.U", "a.V", "b.U", "b.V", "c.U", "c.V", "d.U", "d.V"]


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def ortho(p: torch.Tensor) -> float:
    return float(orthonormality_error(p.detach()))


@torch.no_grad()
def perturb_(model: nn.Module, lr: float, seed: int = 0) -> None:
    """An Adam-sized step on every factor: each entry moves by ±lr."""
    g = torch.Generator().manual_seed(seed)
    for p in spectral_factors(model).values():
        p.add_(lr * torch.randn(p.shape, generator=g).sign())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in spectral_factors(model).items()}


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


# ---- stacked (batched) retraction -----------------------------------------------------------
# Bitwise: a matrix is computed as a stack of one on the per-factor path (tsvd.stiefel.matmul), so both
# paths run the same kernels on the same numbers; the DeepSpeed engine (per factor) and TorchEngine
# (stacked) rely on it to agree bitwise on one process.


@pytest.mark.parametrize("lr", [1e-3, 8e-2])  # one Cholesky pass; large: CholeskyQR2 / Householder for some
def test_stacked_retraction_equals_per_factor(lr):
    a, b = make_net(), make_net()
    perturb_(a, lr)
    perturb_(b, lr)
    ra, rb = Retractor(a, stack=True), Retractor(b)
    rep_a, rep_b = ra(measure_error=True), rb(measure_error=True)
    assert sorted(rep_a.retracted) == sorted(rep_b.retracted) == sorted(NAMES)
    assert sorted(rep_a.fallbacks) == sorted(rep_b.fallbacks)
    fa, fb = spectral_factors(a), spectral_factors(b)
    for name in NAMES:
        assert torch.equal(fa[name], fb[name]), name
        assert ra.cache[name].drift == rb.cache[name].drift
        assert ra.cache[name].error <= TOL


def test_stacked_retraction_reuses_its_stacks_and_restacks_moved_factors():
    model = make_net()
    retractor = Retractor(model, stack=True, stack_bytes=2 * 16 * 4 * 4)  # two 16×4 factors per stack
    factors = spectral_factors(model)
    storages = set()
    for k in range(5):
        perturb_(model, 1e-2, seed=k)
        retractor()
        current = {p.untyped_storage().data_ptr() for p in factors.values()}
        assert len(current) < len(factors)  # shared stacks
        storages |= current
        assert max(ortho(p) for p in factors.values()) <= TOL
    assert len(storages) <= len(retractor._stacks) + len(retractor._spares)  # rotated, never reallocated
    with torch.no_grad():
        model.a.U.data = model.a.U.data.clone() + 0.05  # new storage, off the manifold (as after a resize)
    retractor()
    assert ortho(model.a.U) <= TOL
    assert model.a.U.untyped_storage().nbytes() > model.a.U.numel() * 4  # back in a stack


def test_stacked_retraction_falls_back_to_householder():
    model = make_net()
    with torch.no_grad():
        model.b.U[:, 1] = model.b.U[:, 0]  # rank-deficient: Cholesky fails
        model.c.V.mul_(1.6)  # drift ≈ 1.56·√4 > MAX_CHOLESKY_DRIFT
    retractor = Retractor(model, stack=True)
    report = retractor()
    assert set(report.fallbacks) == {"b.U", "c.V"}
    assert retractor.cache["c.V"].householder and not retractor.cache["a.U"].householder
    assert ortho(model.c.V) <= TOL and ortho(model.a.U) <= TOL
    Q = householder_qr(make_net().c.V.detach() * 1.6)[0]
    assert torch.equal(model.c.V.detach(), Q)


# ---- amortized schedule ----------------------------------------------------------------------


def run_steps(retractor: Retractor, steps: int, lr: float = 1e-3, first_seed: int = 0) -> list:
    reports = []
    for k in range(steps):
        perturb_(retractor.model, lr, seed=first_seed + k)
        reports.append(retractor.after_step())
    return reports


@pytest.mark.parametrize("stack", [True, False])
def test_amortized_schedule_retracts_each_factor_once_per_every_steps(stack):
    retractor = Retractor(make_net(), every=3, stack=stack)
    reports = run_steps(retractor, 9)
    for start in range(0, 9, 3):
        window = [n for r in reports[start:start + 3] for n in r.retracted]
        assert sorted(window) == sorted(NAMES)  # each exactly once per 3 steps
    # spread: the same-shape group {a,b,c}.{U,V} (6 factors of 16×4 / 32×4) is split evenly over the phases
    per_step = [sorted(r.retracted) for r in reports[:3]]
    assert [sum(n in ("a.U", "b.U", "c.U") for n in step) for step in per_step] == [1, 1, 1]
    assert not any(r.early for r in reports)


def test_amortized_drift_bound_retracts_early():
    retractor = Retractor(make_net(), every=4, drift_limit=0.05)
    reports = run_steps(retractor, 12, lr=4e-3)  # ~0.02–0.04 drift per step on these small factors
    early = [n for r in reports for n in r.early]
    assert early, "no early retraction although the predicted drift passes the limit"
    for r in reports[4:]:  # once every factor has a measured rate
        assert r.max_drift <= 0.05 + max(retractor.schedule.rate.values())  # at most one step past the limit
        assert r.predicted_drift <= 0.05
    assert all(a <= 3 for a in retractor.schedule.age.values())


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


def test_every_and_lazy_tol_are_exclusive():
    with pytest.raises(ValueError, match="lazy_tol"):
        Retractor(make_net(), every=2, lazy_tol=0.1)
