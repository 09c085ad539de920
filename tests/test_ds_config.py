"""The DeepSpeed JSON: checked and completed from ``train.*`` without DeepSpeed, and at config load time."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_common  # noqa: E402
from tsvd.engine.ds_config import (build_ds_config, native_precision, read_ds_config, resolve_ds_config,  # noqa: E402
                                   zero_stage)
from tsvd.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_fills_batch_and_clipping_and_refuses_conflicts(tmp_path):
    cfg = ds_common.make_config()
    raw = read_ds_config(str(REPO / "configs/ds/zero2.json"))
    out = build_ds_config(dict(raw, train_batch_size=999), cfg, world_size=2)
    batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    assert tuple(out[k] for k in batch_keys) == (2, 2, 8)
    assert out["gradient_clipping"] == cfg.train.grad_clip
    zero0 = read_ds_config(str(REPO / "configs/ds/zero0.json"))
    assert build_ds_config(zero0, cfg, 2)["gradient_clipping"] == 0.0
    with pytest.raises(UserError, match="cannot be split evenly"):
        build_ds_config(raw, cfg, world_size=3)
    with pytest.raises(UserError, match="torch_autocast is on but train.dtype is float32"):
        build_ds_config(read_ds_config(str(REPO / "configs/ds/zero2-bf16-autocast.json")), cfg, 2)
    for section in ({"optimizer": {"type": "AdamW"}}, {"scheduler": {"type": "WarmupLR"}}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(dict(raw, **section)))
        with pytest.raises(UserError, match=f"remove '{next(iter(section))}'"):
            read_ds_config(str(bad))


def test_every_shipped_json_matches_its_dtype():
    """Per stage: fp32, DeepSpeed's native bf16 (``"bf16": {"enabled": true}``), bf16 autocast."""
    paths = sorted((REPO / "configs/ds").glob("zero*.json"))
    assert sorted(p.name for p in paths) == sorted(f"zero{s}{kind}.json" for s in range(4)
                                                   for kind in ("", "-bf16", "-bf16-autocast"))
    for path in paths:
        cfg = ds_common.make_config(str(path), "bfloat16" if "-bf16" in path.stem else "float32")
        out = resolve_ds_config(cfg, world_size=2)
        assert zero_stage(out) == int(path.stem[4]), path
        assert native_precision(out) == ("bfloat16" if path.stem.endswith("-bf16") else None), path
        assert out.get("torch_autocast", {}).get("enabled", False) == path.stem.endswith("-autocast"), path


def test_native_bf16_lets_deepspeed_clip_at_every_stage():
    """With 16-bit parameters DeepSpeed's optimizer computes the norm, clips and skips at stage 0 too."""
    cfg = ds_common.make_config(dtype="bfloat16")
    for stage in range(4):
        out = build_ds_config(read_ds_config(str(REPO / f"configs/ds/zero{stage}-bf16.json")), cfg, 2)
        assert out["gradient_clipping"] == cfg.train.grad_clip and out["bf16"] == {"enabled": True}


@pytest.mark.parametrize("section, dtype, message", [
    ({"bf16": {"enabled": True}}, "float32",
     "bf16 is on but train.dtype is float32; set train.dtype=bfloat16 or use configs/ds/zero0.json"),
    ({}, "bfloat16", "no bf16, fp16 or torch_autocast section is on but train.dtype is bfloat16; set "
                     "train.dtype=float32 or use configs/ds/zero0-bf16.json (or zero0-bf16-autocast.json)"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "bfloat16",
     "fp16 is on but train.dtype is bfloat16; set train.dtype=float32"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bfloat16", "bf16 and fp16 are both enabled; enable one"),
    ({"bf16": {"enabled": True}, "torch_autocast": {"enabled": True}}, "bfloat16",
     "torch_autocast and bfloat16 parameters are both on; use one"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, "bfloat16",
     "remove bf16.bf16_master_weights_and_grads: the retraction needs fp32 master weights"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}, "float32",
     "remove fp16.fp16_master_weights_and_grads"),
    ({"bf16": {"enabled": True, "check_grad_overflow": False}}, "bfloat16", "bf16.check_grad_overflow must stay true"),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, "bfloat16",
     "remove data_types.grad_accum_dtype or use ZeRO stage 2 or 3"),
    ({"bf16": "on"}, "bfloat16", "bf16 must be a JSON object"),
    ({"fp16": {"enabled": True}}, "float32", "fp16 needs ZeRO stage 1, 2 or 3"),
])
def test_precision_mistakes_are_one_line_user_errors(tmp_path, section, dtype, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(section))
    with pytest.raises(UserError, match=f"^{bad}: " + re.escape(message)):
        resolve_ds_config(ds_common.make_config(str(bad), dtype), world_size=1)


def test_fp16_is_accepted_with_train_dtype_float32():
    """``train.dtype`` has no float16: DeepSpeed's fp16 section alone selects it (the engine then checks
    that the accelerator computes in fp16)."""
    cfg = ds_common.make_config()
    out = build_ds_config({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, cfg, 2)
    assert native_precision(out) == "float16" and out["gradient_clipping"] == cfg.train.grad_clip


@pytest.mark.parametrize("section, message", [
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ({"zero_optimization": {"stage": "2"}}, "got '2'"),
    ({"zero_optimization": {"stage": True}}, "got True"),
    ({"zero_optimization": 3}, "zero_optimization must be a JSON object"),
    ({"torch_autocast": "on"}, "torch_autocast must be a JSON object"),
])
def test_malformed_sections_are_user_errors(tmp_path, section, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(section))
    cfg = ds_common.make_config(str(bad))
    with pytest.raises(UserError, match=message):
        resolve_ds_config(cfg, world_size=1)


def test_load_config_checks_the_json(tmp_path):
    """``load_config`` reads the JSON a config names: its mistakes surface before any launcher starts."""
    from conftest import tiny_raw
    from killable import write_config
    from tsvd.config import load_config

    good = write_config(tmp_path / "good.yaml", tiny_raw(tmp_path), "engine.kind=deepspeed",
                        f"engine.deepspeed_config={REPO / 'configs/ds/zero1.json'}")
    assert load_config(good).engine.deepspeed_config.endswith("zero1.json")
    bad = write_config(tmp_path / "bad.yaml", tiny_raw(tmp_path), "engine.kind=deepspeed",
                       f"engine.deepspeed_config={tmp_path / 'nope.json'}")
    with pytest.raises(UserError, match=f"^{bad}: engine.deepspeed_config: file not found: {tmp_path / 'nope.json'}$"):
        load_config(bad)
