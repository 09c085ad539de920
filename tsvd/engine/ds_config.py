"""The DeepSpeed JSON (``engine.deepspeed_config``): read, checked against ``train.*`` and completed.

No DeepSpeed import here: ``tsvd.config.validate`` runs ``resolve_ds_config`` when a config is loaded,
so a bad JSON is a one-line error before any launcher or process group exists; the engine builds the
JSON it hands to ``deepspeed.initialize`` with the same function.

Precision. ``train.dtype`` is the dtype the model computes in; the JSON says how:

* no precision section: fp32 parameters and compute (``train.dtype: float32``);
* ``"bf16": {"enabled": true}``: DeepSpeed's native mixed precision — bf16 parameters and gradients,
  fp32 master weights in the optimizer (``train.dtype: bfloat16``; ``tsvd.engine.mixed_precision``);
* ``"fp16": {"enabled": true}``: the same with fp16 and DeepSpeed's loss scaling, at ZeRO 1–3 where the
  accelerator computes in fp16. ``train.dtype`` has no float16 (it names the single-device engine's
  autocast), so it stays ``float32``; the JSON alone selects fp16;
* ``"torch_autocast"`` (bf16): fp32 parameters, bf16 compute (``train.dtype: bfloat16``), as
  ``TorchEngine`` does.
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
}
#: Native low-precision sections (``bfloat16``: DeepSpeed's older spelling of ``bf16``) and their dtype.
NATIVE_PRECISION = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16"}
SECTION_OF = {"bfloat16": "bf16", "float16": "fp16"}
#: Keys of those sections that would keep the master weights or optimizer state in 16 bits, where the
#: retraction could not keep the factors orthonormal to fp32 accuracy.
LOW_PRECISION_MASTERS = ("bf16_master_weights_and_grads", "bf16_optimizer_states", "fp16_master_weights_and_grads")


def read_ds_config(path: str) -> dict:
    """The DeepSpeed JSON at ``path``, checked for sections tsvd must own. Errors name the file."""
    p = Path(path)
    raw = read_document(p, "JSON", f"engine.deepspeed_config: file not found: {p}")
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a JSON object at the top level")
    for key, why in REFUSED_SECTIONS.items():
        if raw.get(key) is not None:
            raise UserError(f"{p}: remove {key!r}: {why}")
    return raw


def native_precision(raw: dict, source: str = "DeepSpeed config") -> str | None:
    """The parameter dtype of DeepSpeed's native mixed precision (``"bfloat16"``, ``"float16"``), or
    ``None`` for fp32 parameters. Refuses two enabled sections and 16-bit master weights."""
    enabled = []
    for key, dtype in NATIVE_PRECISION.items():
        section = raw.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise UserError(f"{source}: {key} must be a JSON object")
        if section.get("enabled", False):
            enabled.append((key, dtype))
            for flag in LOW_PRECISION_MASTERS:
                if section.get(flag, False):
                    raise UserError(f"{source}: remove {key}.{flag}: the retraction needs fp32 master weights")
            if key != "fp16" and section.get("check_grad_overflow", True) is not True:
                raise UserError(f"{source}: {key}.check_grad_overflow must stay true: a non-finite gradient must "
                                f"skip the step on every rank")
    if len(enabled) > 1:
        raise UserError(f"{source}: {' and '.join(k for k, _ in enabled)} are both enabled; enable one")
    return enabled[0][1] if enabled else None


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
    ``gradient_clipping``; and checked against ``train.dtype`` (``check_precision``).

    A global micro-batch of ``train.batch_size`` rows is split evenly over ``world_size`` ranks, and a
    step takes ``train.grad_accum`` micro-batches. Stage 0 in fp32 clips in the engine (DeepSpeed neither
    reports the norm nor skips non-finite steps there), so DeepSpeed's own clipping is off; with native
    mixed precision DeepSpeed's optimizer does both at every stage.
    """
    t = cfg.train
    if t.batch_size % world_size:
        raise UserError(f"train.batch_size: {t.batch_size} rows cannot be split evenly over {world_size} processes")
    out = copy.deepcopy(raw)
    stage = zero_stage(out, source)
    native = check_precision(out, cfg, stage, source)
    engine_clips = stage == 0 and native is None
    out.update(train_micro_batch_size_per_gpu=t.batch_size // world_size, gradient_accumulation_steps=t.grad_accum,
               train_batch_size=t.batch_size * t.grad_accum, gradient_clipping=0.0 if engine_clips else t.grad_clip)
    out.setdefault("steps_per_print", 2**31 - 1)
    return out


def check_precision(raw: dict, cfg: Config, stage: int, source: str = "DeepSpeed config") -> str | None:
    """Check the JSON's precision against ``train.dtype`` (module docstring); returns ``native_precision``."""
    native = native_precision(raw, source)
    autocast = raw.get("torch_autocast", {})
    if not isinstance(autocast, dict):
        raise UserError(f"{source}: torch_autocast must be a JSON object")
    autocast_on = bool(autocast.get("enabled", False))
    if autocast_on and autocast.get("dtype", "bfloat16") not in ("bfloat16", "torch.bfloat16"):
        raise UserError(f"{source}: torch_autocast.dtype must be bfloat16 (for fp16 use DeepSpeed's \"fp16\" section, "
                        f"which scales the loss)")
    if autocast_on and native is not None:
        raise UserError(f"{source}: torch_autocast and {native} parameters are both on; use one "
                        f"(configs/ds/zero{stage}-bf16.json: bf16 parameters; zero{stage}-bf16-autocast.json: fp32)")
    if native == "float16" and stage == 0:
        raise UserError(f"{source}: fp16 needs ZeRO stage 1, 2 or 3: at stage 0 DeepSpeed 0.19.8 divides the "
                        f"gradients by a loss scale it never applied to the loss; use bf16 at stage 0")
    data_types = raw.get("data_types", {})
    if native is not None and stage < 2 and isinstance(data_types, dict) and "grad_accum_dtype" in data_types:
        raise UserError(f"{source}: remove data_types.grad_accum_dtype or use ZeRO stage 2 or 3: with {native} "
                        f"parameters at stage {stage} DeepSpeed hands the step to an optimizer tsvd does not drive")
    wanted = "bfloat16" if autocast_on or native == "bfloat16" else "float32"
    if cfg.train.dtype != wanted:
        mode = ("torch_autocast is on" if autocast_on else f"{SECTION_OF[native]} is on" if native
                else "no bf16, fp16 or torch_autocast section is on")
        fix = {"bfloat16": f"configs/ds/zero{stage}-bf16.json (or zero{stage}-bf16-autocast.json)",
               "float32": f"configs/ds/zero{stage}.json"}[cfg.train.dtype]
        raise UserError(f"{source}: {mode} but train.dtype is {cfg.train.dtype}; set train.dtype={wanted} or use {fix}")
    return native


def resolve_ds_config(cfg: Config, world_size: int) -> dict:
    """The JSON for ``deepspeed.initialize``: ``engine.deepspeed_config`` read, checked against the
    rest of ``cfg`` and completed for ``world_size`` processes (``build_ds_config``)."""
    source = cfg.engine.deepspeed_config
    return build_ds_config(read_ds_config(source), cfg, world_size, source)
