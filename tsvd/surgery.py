"""Apply a ``RankPlan``: resize spectral layers and their optimizer state, in place.

Shrink keeps the columns the plan names (``plan.keep``; by default the largest-``|s|`` directions,
``SpectralModule.truncate_``): ``W`` changes by exactly the dropped energy. Growth appends directions
orthonormal to the kept ones (``SpectralModule.grow_``) with ``s = 0`` — ``W`` and the loss are unchanged
at that moment — or, with ``plan.grow_init > 0`` and a sketch, with ``s`` one step against each new
pair's sketched core gradient (``grow_values``). Directions come from a ``GradientSketch`` when given,
else random (and start at ``s = 0``: no gradient to follow).

Optimizer state follows the columns: every per-element state tensor of ``U``, ``V``, ``s`` (Adam's
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's momentum — anything shaped like its parameter)
keeps the kept columns in the kept order, new columns start at zero, scalar state (Adam's ``step``)
is untouched. Parameters and state get fresh storage of the new size, so memory follows the rank;
``Parameter`` objects survive, so the optimizer's param groups stay valid (fused or not).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tsvd.controller import RankChange, RankPlan
from tsvd.errors import UserError
from tsvd.sketch import GradientSketch, random_directions
from tsvd.spectral import SpectralModule, check_rank
from tsvd.spectrum import energy


def resize_columns(t: Tensor, keep: Tensor, grow: int) -> Tensor:
    """``(..., r) → (..., len(keep) + grow)``: columns ``keep`` in that order, then ``grow`` zero columns
    (a new contiguous tensor; the old storage is released once unreferenced)."""
    out = t.index_select(-1, keep.to(t.device))
    if grow:
        out = torch.cat([out, out.new_zeros(*out.shape[:-1], grow)], dim=-1)
    return out.contiguous()


def resize_state_(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                  old_shapes: list[torch.Size], keep: Tensor, grow: int) -> None:
    """Resize every optimizer state tensor of ``params`` that had its parameter's old shape."""
    if optimizer is None:
        return
    for p, shape in zip(params, old_shapes):
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == shape:
                state[key] = resize_columns(value, keep, grow)


def grow_values(gain: Tensor, s: Tensor, grow_init: float) -> Tensor:
    """Initial ``s`` of new directions from their core gradients ``gain`` (``k``): against the gradient,
    the strongest at ``grow_init ×`` the layer's weakest current ``|s|``, the others in proportion to
    their gradient (zeros where there is no gradient, or no current direction to scale by)."""
    top = gain.abs().max() if gain.numel() else gain.new_zeros(())
    if grow_init <= 0 or s.numel() == 0 or top == 0 or not torch.isfinite(top):
        return torch.zeros_like(gain)
    return -grow_init * s.detach().abs().min().to(gain) * gain / top


@torch.no_grad()
def apply_plan(model: nn.Module, optimizer: torch.optim.Optimizer | None, plan: RankPlan,
               sketch: GradientSketch | None = None, seed: int = 0) -> list[RankChange]:
    """Resize the layers named in ``plan.ranks`` (and their optimizer state); returns what changed.

    Growth directions come from ``sketch`` when given, else are random, seeded by ``(seed, plan.step)``:
    a resumed or replayed plan regrows the same directions, on every engine. ``plan.before``, when
    present, must match the model's ranks (a replay onto a different model state is refused).
    """
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed * 1_000_003 + plan.step)
    changes: list[RankChange] = []
    for name, new in plan.ranks.items():
        mod = modules.get(name)
        if not isinstance(mod, SpectralModule):
            raise UserError(f"rank plan (step {plan.step}): {name!r} is not a spectral layer of this model")
        old = mod.rank
        if name in plan.before and plan.before[name] != old:
            raise UserError(f"rank plan (step {plan.step}): {name} has rank {old}, the plan was made for "
                            f"rank {plan.before[name]}")
        check_rank(new, mod.U.shape[0], mod.V.shape[0], f"planned rank for {name}")
        if new == old:
            continue
        params = [mod.U, mod.V, mod.s]
        shapes = [p.shape for p in params]
        before = energy(mod.s)
        if new < old:
            cols = plan.keep.get(name)
            if cols is not None and (len(cols) != new or sorted(set(cols)) != list(cols) or cols[-1] >= old or cols[0] < 0):
                raise UserError(f"rank plan (step {plan.step}): {name} keeps columns {cols}, expected {new} "
                                f"distinct ascending indices below {old}")
            keep, grow = mod.truncate_(torch.tensor(cols) if cols is not None else new), 0
        else:
            grow = new - old
            if sketch is not None:
                U_new, V_new, gain = sketch.pairs(name, grow)
            else:
                U_new, V_new = random_directions(mod.U, mod.V, grow, generator)
                gain = torch.zeros(grow)
            s_new = grow_values(gain, mod.s, plan.grow_init)
            mod.grow_(U_new, V_new)
            mod.s.data[old:] = s_new.to(mod.s)
            keep = torch.arange(old)
        resize_state_(optimizer, params, shapes, keep, grow)
        changes.append(RankChange(name, old, new, before, energy(mod.s)))
    return changes
