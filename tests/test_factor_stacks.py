"""tsvd.factor_stacks through ``Retractor(stack=True)``: same-shape factors stored as rows of shared stacks and
retracted by one batched Cholesky-QR per stack (model and steps: tests/retraction_common.py).

Bitwise: a matrix is computed as a stack of one on the per-factor path (tsvd.stiefel.matmul) and stacked
rows are aligned like separate tensors, so both paths run the same kernels on the same numbers; the
DeepSpeed engine (per factor) and TorchEngine (stacked) rely on it to agree bitwise on one process.
"""

from __future__ import annotations

import pytest
import torch
from retraction_common import NAMES, TOL, make_net, ortho, perturb_

from tsvd import Retractor
from tsvd.factor_stacks import STACK_ALIGN, new_stack, runs
from tsvd.retraction import spectral_factors
from tsvd.stiefel import householder_qr


def test_runs_are_the_maximal_true_stretches():
    assert runs([]) == [] and runs([False, False]) == []
    assert runs([True, True, False, True, False, False, True]) == [(0, 2), (3, 4), (6, 7)]


@pytest.mark.parametrize("shape", [(50, 4), (16, 4), (7, 3)])
def test_new_stack_rows_are_contiguous_and_aligned(shape):
    stack = new_stack(3, torch.empty(shape))
    assert stack.shape == (3, *shape)
    for row in stack.unbind(0):
        assert row.is_contiguous() and row.data_ptr() % STACK_ALIGN == 0


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
    perturb_(model, 1e-2, seed=0)
    retractor()  # lays the factors out and allocates one spare per stack shape
    # Held here, so that no buffer can be freed and its address reused: an address then names one buffer.
    buffers = [st.data for st in retractor.stacks.stacks] + list(retractor.stacks.spares.values())
    homes = {b.untyped_storage().data_ptr() for b in buffers}
    assert len(homes) == len(buffers)
    assert len({p.untyped_storage().data_ptr() for p in factors.values()}) < len(factors)  # shared stacks
    for k in range(1, 5):
        perturb_(model, 1e-2, seed=k)
        retractor()
        assert {p.untyped_storage().data_ptr() for p in factors.values()} <= homes  # rotated, never reallocated
        assert len(retractor.stacks.stacks) + len(retractor.stacks.spares) == len(buffers)
        assert max(ortho(p) for p in factors.values()) <= TOL
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
