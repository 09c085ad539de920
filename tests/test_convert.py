"""spectralize / densify on arbitrary modules.

Tolerances: a full-energy conversion stores the float64 SVD of each fp32 weight as fp32 factors, so
each layer reproduces its weight to a few ulp (~1e-7 relative); through two small layers and a GELU
the outputs (O(1)) agree to ~1e-6. 1e-5 leaves headroom; a dropped direction costs O(1e-2).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tsvd import SpectralLinear, UserError, spectralize
from tsvd.convert import LayerReport, densify, format_report, matches_glob

TOL = 1e-5


class Block(nn.Module):
    def __init__(self, d: int, ffn: int, device=None) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d, device=device), "k": nn.Linear(d, d, bias=False, device=device)})
        self.mlp = nn.Sequential(nn.Linear(d, ffn, device=device), nn.GELU(), nn.Linear(ffn, d, device=device))
        self.norm = nn.LayerNorm(d, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn["q"](x) * torch.sigmoid(self.attn["k"](x))
        return x + self.mlp(self.norm(x))


def make_model(d: int = 12, ffn: int = 20, seed: int = 0, device=None) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Block(d, ffn, device), Block(d, ffn, device))


ALL = ["0.attn.q", "0.attn.k", "0.mlp.0", "0.mlp.2", "1.attn.q", "1.attn.k", "1.mlp.0", "1.mlp.2"]


def kinds(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, SpectralLinear))}


def test_targets_and_exclude_globs():
    model = make_model()
    report = spectralize(model, targets="*.mlp.*", exclude=["1.*"], rank=3)
    assert [r.name for r in report] == ["0.mlp.0", "0.mlp.2"]
    k = kinds(model)
    assert k["0.mlp.0"] == k["0.mlp.2"] == "SpectralLinear"
    assert all(k[n] == "Linear" for n in ALL if n not in ("0.mlp.0", "0.mlp.2"))
    # several patterns, a second call on the rest
    report = spectralize(model, targets=["*.attn.q", "1.mlp.2"], rank=2)
    assert [r.name for r in report] == ["0.attn.q", "1.attn.q", "1.mlp.2"]


def test_report_contents():
    model = make_model(seed=1)
    weights = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = spectralize(model, rank=4)
    assert [r.name for r in report] == ALL
    for r in report:
        W = weights[r.name]
        assert (r.out_features, r.in_features) == tuple(W.shape)
        assert r.rank == 4
        S = torch.linalg.svdvals(W)
        assert r.retained_energy == pytest.approx(float(S[:4].square().sum() / S.square().sum()), rel=1e-5)
        assert r.dense_params == W.numel() and r.spectral_params == 4 * (sum(W.shape) + 1)
        assert r.compression == pytest.approx(W.numel() / (4 * (sum(W.shape) + 1)))
        assert model.get_submodule(r.name).rank == 4
    text = format_report(report)
    assert all(name in text for name in ALL) and "total" in text
    assert f"{report[2].compression:.1f}x" in text


def test_rank_is_capped_at_layer_size():
    model = make_model()
    report = spectralize(model, rank=1000)
    assert {r.name: r.rank for r in report} == {n: 12 for n in ALL}  # min(in, out) = d = 12
    assert all(r.retained_energy == pytest.approx(1.0, rel=1e-6) for r in report)  # fp32 s vs fp64 ‖W‖²


def test_full_energy_conversion_preserves_outputs():
    model = make_model(seed=2)
    x = torch.randn(3, 7, 12)
    y0 = model(x).detach()
    report = spectralize(model, energy=1.0)
    assert all(isinstance(model.get_submodule(n), SpectralLinear) for n in ALL)
    assert all(r.retained_energy == pytest.approx(1.0, rel=1e-6) for r in report)  # fp32 s vs fp64 ‖W‖²
    torch.testing.assert_close(model(x).detach(), y0, rtol=TOL, atol=TOL)


def test_energy_threshold_gives_minimal_ranks():
    model = make_model(seed=3)
    weights = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = spectralize(model, energy=0.8)
    for r in report:
        S2 = torch.linalg.svdvals(weights[r.name].double()).square()
        cum = S2.cumsum(0) / S2.sum()
        assert r.retained_energy >= 0.8 and r.retained_energy == pytest.approx(float(cum[r.rank - 1]), rel=1e-6)
        assert r.rank == 1 or float(cum[r.rank - 2]) < 0.8
        assert r.rank < 12  # 80% of a random 12-dim spectrum never needs every direction


@pytest.mark.parametrize("init", ["sct", "scaled"])
def test_fresh_init(init):
    model = make_model()
    report = spectralize(model, targets="*.mlp.*", rank=5, init=init)
    assert all(r.rank == 5 and r.retained_energy == 1.0 for r in report)
    layer = model.get_submodule("0.mlp.0")
    if init == "sct":
        assert torch.equal(layer.s.detach(), torch.ones(5))


def test_meta_model_sizing_allocates_nothing():
    class Tracer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.devices: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.devices += [t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    d, ffn, r = 8192, 28672, 32
    model = make_model(d, ffn, device="meta")
    with Tracer() as tracer:
        report = spectralize(model, rank=r)
    assert len(tracer.devices) >= 3 * len(ALL)  # the tracer sees the factor allocations ...
    assert set(tracer.devices) == {"meta"}  # ... and every one of them is on meta
    params = {n: p for n, p in model.named_parameters()}
    assert all(p.device.type == "meta" for p in params.values())
    expected = sum(r * (i + o + 1) for i, o in [(d, d)] * 4 + [(d, ffn), (ffn, d)] * 2)
    assert sum(rep.spectral_params for rep in report) == expected
    spectral = sum(p.numel() for n, p in params.items() if n.rsplit(".", 1)[-1] in ("U", "s", "V"))
    assert spectral == expected
    with pytest.raises(UserError, match="meta device; energy=, params_ratio=, budget= and calibration= need real weights"):
        spectralize(make_model(16, 32, device="meta"), energy=0.9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets="*.nothing", rank=2), "no nn.Linear matches"),
        (dict(exclude="*", rank=2), "no nn.Linear matches"),
        (dict(rank=2, energy=0.9), "exactly one of rank=, energy=, params_ratio= or budget="),  # tsvd.sizes
        (dict(energy=0.9, init="sct"), "cannot be combined with init="),
        (dict(rank=2, init="xavier"), "init must be one of"),
        (dict(rank=13, init="sct"), "rank for 0.attn.q=13 is impossible"),
    ],
)
def test_bad_arguments_raise_user_error(kwargs, message):
    model = make_model()
    with pytest.raises(UserError, match=message):
        spectralize(model, **kwargs)


def test_root_linear_is_a_user_error_not_a_silent_no_op():
    lin = nn.Linear(8, 6)
    with pytest.raises(UserError, match="cannot be replaced in place"):
        spectralize(lin, rank=2)
    assert dict(lin.named_children()) == {}


def test_densify_round_trip():
    model = make_model(seed=4)
    x = torch.randn(2, 5, 12)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    y0 = model(x).detach()
    spectralize(model, energy=1.0)
    assert densify(model) == len(ALL)
    assert set(kinds(model).values()) == {"Linear"}
    for n, W in weights.items():
        torch.testing.assert_close(model.get_submodule(n).weight.detach(), W, rtol=0, atol=TOL)
    torch.testing.assert_close(model(x).detach(), y0, rtol=TOL, atol=TOL)
    assert model.get_submodule("0.attn.k").bias is None
    assert densify(model) == 0


def test_layer_report_arithmetic():
    r = LayerReport("x", in_features=8192, out_features=28672, rank=32, retained_energy=1.0)
    assert r.dense_params == 8192 * 28672 and r.spectral_params == 32 * (8192 + 28672 + 1)
    assert math.isclose(r.compression, r.dense_params / r.spectral_params)


# --- activation-aware conversion (calibration=) ---

def tiny_lm(seed: int = 0, n_kv_heads: int = 2):
    from tsvd.config import ModelConfig
    from tsvd.model import Transformer
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=48, dim=16, n_layers=2, n_heads=2, n_kv_heads=n_kv_heads, ffn_dim=40,
                                   max_seq_len=16))


def lm_windows(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 48, (n, 13), generator=g).split(2))


def test_calibrated_conversion_is_the_whitened_optimum_of_the_layers_inputs():
    from tsvd.whitening import whitened_svd
    model, windows = tiny_lm(), lm_windows()
    name = "layers.1.mlp.down"
    lin = model.get_submodule(name)
    W = lin.weight.detach().clone()
    rows = []
    h = lin.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for w in windows:
            model(w[:, :-1])
    h.remove()
    X = torch.cat(rows)  # N×in
    lines: list[str] = []
    report = spectralize(model, targets="*.mlp.*", rank=5, calibration=windows, log=lines.append)
    assert [r.rank for r in report] == [5] * 6
    new = model.get_submodule(name)
    assert type(new) is SpectralLinear and new.U.shape == (40, 5) and new.V.shape == (16, 5)
    expected = whitened_svd(W, X.T @ X).weight(5)
    torch.testing.assert_close(((new.V * new.s) @ new.U.T).double(), expected, rtol=1e-4, atol=1e-5)
    # the kept output energy is reported, and a line per layer was logged
    out_energy = float((X @ W.double().T).square().sum())
    err = float((X @ (W.double() - expected).T).square().sum())
    assert report[-1].retained_energy == pytest.approx(1 - err / out_energy, rel=1e-4)
    assert sum(name in line for line in lines) >= 2 and any(line.startswith("calibration:") for line in lines)


@pytest.mark.parametrize("targets", ["*.mlp.*", "layers.*"])
def test_loss_aware_conversion_is_the_curvature_weighted_optimum_at_global_ranks(targets):
    """``params_ratio`` with calibration: every layer is the truncation optimal for the K-FAC loss estimate
    (its inputs' moment on the calibration batches, its output gradients' moment on the sensitivity
    batches, measured here by plain hooks as full matrices), and the ranks keep the directions of largest
    ``σᵢ²`` per parameter across layers. Every shape kind: tall (``gate/up``), wide (``down``; ``k/v``,
    sharing their input with the square ``q``) and square."""
    from tsvd.allocation import greedy_ranks, rank_cost, ratio_budget
    from tsvd.whitening import whitened_svd
    model, windows = tiny_lm(n_kv_heads=1), lm_windows()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_glob(n, [targets])]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    C = {n: 0 for n in names}
    G = {n: 0 for n in names}

    def moment(store, n):
        def add(t):
            rows = t.detach().reshape(-1, t.shape[-1]).double()
            store[n] = store[n] + rows.T @ rows
        return add

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, f=moment(C, n): f(a[0])) for n in names]
    with torch.no_grad():
        for w in windows:
            model(w[:, :-1])
    for h in hooks:
        h.remove()
    def on_output(f):
        def hook(module, args, out):
            out.register_hook(f)
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(on_output(moment(G, n))) for n in names]
    for w in windows[:2]:
        model(w[:, :-1], w[:, 1:])[1].backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)

    report = spectralize(model, targets=targets, params_ratio=0.5, calibration=windows, gradient_batches=2)
    svds = {n: whitened_svd(weights[n], C[n], curvature=G[n]) for n in names}
    shapes = {n: tuple(weights[n].shape) for n in names}
    costs = {n: rank_cost(i, o) for n, (o, i) in shapes.items()}
    ranks = greedy_ranks({n: w.direction_loss() for n, w in svds.items()}, costs, ratio_budget(shapes, 0.5))
    assert {r.name: r.rank for r in report} == ranks
    assert len(set(ranks.values())) > 1  # the allocation is not uniform here
    for n in names:
        new = model.get_submodule(n)
        torch.testing.assert_close(((new.V * new.s) @ new.U.T).double(), svds[n].weight(ranks[n]),
                                   rtol=1e-4, atol=1e-5)  # fp32 forward statistics and fp32 factors


def test_calibrated_layers_are_ordinary_spectral_layers():
    from tsvd.retraction import Retractor
    model, windows = tiny_lm(), lm_windows()
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n}
    dense = sum(o * i for o, i in shapes.values())
    report = spectralize(model, targets="*.mlp.*", params_ratio=0.5, calibration=windows, gradient_batches=2)
    spent = sum(r.spectral_params for r in report)
    assert spent <= dense // 2 and dense // 2 - spent < max(o + i + 1 for o, i in shapes.values())
    for r in report:
        m = model.get_submodule(r.name)
        eye = torch.eye(m.rank)
        torch.testing.assert_close(m.U.T @ m.U, eye, rtol=0, atol=1e-5)  # fp32 factors of fp64 QR/SVD
        torch.testing.assert_close(m.V.T @ m.V, eye, rtol=0, atol=1e-5)
    # a training step with the retraction
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    _, loss = model(windows[0][:, :-1], windows[0][:, 1:])
    loss.backward()
    opt.step()
    Retractor(model)()
    layer = model.get_submodule(report[0].name)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(layer.rank), rtol=0, atol=1e-5)
    # truncate, grow (W unchanged), densify for export
    k = layer.rank
    layer.truncate_(k - 1)
    x = torch.randn(3, layer.in_features)
    y = layer(x).detach()
    Q = torch.linalg.qr(torch.cat([layer.U.detach(), torch.randn(layer.in_features, 2)], 1))[0][:, k - 1:]
    P = torch.linalg.qr(torch.cat([layer.V.detach(), torch.randn(layer.out_features, 2)], 1))[0][:, k - 1:]
    layer.grow_(Q, P)
    assert layer.rank == k + 1
    torch.testing.assert_close(layer(x), y, rtol=TOL, atol=TOL)
    logits = model(windows[1][:, :-1])[0].detach()
    assert densify(model) == len(report)
    torch.testing.assert_close(model(windows[1][:, :-1])[0], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(params_ratio=0.5, calibration=[]), "calibration has no batches"),
        (dict(budget=0), "budget must be a positive integer"),  # tsvd.sizes
        (dict(budget=10**9), "exceeds the targeted layers' dense parameters"),
        (dict(energy=0.9, calibration=[torch.zeros(1, 3, dtype=torch.long)]), "cannot be combined with energy="),
        (dict(params_ratio=0.5, allocation="loss"), "allocation='loss' needs calibration="),
        (dict(params_ratio=0.5, allocation="energy"), "allocation must be 'loss' or 'uniform'"),
        (dict(params_ratio=0.5, shrinkage=1.5), r"shrinkage must be in \[0, 1\]"),
        (dict(params_ratio=0.5, calibration=[torch.zeros(1, 3, dtype=torch.long)], gradient_batches=2),
         r"gradient_batches must be in \[1, 1\]"),
        (dict(params_ratio=0.5, calibration=[torch.zeros(1, 3, dtype=torch.long)], gradient_batches=0),
         r"gradient_batches must be in \[1, 1\]"),
    ],
)
def test_bad_calibrated_arguments_raise_user_error(kwargs, message):
    model = tiny_lm()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(UserError, match=message):
        spectralize(model, targets="*.mlp.*", **kwargs)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing replaced


def test_plain_params_ratio_is_uniform_truncated_svd():
    model = make_model(16, 32)
    report = spectralize(model, targets="*.mlp.*", params_ratio=0.6)
    for r in report:  # 16x32: 0.6·512/49 → rank 6
        assert r.rank == int(0.6 * r.dense_params // (r.in_features + r.out_features + 1)) == 6
