"""GradientSketch: quality of the sketched growth directions against the explicit gradient, micro-batch
accumulation, hook hygiene, degenerate fallbacks, and "never an in×out tensor".

Tolerances: fp32 eps ≈ 1.2e-7. Orthonormality after two rounds of (project, orthonormalize) is at
rounding level, ~√k·eps ≲ 1e-6: checked at 1e-5. Sketch sums over ≤ 128 tokens of O(1) products
differ by summation order only: ~√T·eps·|terms| ≲ 1e-5 relative, checked at 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tsvd.sketch import GradientSketch, random_directions
from tsvd.spectral import SpectralEmbedding, SpectralLinear
from tsvd.stiefel import orthonormality_error

M, N, R, K = 96, 128, 16, 8


def layer_model(seed: int = 0, m: int = M, n: int = N, r: int = R) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(SpectralLinear(m, n, r, bias=True))


def decaying_problem(T: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with a decaying covariance and a decaying output metric: the gradient's spectrum decays,
    as real LM gradients do (a flat random gradient has no "top" directions to find)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, M, generator=g) * (0.7 ** torch.arange(M))
    W = torch.randn(N, N, generator=g) * (0.8 ** torch.arange(N))
    return x, W


def loss_of(model: nn.Module, x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = model(x)
    y.retain_grad()
    return y, ((y @ W) ** 2).sum() / 2


def projected_gradient(model: nn.Sequential, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The explicit ``A = (I − UUᵀ) Xᵀg (I − VVᵀ)`` (small layer, test only)."""
    y, loss = loss_of(model, x, W)
    loss.backward()
    G = x.reshape(-1, M).T @ y.grad.reshape(-1, N)
    U, V = model[0].U.detach(), model[0].V.detach()
    return (torch.eye(M) - U @ U.T) @ G @ (torch.eye(N) - V @ V.T)


def ortho_to(A: torch.Tensor, F: torch.Tensor) -> float:
    return float(orthonormality_error(torch.cat([F.detach(), A], dim=1)))


def test_directions_capture_the_top_gradient_pairs():
    model = layer_model()
    x, W = decaying_problem()
    with GradientSketch(model, width=K, generator=torch.Generator().manual_seed(2)) as sketch:
        _, loss = loss_of(model, x, W)
        loss.backward()
    model.zero_grad()
    A = projected_gradient(model, x, W)
    U_new, V_new = sketch.directions("0", K)
    assert ortho_to(U_new, model[0].U) < 1e-5 and ortho_to(V_new, model[0].V) < 1e-5
    best = float(torch.linalg.svdvals(A)[:K].sum())  # max of Σ uᵢᵀ A vᵢ over orthonormal pairs
    gain = float(torch.diagonal(U_new.T @ A @ V_new).abs().sum())
    U_r, V_r = random_directions(model[0].U, model[0].V, K, torch.Generator().manual_seed(3))
    random_gain = float(torch.diagonal(U_r.T @ A @ V_r).abs().sum())
    assert gain >= 0.99 * best
    assert random_gain < 0.2 * best


def test_given_factors_replace_the_modules_own():
    """``factors=`` (what ``Engine.sketch_factors`` hands over under ZeRO-3, where the modules hold only
    partitions) is read instead of the modules' ``U``, ``V``: the same factors give the same sketch
    bitwise, even when the module's own are unreadable; other factors give another sketch."""
    x, W = decaying_problem()

    def sketch_of(model, factors):
        with GradientSketch(model, width=K, generator=torch.Generator().manual_seed(2), factors=factors) as sk:
            loss_of(model, x, W)[1].backward()
        return sk.sketches["0"]

    model = layer_model()
    plain = sketch_of(model, None)
    full = {"0": (model[0].U.detach().clone(), model[0].V.detach().clone())}
    model = layer_model()
    with torch.no_grad():  # a stand-in for a ZeRO-3 partition: the module's own U is useless
        model[0].U.zero_()
    given = sketch_of(model, full)
    for key in ("omega", "psi"):
        assert torch.equal(getattr(plain, key), getattr(given, key)), key
    other = sketch_of(layer_model(), {"0": random_directions(full["0"][0], full["0"][1], full["0"][0].shape[1],
                                                             torch.Generator().manual_seed(5))})
    assert not torch.allclose(plain.omega, other.omega)


def test_accumulates_over_micro_batches():
    x, W = decaying_problem(T=128)
    sketches = []
    for chunks in (1, 4):
        model = layer_model()
        with GradientSketch(model, width=K, generator=torch.Generator().manual_seed(2)) as sk:
            for xb in x.chunk(chunks):
                loss_of(model, xb, W)[1].backward()
        sketches.append(sk.sketches["0"])
    one, four = sketches
    assert four.tokens == one.tokens == 128
    for a, b in ((one.Y, four.Y), (one.Z, four.Z)):
        assert float((a - b).norm() / a.norm()) < 1e-4


def test_all_reduce_sums_data_parallel_shards():
    """Two "ranks" sketch half a batch each with the same seed; summing them gives the global sketch."""
    x, W = decaying_problem(T=128)
    shards = []
    for xb in (x, *x.chunk(2)):
        model = layer_model()
        with GradientSketch(model, width=K, generator=torch.Generator().manual_seed(2)) as sk:
            loss_of(model, xb, W)[1].backward()
        shards.append(sk)
    full, rank0, rank1 = shards
    others = iter([rank1.sketches["0"].Y, rank1.sketches["0"].Z, torch.tensor([64.0])])
    rank0.all_reduce_(lambda t: t.add_(next(others)))  # a stand-in for torch.distributed.all_reduce
    assert rank0.sketches["0"].tokens == 128
    for a, b in ((full.sketches["0"].Y, rank0.sketches["0"].Y), (full.sketches["0"].Z, rank0.sketches["0"].Z)):
        assert float((a - b).norm() / a.norm()) < 1e-4


def test_hooks_removed_on_exit_and_on_error():
    model = layer_model()
    x, W = decaying_problem()
    with GradientSketch(model, generator=torch.Generator().manual_seed(2)) as sk:
        assert len(model[0]._forward_hooks) == 1
        loss_of(model, x, W)[1].backward()
    assert len(model[0]._forward_hooks) == 0
    Y = sk.sketches["0"].Y.clone()
    _, loss = loss_of(model, x, W)  # after exit: no hook, no accumulation
    loss.backward()
    assert torch.equal(Y, sk.sketches["0"].Y)
    with pytest.raises(RuntimeError, match="boom"):
        with GradientSketch(model):
            raise RuntimeError("boom")
    assert len(model[0]._forward_hooks) == 0


def test_graph_built_inside_but_backward_after_exit_is_ignored():
    model = layer_model()
    x, W = decaying_problem()
    with GradientSketch(model) as sk:
        _, loss = loss_of(model, x, W)
    loss.backward()
    assert sk.sketches["0"].tokens == 0


def test_no_grad_forward_not_sketched():
    model = layer_model()
    x, _ = decaying_problem()
    with GradientSketch(model) as sk, torch.no_grad():
        model(x)
    assert sk.sketches["0"].tokens == 0


@pytest.mark.parametrize("case", ["zero", "nonfinite", "low_rank", "unsketched"])
def test_degenerate_sketch_falls_back_to_random(case):
    model = layer_model()
    x, W = decaying_problem()
    with GradientSketch(model, width=K, generator=torch.Generator().manual_seed(2), layers=[] if case == "unsketched" else None) as sk:
        if case == "zero":
            (0.0 * loss_of(model, x, W)[1]).backward()
        elif case == "nonfinite":
            (math.inf * loss_of(model, x, W)[1]).backward()
        elif case == "low_rank":
            loss_of(model, x[:3], W)[1].backward()  # 3 tokens: G has rank ≤ 3 < K
    U_new, V_new = sk.directions("0", K)
    assert U_new.shape == (M, K) and V_new.shape == (N, K)
    assert torch.isfinite(U_new).all() and torch.isfinite(V_new).all()
    assert ortho_to(U_new, model[0].U) < 1e-5 and ortho_to(V_new, model[0].V) < 1e-5
    if case == "low_rank":  # the 3 gradient pairs lead, random ones complete the block
        model.zero_grad()
        A = projected_gradient(model, x[:3], W)
        gain = torch.diagonal(U_new.T @ A @ V_new).abs()
        assert float(gain[:3].sum()) >= 0.99 * float(torch.linalg.svdvals(A)[:3].sum())


def test_more_directions_than_the_sketch_holds():
    model = layer_model()
    x, W = decaying_problem()
    with GradientSketch(model, width=2, oversample=2) as sk:
        loss_of(model, x, W)[1].backward()
    U_new, V_new = sk.directions("0", 40)  # sketch holds ℓ = 4; the rest is random
    assert ortho_to(U_new, model[0].U) < 1e-5 and ortho_to(V_new, model[0].V) < 1e-5
    with pytest.raises(ValueError, match="cannot add"):
        sk.directions("0", M - R + 1)


def test_layer_selection():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": SpectralEmbedding(50, 16, 4), "a": SpectralLinear(16, 16, 4),
                           "b": SpectralLinear(16, 16, 4)})
    assert GradientSketch(model).layers == ["a", "b"]
    assert GradientSketch(model, width={"b": 3, "emb": 2}).layers == ["b"]
    with pytest.raises(ValueError, match="not a SpectralLinear"):
        GradientSketch(model, layers=["emb"])
    with GradientSketch(model, width={"b": 3}) as sk:
        pass
    assert set(sk.sketches) == {"b"}
    u, v = sk.directions("emb", 3)  # not sketched: random, still valid
    assert ortho_to(u, model["emb"].U) < 1e-5 and ortho_to(v, model["emb"].V) < 1e-5


class MaxNumel(TorchDispatchMode):
    """Largest tensor (in elements) any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count += 1
                self.largest = max(self.largest, t.numel())
        return out


def test_never_forms_an_in_by_out_tensor():
    m, n, r, T = 2048, 4096, 32, 64
    torch.manual_seed(0)
    model = nn.Sequential(SpectralLinear(m, n, r, bias=False))
    x = torch.randn(2, T // 2, m)
    tracer = MaxNumel()
    with tracer:
        with GradientSketch(model, generator=torch.Generator().manual_seed(1)) as sk:
            for xb in x:  # two micro-batches
                model(xb).square().mean().backward()
        U_new, V_new = sk.directions("0", r)
    assert tracer.count > 50  # the tracer did see the work
    assert tracer.largest < m * n // 4  # largest: T×n activations and n×ℓ' sketches
    assert ortho_to(U_new, model[0].U) < 1e-5 and ortho_to(V_new, model[0].V) < 1e-5


def test_pairs_gain_is_the_new_directions_core_gradient():
    """``pairs`` returns, per new pair, ``uᵢᵀ G vᵢ`` — the gradient a new ``sᵢ`` would get — with the sign
    of the pair as returned (checked against autograd after growing the layer at s = 0)."""
    model = layer_model()
    x, W = decaying_problem()
    with GradientSketch(model, width=K, generator=torch.Generator().manual_seed(2)) as sketch:
        loss_of(model, x, W)[1].backward()  # (no graph kept alive: it would pin the factors' old shapes)
    model.zero_grad()
    U_new, V_new, gain = sketch.pairs("0", K + 4)
    assert gain.shape == (K + 4,) and gain[K + 4 - 4:].abs().max() <= gain[:K].abs().max()
    model[0].grow_(U_new, V_new)
    _, loss = loss_of(model, x, W)
    loss.backward()
    true = model[0].s.grad[R:]
    top = true[:K].abs().max()
    assert torch.allclose(gain[:K], true[:K], atol=1e-3 * float(top))  # sketched pairs: the exact gradient
    assert torch.equal(sketch.directions("0", K)[0], sketch.pairs("0", K)[0])
