"""Calibration: stream inputs through a model and accumulate each target layer's input second moment.

``InputMoments`` puts a forward pre-hook on each target ``nn.Linear``; every batch adds ``Xᵀ X`` of the
layer's input rows (``X`` is ``tokens×in``) to a float64 ``in×in`` sum. Nothing else is kept, so memory
is one ``in×in`` statistic per distinct input, not the activations. Layers fed the *same* tensor (a
Llama block's ``q/k/v`` or ``gate/up`` projections) share one statistic and its cost.

A wide layer (``out < in``) may keep its moment in projected form instead (``projected=``): the second
moment of its outputs, ``W C Wᵀ``, and ``tr C`` — all its whitened SVD reads of ``C``
(``tsvd.whitening.ProjectedMoment``), at ``out²`` rather than ``in²`` per row.

Each batch's product is formed in the input's dtype (float32: a sum over one batch's tokens, relative
rounding ~1e-7·√tokens) and added to the float64 total, so the total's rounding does not grow with
the number of batches.

Sequential calibration (``forward_stages``, ``stage_moments``) measures one stage of layers at a time,
on the inputs the model produces *now*: after the earlier stages have been replaced, a later layer is
calibrated on the outputs of the truncated layers before it. Each stage costs one pass over the
calibration batches, cut short once the stage's layers have seen their inputs (``tsvd.block_replay``
avoids most of that cost for models built of a list of blocks).
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsvd.block_replay import stop_forward, stopped_passes
from tsvd.errors import UserError
from tsvd.whitening import ProjectedMoment


def model_logits(out) -> Tensor:
    """Logits from a model's output: a tensor, a tuple whose first item they are, or ``.logits``."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def next_token_loss(model: nn.Module, window: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on token windows ``(B, T+1)``: ``model(window[:, :-1])``
    predicts ``window[:, 1:]``."""
    logits = model_logits(model(window[:, :-1]))
    return F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())


def token_windows(tokens: Tensor, seq_len: int, n_tokens: int, batch_size: int) -> list[Tensor]:
    """Consecutive, non-overlapping windows of ``seq_len + 1`` tokens from the start of ``tokens`` (1-D),
    enough to predict ``n_tokens`` tokens (whole windows), batched ``(≤batch_size, seq_len + 1)``."""
    if seq_len < 1 or n_tokens < 1 or batch_size < 1:
        raise UserError(f"calibration needs seq_len, tokens and batch size ≥ 1, got {seq_len}, {n_tokens}, {batch_size}")
    available = (tokens.numel() - 1) // seq_len
    if available < 1:
        raise UserError(f"calibration text is too short: {tokens.numel()} tokens, need more than {seq_len + 1}")
    n = min(available, -(-n_tokens // seq_len))
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    windows = tokens[idx].long()
    return list(windows.split(batch_size))


def lead_batches(batches: Sequence[Tensor], n_tokens: int) -> tuple[list[Tensor], int]:
    """``(batches', k)``: the windows of ``batches`` (``token_windows``' output) batched again, at the same
    batch size, so that the first ``k`` batches hold exactly the leading windows predicting at least
    ``n_tokens`` tokens (whole windows) and the rest hold the others."""
    windows = torch.cat(list(batches))
    size, seq_len = batches[0].shape[0], windows.shape[1] - 1
    n = min(windows.shape[0], -(-n_tokens // seq_len))
    lead = list(windows[:n].split(size))
    rest = list(windows[n:].split(size)) if n < windows.shape[0] else []
    return lead + rest, len(lead)


def upper_gram(rows: Tensor) -> Tensor:
    """The upper triangle of ``rowsᵀ rows`` (``rows`` is ``N×d``; the strict lower triangle is
    unspecified), in ``rows``' dtype. The columns are split into ``k`` blocks (``k`` = 1 for ``d`` < 512,
    2 below 1024, else 4) and only the ``k(k+1)/2`` blocks on and above the diagonal are multiplied:
    ``(k+1)/2k`` of the full product's flops (5/8 at ``k = 4``), by torch's own GEMM and threads. (BLAS
    ``syrk`` from another library halves the flops but its thread pool fights torch's for the cores
    between the forward's matmuls: on 2 cores it slowed the forward passes around it more than it saved.)"""
    d = rows.shape[1]
    k = 1 if d < 512 else 2 if d < 1024 else 4
    if k == 1:
        return rows.T @ rows
    h = -(-d // k)
    out = rows.new_empty(d, d)
    cols = rows.split(h, dim=1)
    for i, a in enumerate(cols):
        for j in range(i, len(cols)):
            out[i * h:i * h + a.shape[1], j * h:j * h + cols[j].shape[1]] = a.T @ cols[j]
    return out


def accumulate_gram(sums: dict[str, Tensor], key: str, rows: Tensor) -> None:
    """Add the upper triangle of ``rowsᵀ rows`` (``upper_gram``, in ``rows``' dtype) to the float64 sum
    ``sums[key]`` (created on first use)."""
    gram = upper_gram(rows)
    if key in sums:
        sums[key] += gram
    else:
        sums[key] = gram.double()


def mirror_grams(sums: dict[str, Tensor]) -> None:
    """Complete each sum of ``accumulate_gram`` (upper triangles) to the symmetric matrix, in place."""
    for key, acc in sums.items():
        sums[key] = acc.triu() + acc.triu(1).T


class InputMoments:
    """``with InputMoments(layers) as m: <forward passes>``; then ``m.moment(name)`` is ``Σ x xᵀ`` (float64,
    ``in×in``) over every input row the layer ``name`` saw, and ``m.rows(name)`` the number of rows
    (the moments are complete once the ``with`` block has ended).

    ``projected`` names layers (wide ones, ``out < in``) whose moment is kept in projected form instead,
    ``W C Wᵀ = Σ y yᵀ`` of their outputs without bias and ``tr C`` (``tsvd.whitening.ProjectedMoment``,
    what their whitened SVD reads): ``out²`` per row instead of ``in²``, from the output the forward
    computes anyway (a forward hook). Such a layer shares no statistic."""

    def __init__(self, layers: dict[str, nn.Linear], projected: Collection[str] = ()) -> None:
        self.layers = layers
        self.projected = set(projected)
        self._sums: dict[str, Tensor] = {}  # one per distinct input: keyed by the first layer that saw it
        self._rows: dict[str, int] = {}
        self._traces: dict[str, float] = {}  # projected layers: Σ ‖x‖²
        self._owner: dict[str, str] = {}  # layer name -> key of its statistic
        self._last: tuple[Tensor, str] | None = None
        self._fed: list[str] = []  # the layers fed in the current batch, in order
        self.order: list[str] = []  # ... in the last batch ended by ``end_batch``
        self._handles: list = []
        self.seconds = 0.0  # spent in the hooks: the statistics' own cost within the forward passes

    def __enter__(self) -> "InputMoments":
        for name, layer in self.layers.items():
            if name in self.projected:
                self._handles.append(layer.register_forward_hook(self._output_hook(name)))
            else:
                self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None
        mirror_grams(self._sums)

    def _add(self, key: str, rows: Tensor) -> None:
        accumulate_gram(self._sums, key, rows)
        self._rows[key] = self._rows.get(key, 0) + rows.shape[0]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # the object itself: layers fed the same tensor receive the same object
            self._fed.append(name)
            shared = self._last is not None and self._last[0] is x
            key = self._owner.setdefault(name, self._last[1] if shared else name)
            if shared and key == self._last[1]:
                return
            if key != name:
                raise RuntimeError(f"calibration: {name} shared the input of {key} in an earlier batch but not now")
            t0 = time.perf_counter()
            self._add(key, x.detach().reshape(-1, x.shape[-1]))
            self._last = (x, key)
            self.seconds += time.perf_counter() - t0
        return hook

    def _output_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            self._fed.append(name)
            self._owner[name] = name
            t0 = time.perf_counter()
            y = out.detach() if module.bias is None else out.detach() - module.bias.detach()
            self._add(name, y.reshape(-1, y.shape[-1]))
            self._traces[name] = self._traces.get(name, 0.0) + float(args[0].detach().square().sum(dtype=torch.float64))
            self.seconds += time.perf_counter() - t0
        return hook

    def end_batch(self) -> None:
        """Forget the last input (call after each forward pass, so it can be freed)."""
        self._last = None
        self.order, self._fed = self._fed, []

    def final_layer(self) -> str | None:
        """The layer fed last in the last batch, if that batch fed every layer exactly once: a later pass
        over a batch of the same kind has nothing left to measure once that layer has its input."""
        if sorted(self.order) != sorted(self.layers):
            return None
        return self.order[-1]

    def moment(self, name: str) -> Tensor | ProjectedMoment:
        if name not in self._owner:
            raise UserError(f"calibration: layer {name} saw no input (is it used in the model's forward?)")
        if name in self.projected:
            return ProjectedMoment(self._sums[name], self._traces[name], self.layers[name].in_features)
        return self._sums[self._owner[name]]

    def rows(self, name: str) -> int:
        return self._rows[self._owner[name]] if name in self._owner else 0

    def shared_with(self, name: str) -> str:
        """The layer whose statistic ``name`` shares (itself if none)."""
        return self._owner[name]


class OutputGradientMoments:
    """``with OutputGradientMoments(layers) as m:`` then, per batch, ``m.add(loss_fn(model, batch))``;
    afterwards ``m.moment(name)`` is ``Σ g gᵀ`` (float64, ``out×out``) over the gradients
    ``g = ∂loss/∂y`` of every output row of layer ``name``: the (empirical Fisher) curvature of the loss
    in the layer's output space (the products are formed as upper triangles, like ``InputMoments``).

    ``add`` asks autograd for the gradients of the layers' outputs only (``torch.autograd.grad``), so no
    parameter gradient is formed or stored: the backward pass skips the weight-gradient products and
    stops below the first target layer.

    ``projected`` names layers (tall ones, ``out > in``) whose moment is kept in projected form instead,
    ``Wᵀ G W = Σ (Wᵀg)(Wᵀg)ᵀ`` and ``tr G`` (``tsvd.whitening.ProjectedMoment``, what their curvature-
    weighted SVD reads): ``in²`` per row to store and accumulate instead of ``out²``."""

    def __init__(self, layers: dict[str, nn.Linear], projected: Collection[str] = ()) -> None:
        self.layers = layers
        self.projected = set(projected)
        self._sums: dict[str, Tensor] = {}
        self._traces: dict[str, float] = {}  # projected layers: Σ ‖g‖²
        self._outputs: list[tuple[str, Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> "OutputGradientMoments":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()
        mirror_grams(self._sums)

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if out.requires_grad:
                self._outputs.append((name, out))
        return hook

    def add(self, loss: Tensor) -> None:
        """Accumulate the output gradients of ``loss`` for the outputs recorded since the last call."""
        outputs, self._outputs = self._outputs, []
        if not outputs:
            return
        grads = torch.autograd.grad(loss, [o for _, o in outputs], allow_unused=True)
        for (name, _), g in zip(outputs, grads):
            if g is None:
                continue
            rows = g.detach().reshape(-1, g.shape[-1])
            if name in self.projected:
                self._traces[name] = self._traces.get(name, 0.0) + float(rows.square().sum(dtype=torch.float64))
                rows = rows @ self.layers[name].weight.detach()  # Wᵀg per row: N×in
            accumulate_gram(self._sums, name, rows)

    def moment(self, name: str) -> Tensor | ProjectedMoment:
        if name not in self._sums:
            raise UserError(f"calibration: layer {name} received no gradient (is it used in the loss?)")
        if name in self.projected:
            return ProjectedMoment(self._sums[name], self._traces[name], self.layers[name].out_features)
        return self._sums[name]


def collect_output_gradients(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[Tensor],
                             loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss,
                             after_batch: Callable[[], None] | None = None,
                             projected: Collection[str] = ()) -> OutputGradientMoments:
    """Forward ``loss_fn(model, batch)`` over the batches and backward to the layers' outputs only
    (``OutputGradientMoments.add``: no parameter gradients; the weights are not changed); ``after_batch``
    is called after each (other hooks, e.g. an ``InputMoments``, may share the forward passes);
    ``projected``: as in ``OutputGradientMoments``."""
    with OutputGradientMoments(layers, projected) as moments, torch.enable_grad():
        for batch in batches:
            moments.add(loss_fn(model, batch))
            if after_batch is not None:
                after_batch()
    return moments


@torch.no_grad()
def moment_passes(model: nn.Module, moments: InputMoments, batches: Sequence[Tensor],
                  loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss,
                  log: Callable[[str], None] | None = None) -> None:
    """Run ``loss_fn(model, batch)`` over the batches for ``moments`` (entered). Once a whole pass has shown
    which target layer is fed last (``InputMoments.final_layer``) every pass ends right after that
    layer: the rest of the model — a causal LM's final norm, output head and loss — adds nothing to the
    statistics. This assumes the forward feeds the target layers in the same order every pass (true of
    a transformer's stack of blocks); a pass that feeds some layer twice or not at all switches the
    stopping off for the next. ``log`` receives a progress line per batch."""
    t0 = time.perf_counter()
    for k, batch in enumerate(batches):
        last = moments.final_layer()
        handle = None if last is None else moments.layers[last].register_forward_hook(stop_forward)
        try:
            stopped_passes(model, [batch], loss_fn, moments.end_batch)
        finally:
            if handle is not None:
                handle.remove()
        if log is not None:
            log(f"  calibration batch {k + 1}/{len(batches)}: {time.perf_counter() - t0:.1f} s "
                f"({moments.seconds:.1f} s in the statistics)")


def collect_moments(model: nn.Module, layers: dict[str, nn.Linear], batches: Sequence[Tensor],
                    loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss,
                    log: Callable[[str], None] | None = None) -> InputMoments:
    """The layers' input moments over the calibration batches (``moment_passes``)."""
    with InputMoments(layers) as moments:
        moment_passes(model, moments, batches, loss_fn, log)
    return moments


def forward_stages(model: nn.Module, layers: dict[str, nn.Linear], batch: Tensor,
                   loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss) -> list[list[str]]:
    """The ``layers`` in the order one forward pass ``loss_fn(model, batch)`` first feeds them, grouped into
    stages: consecutive layers fed the same tensor (a Llama block's ``q/k/v``, ``gate/up``) form one
    stage, every other layer its own. Layers the pass never feeds are left out."""
    order: list[tuple[str, Tensor]] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in {n for n, _ in order}:
                order.append((name, args[0]))
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for k, (name, x) in enumerate(order):
        if k > 0 and x is order[k - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


@torch.no_grad()
def stage_moments(model: nn.Module, stage: dict[str, nn.Linear], batches: Iterable[Tensor],
                  loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss) -> InputMoments:
    """Input moments of one stage's layers (``forward_stages``; the dict in forward order) over the
    batches. Each pass stops when the stage's last layer receives its input: the rest of the model is
    not run (so a layer fed more than once per pass is measured on its first input only)."""
    with InputMoments(stage) as moments:
        handle = list(stage.values())[-1].register_forward_pre_hook(stop_forward)  # runs after the moment hook
        try:
            stopped_passes(model, batches, loss_fn, moments.end_batch)
        finally:
            handle.remove()
    return moments
