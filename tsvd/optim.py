"""Optimizer construction: AdamW with separate hyper-parameters per parameter kind, and the LR schedule.

SCT found per-component learning rates matter, so parameters fall in four groups:
``factors`` (spectral ``U``, ``V``), ``cores`` (spectral ``s``), ``dense`` (matrices: dense
projections, embeddings) and ``no_decay`` (norm weights, biases). Every group carries its
``base_lr``; the schedule sets ``lr = base_lr · lr_multiplier(step)``.

Memory: ``build_adamw`` is torch's fused AdamW (one in-place kernel per tensor, no full-size
temporaries).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tsvd.config import TrainConfig
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
    temporaries (foreach AdamW allocates them every step; docs/performance.md)."""
    return torch.device(device).type in ("cpu", "cuda")


def build_adamw(model: nn.Module, t: TrainConfig, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``param_groups`` — fused where available (in place, bandwidth-bound).

    Parameters must stay row-major contiguous (the retraction writes them that way): fused AdamW is
    slower on column-major tensors."""
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
