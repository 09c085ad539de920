"""Rank allocation: budgets respected to one rank, greedy optimal, loss sensitivity drives it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tsvd import UserError
from tsvd.allocation import (budget_spent, check_ratio, fisher_gains, greedy_ranks, loss_aware_allocation, rank_cost,
                             ratio_budget, uniform_ranks)
from tsvd.calibration import collect_output_gradients
from tsvd.whitening import whitened_svd


def test_uniform_ranks_keep_the_ratio_per_layer():
    shapes = {"a": (1536, 576), "b": (576, 1536), "c": (192, 576)}
    ranks = uniform_ranks(shapes, 0.8)
    for n, (o, i) in shapes.items():
        c = rank_cost(i, o)
        assert ranks[n] * c <= 0.8 * o * i < (ranks[n] + 1) * c
    assert uniform_ranks({"x": (4, 3)}, 1e-9) == {"x": 1}
    assert ratio_budget(shapes, 0.5) == sum(o * i for o, i in shapes.values()) // 2
    for bad in (0.0, 1.5, -1, True, "0.8"):
        with pytest.raises(UserError, match=r"params ratio must be a number in \(0, 1\]"):
            check_ratio(bad)


def test_greedy_ranks_spend_the_budget_to_one_rank_and_are_optimal():
    g = torch.Generator().manual_seed(0)
    gains = {n: torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values
             for n, k in (("a", 6), ("b", 5), ("c", 4))}
    costs = {"a": 7, "b": 5, "c": 3}
    for budget in (15, 29, 40, 57):
        ranks = greedy_ranks(gains, costs, budget)
        spent = budget_spent(ranks, costs)
        assert spent <= budget
        full = all(ranks[n] == gains[n].numel() for n in gains)
        assert full or budget - spent < max(costs.values())
        kept = sum(float(gains[n][:r].sum()) for n, r in ranks.items())
        # brute force over every rank combination within the same spent budget
        best = max(sum(float(gains[n][:r].sum()) for n, r in zip(gains, rs))
                   for rs in itertools.product(*(range(1, gains[n].numel() + 1) for n in gains))
                   if sum(r * costs[n] for n, r in zip(gains, rs)) <= spent)
        assert kept == pytest.approx(best, rel=1e-12)
    with pytest.raises(UserError, match="cannot give every layer rank 1"):
        greedy_ranks(gains, costs, 10)


def test_greedy_ranks_follow_the_gain_scale():
    flat = torch.linspace(1.0, 0.5, 8, dtype=torch.float64)
    costs = {"a": 1, "b": 1}
    even = greedy_ranks({"a": flat, "b": flat}, costs, 8)
    assert even == {"a": 4, "b": 4}
    tilted = greedy_ranks({"a": 3 * flat, "b": flat}, costs, 8)
    assert tilted["a"] > tilted["b"] and budget_spent(tilted, costs) == 8


class TwoPaths(nn.Module):
    """Logits ``5·A x + 0.2·B x``: the same layer shapes, weights and inputs; A's output errors move the
    loss 25× more per unit, so 625× more to second order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.A, self.B = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.B.weight.copy_(self.A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5 * self.A(x) + 0.2 * self.B(x)


def test_fisher_gains_prefer_the_layer_whose_truncation_hurts_the_loss_more():
    model = TwoPaths()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 8, generator=g) for _ in range(2)]
    with torch.no_grad():  # labels drawn from the model itself: the gradient moment is the Fisher
        labels = [torch.multinomial(torch.softmax(model(x), -1), 1, generator=g)[:, 0] for x in xs]

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        i = next(k for k, b in enumerate(xs) if b is x)
        return nn.functional.cross_entropy(m(x), labels[i])

    X = torch.cat(xs).double()
    layers = {"A": model.A, "B": model.B}
    whitened = {n: whitened_svd(lin.weight, X.T @ X) for n, lin in layers.items()}
    before = {n: lin.weight.detach().clone() for n, lin in layers.items()}
    grads = collect_output_gradients(model, layers, xs, loss_fn)
    assert all(torch.equal(lin.weight, before[n]) and lin.weight.grad is None for n, lin in layers.items())
    gains = {n: fisher_gains(w, grads.moment(n)) for n, w in whitened.items()}
    torch.testing.assert_close(gains["A"], 625 * gains["B"], rtol=1e-6, atol=0)

    @torch.no_grad()
    def loss_at(svds, rs):  # the model's loss with each layer at its rank
        for n, lin in layers.items():
            lin.weight.data = svds[n].weight(rs[n]).float()
        out = sum(float(loss_fn(model, x)) for x in xs)
        for n, lin in layers.items():
            lin.weight.data = before[n]
        return out

    costs = {n: rank_cost(8, 8) for n in layers}
    for per_direction in (False, True):
        ordered, ranks = loss_aware_allocation(whitened, {n: grads.moment(n) for n in layers}, costs,
                                               8 * costs["A"], per_direction)
        assert ranks["A"] > ranks["B"] and ranks["A"] + ranks["B"] == 8
        assert loss_at(ordered, ranks) < loss_at(whitened, {"A": 4, "B": 4})

