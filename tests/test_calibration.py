"""Calibration statistics: hooks accumulate each layer's X Xᵀ exactly, shared inputs once.

Tolerance: per-batch products in float32 summed in float64; O(1) inputs of 8 features over ≤ 64 rows
agree with the float64 reference to ~1e-6 relative (float32 rounding); 1e-5 leaves headroom.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsvd import UserError
from tsvd.calibration import (InputMoments, collect_moments, lead_batches, moment_passes, next_token_loss,
                              token_windows)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate, self.up, self.down = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


def test_moments_are_the_input_second_moments_and_shared_inputs_count_once():
    model = Mlp()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(4)]
    layers = {"gate": model.gate, "up": model.up, "down": model.down}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    refs = [l.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
            for n, l in layers.items()]
    with torch.no_grad(), InputMoments(layers) as m:
        for x in xs:
            model(x)
            m.end_batch()
    for h in refs:
        h.remove()
    for n in layers:
        X = torch.cat(seen[n])
        torch.testing.assert_close(m.moment(n), X.T @ X, rtol=1e-5, atol=1e-5)
        assert m.moment(n).dtype == torch.float64 and m.rows(n) == 4 * 15
    assert m.shared_with("up") == "gate" and m.shared_with("down") == "down"
    assert m.moment("up") is m.moment("gate")
    assert not model.gate._forward_pre_hooks  # hooks removed on exit


class Headed(nn.Module):
    """``Mlp`` followed by a head that counts its calls (what a stopped pass must not run)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp, self.head, self.head_calls = Mlp(), nn.Linear(8, 3), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.head_calls += 1
        return self.head(self.mlp(x))


def test_moment_passes_stop_at_the_last_layer_after_one_whole_pass_and_equal_whole_passes():
    model = Headed()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 8, generator=g) for _ in range(3)] + [torch.randn(4, 8, generator=g)]
    loss_fn = lambda m, x: m(x).square().mean()  # noqa: E731
    layers = {n: model.mlp.get_submodule(n) for n in ("gate", "up", "down")}
    moments = collect_moments(model, layers, xs, loss_fn)
    assert model.head_calls == 4 and moments.final_layer() == "down"
    head_runs = []
    model.head.register_forward_pre_hook(lambda m, a: head_runs.append(1))
    model.head_calls = 0
    stopped = collect_moments(model, layers, xs, loss_fn)
    assert len(head_runs) == 1 and model.head_calls == 4  # the head ran in the first pass only
    for n in layers:
        torch.testing.assert_close(stopped.moment(n), moments.moment(n), rtol=0, atol=0)
    assert stopped.rows("down") == 10 and stopped.rows("up") == 10
    with pytest.raises(UserError, match="saw no input"):
        collect_moments(model, {"gate": model.mlp.gate, "head": model.head}, [], loss_fn).moment("head")


def test_projected_moments_are_the_outputs_second_moment_and_the_inputs_trace():
    """A projected layer keeps ``W C Wᵀ`` (its outputs without bias) and ``tr C``; the others are unchanged;
    a pass stopped after a projected final layer still measures it."""
    from tsvd.whitening import ProjectedMoment
    model = Headed()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(3)]
    loss_fn = lambda m, x: m(x).square().mean()  # noqa: E731
    layers = {n: model.mlp.get_submodule(n) for n in ("gate", "up", "down")}
    full = collect_moments(model, layers, xs, loss_fn)
    with InputMoments(layers, projected=["down"]) as m:
        moment_passes(model, m, xs, loss_fn)
    assert model.head_calls == 6 and m.final_layer() == "down"
    p = m.moment("down")
    assert isinstance(p, ProjectedMoment) and p.dim == 12 and m.rows("down") == 45
    W = model.mlp.down.weight.detach().double()
    C = full.moment("down")
    torch.testing.assert_close(p.gram, W @ C @ W.T, rtol=1e-5, atol=1e-5)  # fp32 products, see the module doc
    assert p.trace == pytest.approx(float(C.trace()), rel=1e-6)
    torch.testing.assert_close(m.moment("gate"), full.moment("gate"), rtol=1e-6, atol=1e-6)
    assert m.moment("up") is m.moment("gate")


def test_final_layer_needs_every_layer_fed_once():
    model = Mlp()
    with torch.no_grad(), InputMoments({"gate": model.gate, "down": model.down}) as m:
        assert m.final_layer() is None  # no batch yet
        model(torch.randn(2, 8))
        m.end_batch()
        assert m.order == ["gate", "down"] and m.final_layer() == "down"
    extra = nn.Linear(8, 8)  # never fed
    with torch.no_grad(), InputMoments({"gate": model.gate, "extra": extra}) as m:
        model(torch.randn(2, 8))
        m.end_batch()
        assert m.final_layer() is None

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    twice = Twice()
    with torch.no_grad(), InputMoments({"a": twice.a, "b": twice.b}) as m:
        twice(torch.randn(2, 8))
        m.end_batch()
        assert m.order == ["a", "b", "a"] and m.final_layer() is None  # a is fed twice: no early end


def test_token_windows():
    tokens = torch.arange(50)
    w = token_windows(tokens, seq_len=8, n_tokens=20, batch_size=2)
    assert [b.shape for b in w] == [(2, 9), (1, 9)]  # 3 windows predict 24 ≥ 20 tokens
    assert w[0][1].tolist() == list(range(8, 17))  # consecutive, sharing one boundary token
    assert sum(b.shape[0] for b in token_windows(tokens, 8, 10_000, 4)) == 6  # capped by the text
    with pytest.raises(UserError, match="calibration text is too short: 5 tokens"):
        token_windows(torch.arange(5), 8, 100, 2)


def test_lead_batches_put_the_leading_windows_in_batches_of_their_own():
    batches = token_windows(torch.arange(100), seq_len=8, n_tokens=80, batch_size=4)  # 10 windows: 4, 4, 2
    again, k = lead_batches(batches, 20)  # 3 windows predict 24 ≥ 20 tokens
    assert k == 1 and [b.shape[0] for b in again] == [3, 4, 3]
    torch.testing.assert_close(torch.cat(again), torch.cat(batches), rtol=0, atol=0)  # same windows, same order
    again, k = lead_batches(batches, 40)  # 5 windows
    assert k == 2 and [b.shape[0] for b in again] == [4, 1, 4, 1]
    again, k = lead_batches(batches, 10_000)  # capped by the windows there are
    assert k == 3 and [b.shape[0] for b in again] == [4, 4, 2]


def test_next_token_loss_reads_logits_from_any_output_shape():
    logits = torch.randn(1, 3, 5)
    w = torch.tensor([[1, 2, 3, 4]])
    expected = nn.functional.cross_entropy(logits[0], w[0, 1:])
    for wrap in (lambda t: t, lambda t: (t, None), lambda t: type("O", (), {"logits": t})()):
        assert float(next_token_loss(lambda x, wrap=wrap: wrap(logits), w)) == pytest.approx(float(expected))


def test_output_gradient_moments_are_the_gradients_second_moments():
    from tsvd.calibration import collect_output_gradients
    model = Mlp()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(2)]
    loss_fn = lambda m, x: m(x).square().sum()  # noqa: E731
    moments = collect_output_gradients(model, {"up": model.up, "down": model.down}, xs, loss_fn)
    assert all(p.grad is None for p in model.parameters())  # parameter gradients are not kept
    for name in ("up", "down"):
        expected = 0
        for x in xs:
            outs: list[torch.Tensor] = []

            def keep(m, a, o, outs=outs):
                o.retain_grad()
                outs.append(o)
            h = model.get_submodule(name).register_forward_hook(keep)
            loss_fn(model, x).backward()
            h.remove()
            gr = outs[0].grad.reshape(-1, outs[0].shape[-1]).double()
            expected = expected + gr.T @ gr
        torch.testing.assert_close(moments.moment(name), expected, rtol=1e-5, atol=1e-5)
        if name == "up":  # tall (8 → 12): its projected form is Wᵀ G W and tr G
            model.zero_grad(set_to_none=True)
            proj = collect_output_gradients(model, {"up": model.up}, xs, loss_fn, projected=["up"]).moment("up")
            W = model.up.weight.detach().double()
            torch.testing.assert_close(proj.gram, W.T @ expected @ W, rtol=1e-5, atol=1e-4)
            assert proj.trace == pytest.approx(float(expected.trace()), rel=1e-5) and proj.dim == 12
    with pytest.raises(UserError, match="received no gradient"):
        moments.moment("gate")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d", [9, 700, 1100])  # one block; two; four, the last one shorter
def test_upper_gram_is_the_upper_triangle_of_the_product(dtype, d):
    from tsvd.calibration import upper_gram
    rows = torch.randn(37, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    full = rows.double().T @ rows.double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(upper_gram(rows).double().triu(), full.triu(), rtol=tol, atol=tol)


class TwoMlps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Mlp(), Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_forward_stages_group_shared_inputs_in_forward_order():
    from tsvd.calibration import forward_stages
    model = TwoMlps()
    # registration order differs from the forward order: the stages follow the forward
    layers = {n: model.get_submodule(n) for n in ("b.down", "a.up", "b.gate", "a.down", "a.gate", "b.up")}
    stages = forward_stages(model, layers, torch.randn(2, 8), lambda m, x: m(x).sum())
    assert stages == [["a.gate", "a.up"], ["a.down"], ["b.gate", "b.up"], ["b.down"]]
    assert all(not layer._forward_pre_hooks for layer in layers.values())
    assert forward_stages(model, {"a.down": model.a.down, "b.up": model.b.up}, torch.randn(2, 8),
                          lambda m, x: m.a(x).sum()) == [["a.down"]]  # b.up is never fed


def test_stage_moments_stop_the_pass_at_the_stage_and_equal_the_full_pass():
    from tsvd.calibration import stage_moments
    model = TwoMlps()
    xs = [torch.randn(3, 8), torch.randn(5, 8)]
    later: list[int] = []
    h = model.b.gate.register_forward_pre_hook(lambda m, a: later.append(1))
    loss_fn = lambda m, x: m(x).square().mean()  # noqa: E731
    stage = {"a.gate": model.a.gate, "a.up": model.a.up}
    moments = stage_moments(model, stage, xs, loss_fn)
    h.remove()
    assert later == []  # nothing after the stage ran
    full = collect_moments(model, stage, xs, loss_fn)
    torch.testing.assert_close(moments.moment("a.up"), full.moment("a.up"), rtol=0, atol=0)
    assert moments.rows("a.gate") == 8 and not model.a.up._forward_pre_hooks
