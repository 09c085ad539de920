"""The DeepSpeed JSON: checked and completed from ``train.*`` without DeepSpeed, and at config load time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_common  # noqa: E402
from tsvd.engine.ds_config import build_ds_config, read_ds_config, resolve_ds_config, zero_stage  # noqa: E402
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
        build_ds_config(read_ds_config(str(REPO / "configs/ds/zero2-bf16.json")), cfg, 2)
    for section in ({"optimizer": {"type": "AdamW"}}, {"scheduler": {"type": "WarmupLR"}}, {"bf16": {"enabled": True}}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(dict(raw, **section)))
        with pytest.raises(UserError, match=f"remove '{next(iter(section))}'"):
            read_ds_config(str(bad))


def test_every_shipped_json_matches_its_dtype():
    for path in sorted((REPO / "configs/ds").glob("zero*.json")):
        cfg = ds_common.make_config(str(path), "bfloat16" if path.stem.endswith("-bf16") else "float32")
        out = resolve_ds_config(cfg, world_size=2)
        assert zero_stage(out) == int(path.stem[4]), path


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
