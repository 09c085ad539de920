"""``spectralize``: one-line conversion of any ``nn.Module``'s ``nn.Linear`` layers to spectral layers.

Pretrained weights become truncated-SVD factors. Per layer (``rank=``, ``energy=``) or for the whole set
(``params_ratio=``, ``budget=``); by the weight's own SVD, or, with ``calibration=``, by the
activation-aware SVD that is optimal on the calibration inputs (``tsvd.whitening``), or, for a global
size, the SVD that is optimal for the model's loss to second order (both sides whitened: inputs and
output curvature) with ranks allocated across layers by that loss (``tsvd.allocation.greedy_ranks``).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from tsvd.allocation import budget_spent, greedy_ranks, rank_cost, ratio_budget, uniform_ranks
from tsvd.block_replay import block_index, block_inputs, find_blocks, run_block
from tsvd.calibration import (InputMoments, collect_output_gradients, forward_stages, moment_passes,
                              next_token_loss, stage_moments)
from tsvd.errors import UserError
from tsvd.sizes import check_size
from tsvd.spectral import INITS, SpectralLinear, check_rank
from tsvd.whitening import DAMPING, SHRINKAGE, ProjectedMoment, WhitenedSVD, whitened_svd


@dataclass(frozen=True)
class LayerReport:
    """One converted layer: ``retained_energy`` is ``Σ kept sᵢ² / ‖W‖_F²`` (1.0 for fresh layers); for a
    calibrated conversion, the kept fraction of the layer's output energy on the calibration inputs
    (``Σ kept σᵢ² / ‖W X‖_F²`` of the whitened SVD; curvature-weighted, of ``tr(W C Wᵀ G̃)``)."""

    name: str
    in_features: int
    out_features: int
    rank: int
    retained_energy: float

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def spectral_params(self) -> int:
        return self.rank * (self.in_features + self.out_features + 1)

    @property
    def compression(self) -> float:
        return self.dense_params / self.spectral_params


def format_report(rows: Sequence[LayerReport]) -> str:
    """A fixed-width table of a conversion report, with a total line."""
    lines = [f"{'layer':<40} {'shape':>13} {'rank':>6} {'energy':>8} {'compress':>9}"]
    for r in rows:
        lines.append(f"{r.name:<40} {f'{r.out_features}x{r.in_features}':>13} {r.rank:>6} "
                     f"{r.retained_energy:>8.4f} {r.compression:>8.1f}x")
    dense, spec = sum(r.dense_params for r in rows), sum(r.spectral_params for r in rows)
    if rows:
        lines.append(f"{'total':<40} {'':>13} {'':>6} {'':>8} {dense / spec:>8.1f}x  "
                     f"({dense:,} -> {spec:,} params)")
    return "\n".join(lines)


def matches_glob(name: str, patterns: Sequence[str]) -> bool:
    """Does the module name match one of the globs (``fnmatch``, case-sensitive)? The rule of ``targets``
    and ``exclude``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def spectralize(
    model: nn.Module,
    targets: Sequence[str] | str = ("*",),
    rank: int | None = None,
    energy: float | None = None,
    init: str | None = None,
    exclude: Sequence[str] | str = (),
    *,
    params_ratio: float | None = None,
    budget: int | None = None,
    calibration: Sequence[Tensor] | None = None,
    allocation: str | None = None,
    gradient_batches: int = 1,
    sequential: bool = False,
    loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss,
    damping: float = DAMPING,
    shrinkage: float = SHRINKAGE,
    log: Callable[[str], None] | None = None,
) -> list[LayerReport]:
    """Replace every ``nn.Linear`` whose qualified name matches a glob in ``targets`` (and none in
    ``exclude``) by a ``SpectralLinear``, in place; returns a per-layer report.

    Exactly one size: ``rank`` (every layer, capped at ``min(in, out)``), ``energy`` (per layer, the
    smallest rank keeping that fraction of ``Σ sᵢ²``), ``params_ratio`` (the targeted layers' factors
    hold this fraction of their dense parameters, in (0, 1]) or ``budget`` (that many parameters).

    ``init=None`` converts the existing (pretrained) weights. Without ``calibration`` by the weight's
    truncated SVD; ``params_ratio``/``budget`` then give every layer the same fraction. With
    ``calibration`` — batches passed as ``loss_fn(model, batch)`` (default: token windows ``(B, T+1)``
    of a causal LM, ``tsvd.calibration.next_token_loss``) — by the activation-aware SVD optimal on the
    calibration inputs. ``allocation="loss"`` (the default there) weighs each layer's output errors by
    the curvature of the model's loss too (a backward pass over the first ``gradient_batches`` calibration
    batches, ``calibration_statistics``; shrunk by ``shrinkage``, ``tsvd.whitening``)
    and spends the budget on the directions of every layer with the largest estimated loss per
    parameter; ``allocation="uniform"`` keeps the same fraction per layer, input whitening only.
    ``sequential=True`` (with ``calibration``) then factors the layers stage by stage in forward order,
    each on the inputs produced by the already-converted layers before it (``sequential_factors``; the
    ranks stay those chosen above, from the unconverted model).
    ``init="scaled"`` / ``"sct"`` builds fresh spectral layers at ``rank`` instead. Models on the
    ``meta`` device get fresh meta layers (sizing without allocation; needs ``rank``).
    ``log`` receives a progress line per layer.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    check_size(rank=rank, energy=energy, params_ratio=params_ratio, budget=budget)
    if init is not None and rank is None:
        raise UserError("spectralize: init= builds fresh layers at rank=; it cannot be combined with init=None's "
                        "sizes (energy=, params_ratio=, budget=)")
    if init is not None and init not in INITS:
        raise UserError(f"spectralize: init must be one of {INITS} or None, got {init!r}")
    if calibration is not None and (init is not None or energy is not None):
        raise UserError("spectralize: calibration= converts pretrained weights at rank=, params_ratio= or budget=; "
                        "it cannot be combined with energy= or init=")
    allocation = allocation or ("loss" if calibration is not None and rank is None else "uniform")
    if allocation not in ("loss", "uniform"):
        raise UserError(f"spectralize: allocation must be 'loss' or 'uniform', got {allocation!r}")
    if allocation == "loss" and (calibration is None or rank is not None):
        raise UserError("spectralize: allocation='loss' needs calibration= and params_ratio= or budget=")
    if sequential and calibration is None:
        raise UserError("spectralize: sequential=True needs calibration=")
    if calibration is not None and len(calibration) == 0:
        raise UserError("spectralize: calibration has no batches")
    if not 0.0 <= shrinkage <= 1.0:
        raise UserError(f"spectralize: shrinkage must be in [0, 1], got {shrinkage}")
    if allocation == "loss" and not 1 <= gradient_batches <= len(calibration):
        raise UserError(f"spectralize: gradient_batches must be in [1, {len(calibration)}] (the calibration "
                        f"batches), got {gradient_batches}")

    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and matches_glob(n, targets) and not matches_glob(n, exclude)]
    if any(name == "" for name, _ in chosen):
        raise UserError("spectralize: the model itself is an nn.Linear and cannot be replaced in place; "
                        "use SpectralLinear.from_linear(layer, ...) instead")
    if not chosen:
        raise UserError(f"spectralize: no nn.Linear matches targets={targets} (exclude={exclude})")
    meta = [n for n, m in chosen if m.weight.device.type == "meta"]
    if meta and (rank is None or calibration is not None):
        raise UserError(f"spectralize: {meta[0]} is on the meta device; energy=, params_ratio=, budget= and "
                        "calibration= need real weights, use rank=")
    shapes = {n: tuple(m.weight.shape) for n, m in chosen}
    ranks = None
    if params_ratio is not None or budget is not None:
        ratio = params_ratio if params_ratio is not None else budget / sum(o * i for o, i in shapes.values())
        if ratio > 1.0:
            raise UserError(f"spectralize: budget {budget:,} exceeds the targeted layers' dense parameters "
                            f"({sum(o * i for o, i in shapes.values()):,})")
        ranks = uniform_ranks(shapes, ratio)
        if allocation == "loss":
            budget = budget if budget is not None else ratio_budget(shapes, ratio)
    if calibration is not None:
        layers = dict(chosen)
        if ranks is None:
            ranks = {n: min(rank, *shapes[n]) for n in layers}
        if sequential and allocation == "uniform":  # the ranks need no pass over the unconverted model
            return sequential_factors(model, layers, calibration, ranks, loss_fn, damping, log)
        moments, curvatures = calibration_statistics(model, layers, calibration, loss_fn,
                                                     gradient_batches if allocation == "loss" else 0, log)
        whitened = calibrated_svds(layers, moments, curvatures, damping, shrinkage, log)
        if allocation == "loss":
            ranks = loss_ranks(whitened, {n: rank_cost(m.in_features, m.out_features) for n, m in layers.items()},
                               budget, log)
        if sequential:
            return sequential_factors(model, layers, calibration, ranks, loss_fn, damping, log,
                                      curvatures=curvatures, shrinkage=shrinkage)
        return replace_with_factors(model, layers, whitened, ranks, log)

    report: list[LayerReport] = []
    for name, lin in chosen:
        out_f, in_f = lin.weight.shape
        if init is not None or lin.weight.device.type == "meta":
            k = check_rank(rank, in_f, out_f, f"rank for {name}")
            new = SpectralLinear(in_f, out_f, k, bias=lin.bias is not None, init=init or "scaled",
                                 device=lin.weight.device, dtype=lin.weight.dtype)
            kept = 1.0
        else:
            k = ranks[name] if ranks is not None else None if rank is None else min(rank, in_f, out_f)
            new = SpectralLinear.from_linear(lin, rank=k, energy=energy)
            total = float(lin.weight.detach().double().square().sum())
            kept = 1.0 if total == 0.0 else float(new.s.detach().double().square().sum()) / total
        _set_submodule(model, name, new)
        report.append(LayerReport(name, in_f, out_f, new.rank, kept))
        if log is not None:
            log(f"  {name}: rank {new.rank}, energy {kept:.4f}")
    return report


def calibration_statistics(model: nn.Module, layers: dict[str, nn.Linear], calibration: Sequence[Tensor],
                           loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss,
                           gradient_batches: int = 0, log: Callable[[str], None] | None = None
                           ) -> tuple[InputMoments, dict[str, Tensor | ProjectedMoment] | None]:
    """``(input moments, output-gradient moments or None)`` of the layers from one pass over the
    calibration batches. The first ``gradient_batches`` also go backward to the layers' outputs
    (``tsvd.calibration.collect_output_gradients``: each layer's ``G = Σ g gᵀ``, ``out×out``, float64),
    their forward passes feeding the input moments too; the rest run without gradients, each ended at
    the last target layer (``tsvd.calibration.moment_passes``). Wide layers (``out < in``) keep their
    moment in projected form, tall layers (``out > in``) their output-gradient moment
    (``tsvd.whitening.ProjectedMoment``): every statistic is then ``min(in, out)²``."""
    t0 = time.perf_counter()
    curvatures = None
    wide = [n for n, m in layers.items() if m.out_features < m.in_features]
    tall = [n for n, m in layers.items() if m.out_features > m.in_features]
    with InputMoments(layers, projected=wide) as moments:
        if gradient_batches > 0:
            grads = collect_output_gradients(model, layers, calibration[:gradient_batches], loss_fn,
                                             after_batch=moments.end_batch, projected=tall)
            curvatures = {n: grads.moment(n) for n in layers}
            if log is not None:
                log(f"output curvature: {gradient_batches} backward passes, {time.perf_counter() - t0:.1f} s")
        moment_passes(model, moments, calibration[gradient_batches:], loss_fn, log)
    if log is not None:
        log(f"calibration: {len(calibration)} batches through the model in {time.perf_counter() - t0:.1f} s")
    return moments, curvatures


@torch.no_grad()
def calibrated_svds(layers: dict[str, nn.Linear], moments: InputMoments,
                    curvatures: dict[str, Tensor | ProjectedMoment] | None = None,
                    damping: float = DAMPING, shrinkage: float = SHRINKAGE,
                    log: Callable[[str], None] | None = None) -> dict[str, WhitenedSVD]:
    """Each layer's whitened SVD (``tsvd.whitening``) from its input moment; curvature-weighted where
    ``curvatures`` gives the layer's output-gradient moment."""
    curvature = curvatures or {}
    out: dict[str, WhitenedSVD] = {}
    for k, (name, layer) in enumerate(layers.items()):
        t1 = time.perf_counter()
        out[name] = whitened_svd(layer.weight, moments.moment(name), damping, curvature.get(name), shrinkage)
        if log is not None:
            log(f"  whitened SVD {k + 1}/{len(layers)} {name} ({moments.rows(name):,} input rows, "
                f"{time.perf_counter() - t1:.1f} s)")
    return out


def sequential_factors(model: nn.Module, layers: dict[str, nn.Linear], calibration: Sequence[Tensor],
                       ranks: dict[str, int], loss_fn: Callable[[nn.Module, Tensor], Tensor] = next_token_loss,
                       damping: float = DAMPING, log: Callable[[str], None] | None = None,
                       curvatures: dict[str, Tensor | ProjectedMoment] | None = None,
                       shrinkage: float = SHRINKAGE) -> list[LayerReport]:
    """Replace the layers by whitened rank-``ranks[name]`` factors one stage at a time, in forward order
    (``tsvd.calibration.forward_stages``): each stage's input moments are measured on the model with
    every earlier stage already replaced, so a layer's factors are optimal for the inputs the truncated
    model gives it. When every layer lies in a block of one ``nn.ModuleList`` (a decoder's layers) the
    blocks' inputs are cached for the calibration batches and each stage replays only its own block
    (``tsvd.block_replay``; memory: the batches' hidden states, time: a few full passes); otherwise each
    stage costs one calibration pass, cut short at the stage (memory: one stage's statistics).
    ``curvatures`` (each layer's output-gradient moment, from the dense model) weighs the output errors as
    in ``calibrated_svds``. The report is in forward order; layers the forward pass never feeds are refused."""
    if len(calibration) == 0:
        raise UserError("spectralize: calibration has no batches")
    stages = forward_stages(model, layers, calibration[0], loss_fn)
    missing = set(layers) - {n for stage in stages for n in stage}
    if missing:
        raise UserError(f"calibration: layer {sorted(missing)[0]} saw no input (is it used in the model's forward?)")
    blocks = find_blocks(model, layers)
    if blocks is not None and any(len({block_index(blocks[0], n) for n in stage}) > 1 for stage in stages):
        blocks = None  # a stage spans two blocks: no replay
    report: list[LayerReport] = []
    t0 = time.perf_counter()

    def fit(k: int, stage: list[str], whiten: Callable[[dict[str, nn.Linear]], dict[str, WhitenedSVD]]) -> None:
        part = {n: layers[n] for n in stage}
        report.extend(replace_with_factors(model, part, whiten(part), {n: ranks[n] for n in stage}, log))
        if log is not None:
            log(f"sequential stage {k + 1}/{len(stages)} ({', '.join(stage)}): {time.perf_counter() - t0:.1f} s")

    def own_targets(moments: InputMoments, part: dict[str, nn.Linear]) -> dict[str, WhitenedSVD]:
        return {n: whitened_svd(lin.weight, moments.moment(n), damping, (curvatures or {}).get(n), shrinkage)
                for n, lin in part.items()}

    if blocks is None:
        for k, stage in enumerate(stages):
            fit(k, stage, lambda part: own_targets(stage_moments(model, part, calibration, loss_fn), part))
        return report
    list_name, block_list = blocks
    inputs = block_inputs(model, block_list[0], calibration, loss_fn)
    last = max(block_index(list_name, stage[0]) for stage in stages)
    for b in range(last + 1):
        for k, stage in enumerate(stages):
            if block_index(list_name, stage[0]) == b:
                fit(k, stage, lambda part: own_targets(block_moments(block_list[b], inputs, part), part))
        if b < last:
            inputs = run_block(block_list[b], inputs)
    return report


def block_moments(block: nn.Module, inputs: list, part: dict[str, nn.Linear]) -> InputMoments:
    """Input moments of ``part``'s layers (in forward order, all inside ``block``) from replays of the
    block on its cached inputs, each stopped at the last layer."""
    with InputMoments(part) as moments:
        run_block(block, inputs, stop_at=list(part.values())[-1], after_batch=moments.end_batch)
    return moments


def loss_ranks(whitened: dict[str, WhitenedSVD], costs: dict[str, int], budget: int,
               log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Ranks keeping the directions of largest estimated loss per parameter across all layers: for
    curvature-weighted SVDs each ``σᵢ²`` is that loss (``tsvd.allocation.greedy_ranks``)."""
    ranks = greedy_ranks({n: w.direction_loss() for n, w in whitened.items()}, costs, budget)
    if log is not None:
        log(f"loss-aware ranks {min(ranks.values())}-{max(ranks.values())}, {budget_spent(ranks, costs):,} of "
            f"{budget:,} parameters")
    return ranks


@torch.no_grad()
def replace_with_factors(model: nn.Module, layers: dict[str, nn.Linear], whitened: dict[str, WhitenedSVD],
                         ranks: dict[str, int], log: Callable[[str], None] | None = None) -> list[LayerReport]:
    """Replace each layer by a ``SpectralLinear`` holding its whitened rank-``ranks[name]`` factors."""
    report = []
    for name, lin in layers.items():
        w, k = whitened[name], ranks[name]
        U, s, V = w.factors(k)
        new = SpectralLinear(lin.in_features, lin.out_features, k, bias=lin.bias is not None, device="meta")
        dtype, device = lin.weight.dtype, lin.weight.device
        new.U, new.s, new.V = (nn.Parameter(t.to(device=device, dtype=dtype).contiguous()) for t in (U, s, V))
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().clone())
        _set_submodule(model, name, new)
        total = float(w.direction_loss().sum())
        kept = 1.0 if total == 0.0 else 1.0 - w.truncation_loss(k) / total
        report.append(LayerReport(name, lin.in_features, lin.out_features, k, kept))
        if log is not None:
            log(f"  {name}: rank {k}, calibration output energy kept {kept:.4f}")
    return report


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def densify(model: nn.Module) -> int:
    """Replace every ``SpectralLinear`` by its dense ``nn.Linear`` in place (export only); returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    return len(names)
