"""SpectralLinear / SpectralEmbedding: forward, conversion, init statistics, resizing, and the
"never materialize W" requirement.

Tolerances: fp32 has eps ≈ 1.2e-7. Outputs here are sums of ≤ a few hundred O(1) products, whose
rounding error is ~ √n·eps·|terms| ≲ 1e-6; factors from a fp32 QR are orthonormal to ~1e-7·√r. So
fp32 comparisons use 1e-5 (an order of magnitude of headroom, still far below any real bug, which
shows up at O(1e-2) or more).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tsvd import Retractor, SpectralEmbedding, SpectralLinear, UserError
from tsvd.stiefel import orthonormality_error

FP32_TOL = 1e-5


class TensorTracer(TorchDispatchMode):
    """Records the device and shape of every tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.device.type, tuple(t.shape)))
        return out

    def shapes(self) -> set[tuple[int, ...]]:
        return {shape for _, _, shape in self.seen}

    def max_numel(self) -> int:
        return max(math.prod(shape) for _, _, shape in self.seen)


def ortho_err(A: torch.Tensor) -> float:
    return float(orthonormality_error(A.detach()))


def dense_weight(layer: SpectralLinear) -> torch.Tensor:
    """``W = V diag(s) Uᵀ`` in float64 (test oracle only)."""
    return (layer.V.detach().double() * layer.s.detach().double()) @ layer.U.detach().double().T


def make_linear(out_f: int, in_f: int, singular_values: list[float], seed: int = 0) -> nn.Linear:
    """An ``nn.Linear`` whose weight has exactly the given singular values (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    P = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))[0]
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_((P * torch.tensor(singular_values, dtype=torch.float64)) @ Q.T)
    return lin


# ---------------------------------------------------------------------------------------------
# forward and conversion


def test_forward_equals_dense_for_3d_input():
    torch.manual_seed(0)
    layer = SpectralLinear(24, 40, 6)
    with torch.no_grad():
        layer.s.copy_(torch.randn(6))  # a non-flat spectrum with mixed signs
        layer.bias.copy_(torch.randn(40))
    x = torch.randn(2, 5, 24)
    lin = layer.to_linear()
    expected = x @ lin.weight.T + lin.bias
    y = layer(x)
    assert y.shape == (2, 5, 40)
    torch.testing.assert_close(y, expected, rtol=FP32_TOL, atol=FP32_TOL)


def test_forward_without_bias():
    torch.manual_seed(1)
    layer = SpectralLinear(12, 7, 3, bias=False)
    assert layer.bias is None
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), x @ layer.to_linear().weight.T, rtol=FP32_TOL, atol=FP32_TOL)


def test_from_linear_full_energy_reproduces_layer():
    torch.manual_seed(2)
    lin = nn.Linear(32, 48)
    layer = SpectralLinear.from_linear(lin, energy=1.0)
    assert layer.rank == 32  # a random dense matrix has full rank
    torch.testing.assert_close(layer.to_linear().weight, lin.weight, rtol=0, atol=FP32_TOL)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), lin(x), rtol=FP32_TOL, atol=FP32_TOL)
    # U, V come out orthonormal (fp32 cast of a float64 SVD) and s are the singular values
    assert ortho_err(layer.U) < FP32_TOL
    assert ortho_err(layer.V) < FP32_TOL
    torch.testing.assert_close(layer.s.detach(), torch.linalg.svdvals(lin.weight.detach()), rtol=FP32_TOL, atol=FP32_TOL)


def test_from_linear_rank_is_best_rank_k_approximation():
    torch.manual_seed(3)
    lin = nn.Linear(30, 20)
    W = lin.weight.detach().double()
    P, S, Qh = torch.linalg.svd(W, full_matrices=False)
    for k in (1, 4, 19):
        layer = SpectralLinear.from_linear(lin, rank=k)
        assert layer.rank == k
        best = (P[:, :k] * S[:k]) @ Qh[:k]
        Wk = dense_weight(layer)
        assert float((Wk - best).norm() / best.norm()) < FP32_TOL
        # Eckart–Young: the error is exactly the dropped energy
        err2 = float((W - Wk).square().sum())
        assert err2 == pytest.approx(float(S[k:].square().sum()), rel=1e-4)


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_from_linear_energy_picks_smallest_sufficient_rank(tau):
    sv = [8.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    lin = make_linear(16, 12, sv)
    energy = torch.tensor(sv, dtype=torch.float64).square()
    cum = (energy.cumsum(0) / energy.sum()).tolist()
    expected = next(i + 1 for i, c in enumerate(cum) if c >= tau)
    layer = SpectralLinear.from_linear(lin, energy=tau)
    assert layer.rank == expected
    assert cum[layer.rank - 1] >= tau
    assert layer.rank == 1 or cum[layer.rank - 2] < tau


def test_parameters_are_contiguous():
    torch.manual_seed(4)
    layers = [
        SpectralLinear(20, 10, 4, init="scaled"),
        SpectralLinear(20, 10, 4, init="sct"),
        SpectralLinear.from_linear(nn.Linear(20, 10), rank=4),
        SpectralLinear.from_linear(nn.Linear(10, 20), energy=0.9),
        SpectralEmbedding(30, 8, 4),
        SpectralEmbedding.from_embedding(nn.Embedding(30, 8), rank=3),
    ]
    for layer in layers:
        for name, p in layer.named_parameters():
            assert p.is_contiguous(), f"{type(layer).__name__}.{name} stride {p.stride()}"
    layer = layers[0]
    layer.truncate_(2)
    assert all(p.is_contiguous() for p in layer.parameters())


def test_extra_repr_shows_rank_and_compression():
    layer = SpectralLinear(64, 128, 8, bias=False, device="meta")
    text = repr(layer)
    assert "rank=8" in text
    # 64·128 / (8·(64 + 128 + 1)) = 5.31
    assert "compression=5.3x" in text
    emb = SpectralEmbedding(1000, 64, 16, device="meta")
    assert "rank=16" in repr(emb) and f"compression={1000 * 64 / (16 * 1065):.1f}x" in repr(emb)


# ---------------------------------------------------------------------------------------------
# init


def output_variance(layer: nn.Module, in_features: int, n: int, seed: int) -> float:
    x = torch.randn(n, in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float(layer(x).double().square().mean())


@pytest.mark.parametrize("std", [None, 0.02])
def test_scaled_init_matches_dense_output_variance(std):
    """For unit-variance inputs, E[y²] = ‖W‖_F² / out. Dense default init has weight variance
    1/(3·in) (uniform ±1/√in), so E[y²] = 1/3; with std=0.02 it is 0.02²·in.

    Spectral: ‖Wx‖² = s²·‖Uᵀx‖² ~ s²·χ²_r, so the estimate's relative std over n samples and out
    outputs is √(2/(r·n)) ≈ 0.4% (r=32, n=4096). Dense: ‖W‖_F² itself fluctuates by ≈ √(0.8/(in·out))
    ≈ 0.25% (uniform) and the input sampling adds ≈ √(2/n)·... < 1%. A 5% tolerance is > 5σ for both,
    while a wrong scale (e.g. forgetting √(in·out/r)) is off by orders of magnitude.
    """
    torch.manual_seed(5)
    in_f, out_f, r, n = 256, 512, 32, 4096
    layer = SpectralLinear(in_f, out_f, r, bias=False, init="scaled", std=std)
    dense = nn.Linear(in_f, out_f, bias=False)
    if std is not None:
        nn.init.normal_(dense.weight, 0.0, std)
    expected = 1 / 3 if std is None else std**2 * in_f
    v_spec = output_variance(layer, in_f, n, seed=6)
    v_dense = output_variance(dense, in_f, n, seed=6)
    assert v_spec == pytest.approx(expected, rel=0.05)
    assert v_dense == pytest.approx(expected, rel=0.05)
    assert v_spec == pytest.approx(v_dense, rel=0.05)


def test_sct_init_is_orthonormal_with_unit_spectrum():
    torch.manual_seed(7)
    layer = SpectralLinear(96, 40, 12, init="sct")
    assert ortho_err(layer.U) < FP32_TOL
    assert ortho_err(layer.V) < FP32_TOL
    assert torch.equal(layer.s.detach(), torch.ones(12))
    assert layer.U.shape == (96, 12) and layer.V.shape == (40, 12)


def test_meta_construction_allocates_nothing():
    with TensorTracer() as tracer:
        layer = SpectralLinear(8192, 28672, 32, device="meta")
        emb = SpectralEmbedding(128256, 8192, 32, device="meta")
    assert len(tracer.seen) >= 7  # the tracer does see the (meta) factor allocations
    real = [entry for entry in tracer.seen if entry[1] != "meta"]
    assert real == []
    for p in [*layer.parameters(), *emb.parameters()]:
        assert p.device.type == "meta"
    assert layer.U.shape == (8192, 32) and layer.V.shape == (28672, 32) and layer.bias.shape == (28672,)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SpectralLinear(10, 6, 7), "rank=7 is impossible"),
        (lambda: SpectralLinear(10, 6, 0), "rank=0 is impossible"),
        (lambda: SpectralLinear(10, 6, 2.0), "must be an integer"),
        (lambda: SpectralLinear(10, 6, 2, init="xavier"), "init must be one of"),
        (lambda: SpectralEmbedding(10, 6, 8), "rank=8 is impossible"),
        (lambda: SpectralLinear.from_linear(nn.Linear(10, 6), rank=7), "rank=7 is impossible"),
        (lambda: SpectralLinear.from_linear(nn.Linear(10, 6), rank=2, energy=0.9), "exactly one of rank= or energy="),
        (lambda: SpectralLinear.from_linear(nn.Linear(10, 6), energy=1.5), r"energy must be a number in \(0, 1\]"),
    ],
)
def test_bad_input_raises_user_error(build, message):
    with pytest.raises(UserError, match=message):
        build()


def test_from_linear_rejects_non_2d_weight():
    lin = nn.Linear(4, 3)
    lin.weight = nn.Parameter(torch.randn(2, 3, 4))
    with pytest.raises(UserError, match="needs a 2-D weight"):
        SpectralLinear.from_linear(lin, rank=2)


# ---------------------------------------------------------------------------------------------
# embedding


def test_embedding_forward_and_project_match_dense_table():
    torch.manual_seed(8)
    emb = SpectralEmbedding(50, 16, 6)
    with torch.no_grad():
        emb.s.copy_(torch.randn(6))
    E = emb.to_embedding().weight
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(emb(ids), E[ids], rtol=FP32_TOL, atol=FP32_TOL)
    h = torch.randn(3, 7, 16)
    torch.testing.assert_close(emb.project(h), h @ E.T, rtol=FP32_TOL, atol=FP32_TOL)


def test_embedding_from_embedding_full_energy_reproduces_table():
    torch.manual_seed(9)
    dense = nn.Embedding(40, 12)
    emb = SpectralEmbedding.from_embedding(dense, energy=1.0)
    assert emb.rank == 12
    ids = torch.arange(40)
    torch.testing.assert_close(emb(ids), dense(ids), rtol=FP32_TOL, atol=FP32_TOL)


# ---------------------------------------------------------------------------------------------
# resizing


def test_truncate_drops_exactly_the_dropped_energy_and_keeps_parameters():
    torch.manual_seed(10)
    layer = SpectralLinear(40, 30, 10)
    s0 = torch.tensor([3.0, -0.5, 2.0, 0.1, -4.0, 1.0, 0.2, -0.05, 1.5, 0.7])
    with torch.no_grad():
        layer.s.copy_(s0)
    params_before = [layer.U, layer.s, layer.V]
    opt = torch.optim.AdamW(layer.parameters())
    W = dense_weight(layer)
    idx = layer.truncate_(4)
    # the four largest |s|, in their original order: -4 at 4, 3 at 0, 2 at 2, 1.5 at 8
    assert idx.tolist() == [0, 2, 4, 8]
    assert layer.rank == 4 and layer.U.shape == (40, 4) and layer.V.shape == (30, 4)
    torch.testing.assert_close(layer.s.detach(), s0[idx])
    dropped = float(s0[[1, 3, 5, 6, 7, 9]].double().square().sum())
    assert float((W - dense_weight(layer)).square().sum()) == pytest.approx(dropped, rel=1e-5)
    assert all(a is b for a, b in zip([layer.U, layer.s, layer.V], params_before))
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in params_before)


def test_truncate_with_explicit_indices():
    torch.manual_seed(11)
    layer = SpectralLinear(20, 12, 5)
    U, V = layer.U.detach().clone(), layer.V.detach().clone()
    layer.truncate_(torch.tensor([3, 1]))
    torch.testing.assert_close(layer.U.detach(), U[:, [3, 1]], rtol=0, atol=0)
    torch.testing.assert_close(layer.V.detach(), V[:, [3, 1]], rtol=0, atol=0)


def test_grow_with_orthonormal_directions_leaves_output_unchanged():
    torch.manual_seed(12)
    layer = SpectralLinear(48, 36, 5)
    with torch.no_grad():
        layer.s.copy_(torch.randn(5))
    k = 3
    # directions orthonormal to the current ones: the trailing columns of a QR of [U | noise]
    U_new = torch.linalg.qr(torch.cat([layer.U.detach(), torch.randn(48, k)], 1))[0][:, 5:]
    V_new = torch.linalg.qr(torch.cat([layer.V.detach(), torch.randn(36, k)], 1))[0][:, 5:]
    x = torch.randn(4, 9, 48)
    y0 = layer(x).detach()
    params_before = [layer.U, layer.s, layer.V]
    layer.grow_(U_new, V_new)
    assert layer.rank == 8 and torch.equal(layer.s.detach()[5:], torch.zeros(k))
    assert all(a is b for a, b in zip([layer.U, layer.s, layer.V], params_before))
    assert all(p.is_contiguous() for p in layer.parameters())
    y1 = layer(x).detach()
    assert float((y1 - y0).norm() / y0.norm()) <= 1e-5
    assert ortho_err(layer.U) < FP32_TOL and ortho_err(layer.V) < FP32_TOL


def test_grow_rejects_mismatched_shapes():
    layer = SpectralLinear(10, 8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        layer.grow_(torch.zeros(10, 2), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="do not fit"):
        layer.grow_(torch.zeros(9, 2), torch.zeros(8, 2))


# ---------------------------------------------------------------------------------------------
# never materialize W


@pytest.mark.parametrize("method", ["cholesky", "householder"])
def test_training_step_never_materializes_dense_weight(method):
    """Forward + backward + AdamW step + retraction of a 4096×8192 rank-16 layer: no tensor any op
    returns may have in·out elements (views included, so the check is stricter than allocations)."""
    torch.manual_seed(13)
    in_f, out_f, r = 4096, 8192, 16
    layer = SpectralLinear(in_f, out_f, r)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    retractor = Retractor(layer, method=method)
    x = torch.randn(1, 4, in_f)
    phases = {}
    with TensorTracer() as phases["forward"]:
        loss = layer(x).square().mean()
    with TensorTracer() as phases["backward"]:
        loss.backward()
    with TensorTracer() as phases["step"]:
        opt.step()
    with TensorTracer() as phases["retraction"]:
        retractor()

    # the tracer really sees the work of each phase
    assert (1, 4, out_f) in phases["forward"].shapes()
    assert {(in_f, r), (out_f, r)} <= phases["backward"].shapes()  # dL/dU, dL/dV
    assert {(in_f, r), (out_f, r)} <= phases["step"].shapes()  # Adam moments / updates
    assert {(in_f, r), (out_f, r)} <= {s[-2:] for s in phases["retraction"].shapes()}  # Q
    for name, tracer in phases.items():
        assert tracer.max_numel() < in_f * out_f, f"{name} produced a tensor with ≥ in·out elements"
    assert ortho_err(layer.U) < FP32_TOL


def test_tracer_catches_dense_materialization():
    """Positive control: the same tracer flags ``to_linear``, which does build W."""
    layer = SpectralLinear(512, 1024, 4)
    with TensorTracer() as tracer:
        layer.to_linear()
    assert tracer.max_numel() >= 512 * 1024
