"""tsvd.block_replay: finding a model's block list, capturing and replaying block inputs, and the sequential
calibration built on it (each stage replays its own block instead of running the model)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tsvd import spectralize
from tsvd.block_replay import block_inputs, find_blocks, run_block
from tsvd.calibration import collect_moments
from tsvd.whitening import whitened_svd


class Cache(list):
    """Stands in for a key/value cache: replays must not see it."""


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d), nn.Linear(3 * d, d)
        self.cached_calls = 0

    def forward(self, x, scale=None, cache=None):
        if cache is not None:
            self.cached_calls += 1
        return x + self.down(torch.tanh(self.gate(x)) * self.up(x)) * scale, "aux"


class Net(nn.Module):
    def __init__(self, d: int = 6, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        h, scale = self.embed(x), torch.tensor(0.5)
        for block in self.layers:
            h = block(h, scale=scale, cache=Cache())[0]
        return h


def loss_fn(model, x):
    return model(x).square().mean()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 5, 6, generator=g) for _ in range(3)]


def test_find_blocks_needs_every_layer_inside_one_list():
    net = Net()
    assert find_blocks(net, ["layers.0.gate", "layers.2.down"]) == ("layers", net.layers)
    assert find_blocks(net, ["layers.0.gate", "embed"]) is None
    assert find_blocks(net, ["layers.7.gate"]) is None  # no such block
    assert find_blocks(nn.Sequential(nn.Linear(2, 2)), ["0"]) is None


def test_replayed_blocks_reproduce_the_model():
    """Capturing block 0's inputs and replaying every block gives the model's own output, bitwise; the
    replays see no cache; a stopped replay returns nothing."""
    torch.manual_seed(0)
    net, xs = Net(), batches()
    inputs = block_inputs(net, net.layers[0], xs, loss_fn)
    assert len(inputs) == 3 and all(kw["cache"] is None for _, kw in inputs)
    for block in net.layers:
        inputs = run_block(block, inputs)
    with torch.no_grad():
        for (args, _), x in zip(inputs, xs):
            assert torch.equal(args[0], net(x))
    assert all(b.cached_calls == 3 for b in net.layers)  # only the three direct calls just made
    assert run_block(net.layers[0], inputs, stop_at=net.layers[0].down) is None


def test_sequential_calibration_by_replay_matches_its_definition():
    """With the layers inside a block list, ``sequential=True`` replays blocks: the model itself runs once
    to find the stages and once per batch to capture block 0's inputs (not once per stage), and every
    layer is still the whitened optimum for the inputs of the converted model."""
    torch.manual_seed(0)
    dense, xs = Net(), batches()
    names = [f"layers.{b}.{p}" for b in range(3) for p in ("gate", "up", "down")]
    model = copy.deepcopy(dense)
    model.passes = 0
    report = spectralize(model, ["layers.*"], rank=2, calibration=xs, loss_fn=loss_fn, sequential=True)
    assert [r.name for r in report] == names
    assert model.passes == 1 + len(xs)  # forward_stages, then block_inputs: no pass per stage
    final = collect_moments(model, {n: model.get_submodule(n) for n in names}, xs, loss_fn)
    first = collect_moments(dense, {n: dense.get_submodule(n) for n in names}, xs, loss_fn)
    for n in names:
        expected = whitened_svd(dense.get_submodule(n).weight, final.moment(n)).weight(2).float()
        torch.testing.assert_close(model.get_submodule(n).to_linear().weight, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(final.moment("layers.2.down"), first.moment("layers.2.down"), rtol=1e-2)


def test_sequential_factors_with_curvatures_are_the_curvature_weighted_optimum():
    """``sequential_factors(curvatures=)``: each layer is the curvature-weighted truncation (inputs of the
    converted model, the given output-gradient moment), not the input-only one."""
    from tsvd.convert import sequential_factors

    torch.manual_seed(0)
    dense, xs = Net(), batches()
    names = [f"layers.{b}.{p}" for b in range(3) for p in ("gate", "up", "down")]
    g = torch.Generator().manual_seed(3)
    curv = {}
    for n in names:
        out_f = dense.get_submodule(n).out_features
        A = torch.randn(out_f, 2 * out_f, generator=g, dtype=torch.float64) * torch.logspace(0, -1, out_f,
                                                                                              dtype=torch.float64)[:, None]
        curv[n] = A @ A.T
    model = copy.deepcopy(dense)
    sequential_factors(model, {n: model.get_submodule(n) for n in names}, xs, {n: 2 for n in names}, loss_fn,
                       curvatures=curv)
    final = collect_moments(model, {n: model.get_submodule(n) for n in names}, xs, loss_fn)
    for n in names:
        W = dense.get_submodule(n).weight
        expected = whitened_svd(W, final.moment(n), curvature=curv[n]).weight(2).float()
        torch.testing.assert_close(model.get_submodule(n).to_linear().weight, expected, rtol=1e-4, atol=1e-5)
    plain = whitened_svd(dense.get_submodule("layers.0.gate").weight, final.moment("layers.0.gate")).weight(2).float()
    assert not torch.allclose(model.get_submodule("layers.0.gate").to_linear().weight, plain, rtol=1e-2, atol=1e-3)
