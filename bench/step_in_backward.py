"""Fused AdamW applied block by block *during* backward, for the 70B-architecture benchmark
(``bench/llama70b_step.py``, path ``tsvd``): each block is updated as soon as its gradients are complete
and they are freed at once, so all gradients never coexist. A benchmark helper, not part of the engine:
it cannot clip by the global gradient norm or skip a step on a non-finite gradient (see the limits below).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from tsvd.config import TrainConfig
from tsvd.optim import build_adamw, set_lr
from tsvd.retraction import RetractionReport, Retractor


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """Natural update units of a model: its direct children, with ``ModuleList``/``Sequential``
    children expanded (for ``tsvd.model``: ``tok_emb``, each of ``layers``, ``norm``, ``lm_head``)."""
    blocks: list[nn.Module] = []
    for child in model.children():
        blocks.extend(child.children() if isinstance(child, (nn.ModuleList, nn.Sequential)) else [child])
    return blocks


@dataclass
class _Unit:
    """One block's parameters and its AdamW; ``pending``: gradients still to come this backward."""

    params: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    pending: int = 0


class StepInBackward:
    """AdamW applied block by block *during* ``loss.backward()``; the retraction follows in ``finish()``.

    Each block (default ``model_blocks(model)``; blocks must partition the trainable parameters) gets
    its own fused AdamW over ``param_groups(block, t)``. When the last gradient of a block has been
    accumulated, the block is updated and its gradients are freed at once. This is safe: autograd
    accumulates a leaf's gradient only after every node using that leaf has run, so no pending
    backward node reads the updated weights. ``finish()`` then steps any block that got only part of
    its gradients and retracts every factor with one model-level ``Retractor`` (``self.retractor``:
    same cache names as the engines'). The result equals ``backward(); opt.step(); retract()`` with one
    AdamW over the whole model (same per-parameter arithmetic), but only one block's gradients ever
    exist, and gradients are not re-faulted in bulk every step (the peak it saves at the 70B
    architecture: ``bench/llama70b_step.py``, docs/performance.md).

    Limits (use the ordinary engine step for these): one ``backward`` per optimizer step (no gradient
    accumulation), no clipping by the global gradient norm, no "skip the step on a non-finite
    gradient" — a block is updated before the other blocks' gradients exist.
    """

    def __init__(self, model: nn.Module, t: TrainConfig, device: torch.device | str = "cpu",
                 retraction: str | None = "cholesky", lazy_tol: float | None = None,
                 blocks: list[nn.Module] | None = None) -> None:
        blocks = model_blocks(model) if blocks is None else blocks
        owner: dict[int, int] = {}
        self.units: list[_Unit] = []
        for blk in blocks:
            params = [p for p in blk.parameters() if p.requires_grad]
            if not params:
                continue
            for p in params:
                if id(p) in owner:
                    raise ValueError("StepInBackward: blocks overlap (a parameter is in two blocks)")
                owner[id(p)] = len(self.units)
            self.units.append(_Unit(params, build_adamw(blk, t, device), len(params)))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
        if missing:
            raise ValueError(f"StepInBackward: blocks do not cover {missing[:3]}{'…' if len(missing) > 3 else ''}")
        self.retractor = Retractor(model, retraction, lazy_tol, every=t.retract_every, stack=True) if retraction else None
        self.optimizer_seconds = 0.0  # time spent in the blocks' AdamW steps (inside backward)
        self._handles = [p.register_post_accumulate_grad_hook(partial(self._on_grad, unit))
                         for unit in self.units for p in unit.params]

    @property
    def optimizers(self) -> list[torch.optim.AdamW]:
        return [u.optimizer for u in self.units]

    def set_lr(self, multiplier: float) -> None:
        for unit in self.units:
            set_lr(unit.optimizer, multiplier)

    def _on_grad(self, unit: _Unit, _param: nn.Parameter) -> None:
        unit.pending -= 1
        if unit.pending == 0:
            self._step(unit)

    def _step(self, unit: _Unit) -> None:
        t0 = time.perf_counter()
        unit.optimizer.step()
        for p in unit.params:
            p.grad = None
        unit.pending = len(unit.params)
        self.optimizer_seconds += time.perf_counter() - t0

    def finish(self, measure_error: bool = False) -> RetractionReport:
        """End the step after ``backward``: update the blocks that received only some of their
        gradients, then retract every spectral factor (an empty report without a retractor)."""
        for unit in self.units:
            if unit.pending != len(unit.params):
                self._step(unit)
        return self.retractor.after_step(measure_error=measure_error) if self.retractor else RetractionReport()

    def remove(self) -> None:
        """Detach the hooks (the model trains normally again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
