"""The DeepSpeed JSON (``engine.deepspeed_config``): read, checked against ``train.*`` and completed.

No DeepSpeed import here: ``tsvd.config.validate`` runs ``resolve_ds_config`` when a config is loaded,
so a bad JSON is a one-line error before any launcher or process group exists; the engine builds the
JSON it hands to ``deepspeed.initialize`` with the same function.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from tsvd.errors import UserError, read_document

if TYPE_CHECKING:
    from tsvd.config import Config

#: JSON sections that would take over what tsvd controls, and why.
REFUSED_SECTIONS = {
    "optimizer": "tsvd builds AdamW itself from train.* (per-component lr groups)",
    "scheduler": "the trainer sets the lr every step (train.warmup_steps, train.min_lr_ratio)",
    "fp16": "low-precision parameters hide the fp32 master from the retraction; use train.dtype=bfloat16 "
            "(torch autocast, as configs/ds/zero*-bf16.json)",
    "bf16": "low-precision parameters hide the fp32 master from the retraction; use train.dtype=bfloat16 "
            "(torch autocast, as configs/ds/zero*-bf16.json)",
}


def read_ds_config(path: str) -> dict:
    """The DeepSpeed JSON at ``path``, checked for sections tsvd must own. Errors name the file."""
    p = Path(path)
    raw = read_document(p, "JSON", f"engine.deepspeed_config: file not found: {p}")
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a JSON object at the top level")
    for key, why in REFUSED_SECTIONS.items():
        section = raw.get(key)
        precision = key in ("fp16", "bf16")
        if section is not None and (not precision or not isinstance(section, dict) or section.get("enabled", False)):
            raise UserError(f"{p}: remove {key!r}: {why}")
    return raw


def zero_stage(raw: dict, source: str = "DeepSpeed config") -> int:
    """``zero_optimization.stage`` (0 when absent), which must be 0, 1, 2 or 3."""
    section = raw.get("zero_optimization", {})
    if not isinstance(section, dict):
        raise UserError(f"{source}: zero_optimization must be a JSON object")
    stage = section.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def build_ds_config(raw: dict, cfg: Config, world_size: int, source: str = "DeepSpeed config") -> dict:
    """``raw`` with the keys tsvd owns filled from ``cfg``, whatever the file says:
    ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``,
    ``gradient_clipping``; and checked against ``train.dtype``.

    A global micro-batch of ``train.batch_size`` rows is split evenly over ``world_size`` ranks, and a
    step takes ``train.grad_accum`` micro-batches. Stage 0 clips in the engine (DeepSpeed neither
    reports the norm nor skips non-finite steps there), so DeepSpeed's own clipping is off.
    """
    t = cfg.train
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size: {t.batch_size} rows cannot be split evenly over {world_size} processes")
    out = copy.deepcopy(raw)
    stage = zero_stage(out, source)
    out.update(train_micro_batch_size_per_gpu=t.batch_size // world_size, gradient_accumulation_steps=t.grad_accum,
               train_batch_size=t.batch_size * t.grad_accum, gradient_clipping=t.grad_clip if stage > 0 else 0.0)
    out.setdefault("steps_per_print", 2**31 - 1)
    autocast = out.get("torch_autocast", {})
    if not isinstance(autocast, dict):
        raise UserError(f"{source}: torch_autocast must be a JSON object")
    enabled = bool(autocast.get("enabled", False))
    if enabled and autocast.get("dtype", "bfloat16") not in ("bfloat16", "torch.bfloat16"):
        raise UserError(f"{source}: torch_autocast.dtype must be bfloat16 (fp16 needs loss scaling tsvd does not do)")
    if enabled != (t.dtype == "bfloat16"):
        raise UserError(f"{source}: torch_autocast is {'on' if enabled else 'off'} but train.dtype is {t.dtype}; "
                        f"use configs/ds/zero{stage}{'-bf16' if t.dtype == 'bfloat16' else ''}.json")
    return out


def resolve_ds_config(cfg: Config, world_size: int) -> dict:
    """The JSON for ``deepspeed.initialize``: ``engine.deepspeed_config`` read, checked against the
    rest of ``cfg`` and completed for ``world_size`` processes (``build_ds_config``)."""
    source = cfg.engine.deepspeed_config
    return build_ds_config(read_ds_config(source), cfg, world_size, source)
