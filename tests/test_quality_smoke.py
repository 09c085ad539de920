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


def _load_long():
    spec = importlib.util.spec_from_file_location("bench_quality_long", ROOT / "bench" / "quality_long.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quality_long_smoke_and_resume(tmp_path, capsys):
    """bench/quality_long.py at a tiny size: LR sweeps on val, two seeds, test-split evaluation, FLOPs
    (adaptive arms count their sketches and decisions), the table and plots; a second call resumes
    (nothing is retrained) and --report-only rebuilds the same table."""
    long = _load_long()
    out = tmp_path / "long"
    arms = ["dense", "uniform", "adaptive"]
    assert long.main(["--smoke", "--out", str(out), "--jobs", "2", "--arms", *arms]) == 0
    result = json.loads((out / "results.json").read_text())
    for arm in arms:
        a = result["arms"][arm]
        assert a["n"] == 2 and all(math.isfinite(t) and t > 0 for t in a["tests"]), arm
        assert len(a["sweep"]) == 2 and math.isfinite(a["flops"]) and a["flops"] > 0, arm
    runs = result["runs"]
    for name, r in runs.items():
        test = json.loads((out / "main" / name / "test.json").read_text())
        assert r["test_loss"] == test["test_loss"] and math.isfinite(test["train_loss"])
    # spectral arms train on fewer linear parameters and FLOPs than dense; adaptive decisions cost FLOPs
    assert result["arms"]["uniform"]["flops"] < result["arms"]["dense"]["flops"]
    assert result["arms"]["uniform"]["params"] < result["arms"]["dense"]["params"]
    assert runs["adaptive-s0"]["decision"] > 0 and runs["uniform-s0"]["decision"] == 0
    md = (out / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in arms) and "Partial" not in md
    assert (out / "loss_vs_flops.png").stat().st_size > 1000 and (out / "ranks-adaptive-s0.png").is_file()
    # resume: everything is finished, so nothing starts again
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*/summary.json")}
    capsys.readouterr()
    assert long.main(["--smoke", "--out", str(out), "--jobs", "2", "--arms", *arms]) == 0
    assert "started" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/summary.json")} == mtimes
    assert long.main(["--smoke", "--out", str(out), "--report-only"]) == 0
    assert json.loads((out / "results.json").read_text())["arms"]["uniform"] == result["arms"]["uniform"]
