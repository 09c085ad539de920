"""CI smoke test of the pretraining-quality harness (bench/quality.py --smoke).

Runs the whole sweep on a tiny model with the byte tokenizer on stdlib sources (no English corpus
needed) and checks that the results table has every row with finite losses. Timing is not checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_harness():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_quality_smoke(tmp_path):
    quality = _load_harness()
    out = tmp_path / "quality"
    assert quality.main(["--smoke", "--out", str(out), "--jobs", "2"]) == 0

    runs, _ = quality.plan(smoke=True)
    names = [r.name for r in runs]
    assert {r.group for r in runs} == {"dense", "sct", "tsvd", "ablation"}
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert r["rc"] == 0, r["name"]
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0, r["name"]
        assert math.isfinite(r["final_train_loss"]), r["name"]
        assert 0 < r["linear_params_avg"] <= r["linear_params_dense"], r["name"]
        assert r["flops"] > 0 and r["peak_rss_gb"] > 0, r["name"]
        assert len(r["val_curve"]) >= 2, r["name"]
    # spectral runs use fewer linear parameters than dense; the budget run stays near SCT's count
    by = {r["name"]: r for r in rows}
    assert by["sct-static"]["linear_params_avg"] < by["dense-lr0.003"]["linear_params_avg"]
    assert abs(by["tsvd-budget"]["linear_params_avg"] / by["sct-static"]["linear_params_avg"] - 1) < 0.25

    table = (out / "results.md").read_text()
    for name in names:
        assert f"| {name}" in table
    assert (out / "val_loss.png").stat().st_size > 1000
