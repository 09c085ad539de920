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
    final, _ = collect_moments(model, {n: model.get_submodule(n) for n in names}, xs, loss_fn)
    first, _ = collect_moments(dense, {n: dense.get_submodule(n) for n in names}, xs, loss_fn)
    for n in names:
        expected = whitened_svd(dense.get_submodule(n).weight, final.moment(n)).weight(2).float()
        torch.testing.assert_close(model.get_submodule(n).to_linear().weight, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(final.moment("layers.2.down"), first.moment("layers.2.down"), rtol=1e-2)



def test_dense_targets_fit_each_layer_to_the_dense_outputs_on_the_converted_inputs():
    """``sequential_factors(dense_targets=True)``: every layer is the whitened truncation of
    ``output_matching_weight`` for its inputs in the converted model (``X̃``) and in the dense model
    (``X``), the first layer (same inputs in both) is the plain whitened one, and the dense model's
    outputs are matched better than by fitting each layer to its own weight."""
    from tsvd.convert import sequential_factors
    from tsvd.whitening import output_matching_weight

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    dense, xs = Net(), [torch.randn(4, 50, 6, generator=g) for _ in range(3)]  # 600 rows: M well conditioned
    names = [f"layers.{b}.{p}" for b in range(3) for p in ("gate", "up", "down")]

    def convert(dense_targets: bool) -> Net:
        model = copy.deepcopy(dense)
        sequential_factors(model, {n: model.get_submodule(n) for n in names}, xs, {n: 2 for n in names}, loss_fn,
                           dense_targets=dense_targets)
        return model

    def inputs(model: Net) -> dict[str, list[torch.Tensor]]:
        seen: dict[str, list] = {n: [] for n in names}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
        with torch.no_grad():
            for x in xs:
                model(x)
        for h in hooks:
            h.remove()
        return seen

    matched, own = convert(True), convert(False)
    X, Xt = inputs(dense), inputs(matched)
    for n in names:  # float32 products per batch, summed in float64, as the conversion forms them
        M = sum((xt.T @ xt).double() for xt in Xt[n])
        K = sum((xt.T @ x).double() for xt, x in zip(Xt[n], X[n]))
        W = dense.get_submodule(n).weight
        expected = whitened_svd(output_matching_weight(W, M, K), M).weight(2).float()
        torch.testing.assert_close(matched.get_submodule(n).to_linear().weight, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(matched.get_submodule("layers.0.gate").to_linear().weight,
                               own.get_submodule("layers.0.gate").to_linear().weight, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        gap = {name: sum(float((m(x) - dense(x)).square().sum()) for x in xs)
               for name, m in (("matched", matched), ("own", own))}
    assert gap["matched"] < gap["own"]
