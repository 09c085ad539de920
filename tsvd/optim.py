"""Optimizer construction: AdamW with separate hyper-parameters per parameter kind, and the LR schedule.

SCT found per-component learning rates matter, so parameters fall in four groups:
``factors`` (spectral ``U``, ``V``), ``cores`` (spectral ``s``), ``dense`` (matrices: dense
projections, embeddings) and ``no_decay`` (norm weights, biases). Every group carries its
``base_lr``; the schedule sets ``lr = base_lr · lr_multiplier(step)``.

Memory: ``build_adamw`` is torch's fused AdamW (one in-place kernel per tensor, no full-size
temporaries). ``StepInBackward`` goes further for single-backward steps: it updates each block as soon
as its gradients are complete and frees them at once, so all gradients never coexist.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from tsvd.config import TrainConfig
from tsvd.retraction import RetractionReport, Retractor
from tsvd.spectral import SpectralModule


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict]:
    """AdamW parameter groups (empty groups dropped), each with ``name`` and ``base_lr``."""
    spectral_ids: dict[int, str] = {}
    for mod in model.modules():
        if isinstance(mod, SpectralModule):
            spectral_ids[id(mod.U)] = spectral_ids[id(mod.V)] = "factors"
            spectral_ids[id(mod.s)] = "cores"
    buckets: dict[str, list[nn.Parameter]] = {"factors": [], "cores": [], "dense": [], "no_decay": []}
    for p in model.parameters():
        if p.requires_grad:
            buckets[spectral_ids.get(id(p), "dense" if p.dim() >= 2 else "no_decay")].append(p)
    settings = {
        "factors": (t.spectral_lr, t.spectral_weight_decay),
        "cores": (t.core_lr, 0.0),
        "dense": (t.lr, t.weight_decay),
        "no_decay": (t.lr, 0.0),
    }
    return [
        {"name": name, "params": ps, "lr": settings[name][0], "base_lr": settings[name][0],
         "weight_decay": settings[name][1]}
        for name, ps in buckets.items() if ps
    ]


def fused_available(device: torch.device | str) -> bool:
    """Fused AdamW exists for CPU and CUDA in torch ≥ 2.4; it updates in place, with no full-size
    temporaries (foreach AdamW allocates them: +1.7 GB peak at 452M params)."""
    return torch.device(device).type in ("cpu", "cuda")


def build_adamw(model: nn.Module, t: TrainConfig, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``param_groups`` — fused where available (in place, bandwidth-bound).

    Parameters must stay row-major contiguous (the retraction writes them that way): fused AdamW is
    ~3× slower on column-major tensors."""
    return torch.optim.AdamW(param_groups(model, t), betas=tuple(t.betas), eps=t.eps,
                             fused=fused_available(device) or None)


def lr_multiplier(step: int, t: TrainConfig) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier


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
    exist: for Llama-3-70B at rank 32 the peak drops by the 1.7 GB of gradients, and gradients are not
    re-faulted in bulk every step.

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
        self.retractor = Retractor(model, retraction, lazy_tol) if retraction else None
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
        return self.retractor(measure_error=measure_error) if self.retractor else RetractionReport()

    def remove(self) -> None:
        """Detach the hooks (the model trains normally again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
