"""bench/gpu_check.py --cpu: the GPU acceptance script's code paths at small sizes on the CPU, so that it
cannot rot between the rare GPU sessions. The ``tests`` section (``pytest -m gpu``) is left out here:
those tests are this suite's own (tests/test_gpu.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_writes_its_summary(tmp_path):
    sections = ["throughput", "retraction", "llama70b", "deepspeed"]
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path),
                           "--sections", ",".join(sections)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["device"] == "cpu" and list(summary["sections"]) == sections
    assert all(r["ok"] for r in summary["sections"].values())
    widths = summary["sections"]["throughput"]["widths"]
    assert set(widths) == {"d=64 float32", "d=128 float32", "d=64 bfloat16", "d=128 bfloat16"}
    for arms in widths.values():
        assert set(arms) == {"dense", "r=d/8 strict", "r=d/8 k=4", "r=d/4 strict", "r=d/4 k=4"}
        assert all(a["tokens_per_s_median"] > 0 and 0 <= a["retraction_share"] < 1 for a in arms.values())
    assert all(c["cholesky_error"] <= 1e-5 for c in summary["sections"]["retraction"]["cases"])
    ds = summary["sections"]["deepspeed"]
    assert ds["loss_before_resume"] < ds["loss_first_steps"] and ds["resumed_steps"] == [7, 12]
    assert "| deepspeed" in proc.stdout and "| throughput d=64 float32 | PASS |" in proc.stdout


def test_gpu_check_refuses_without_cuda_or_with_an_unknown_section(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path), "--sections", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--sections: unknown x" in proc.stderr and "Traceback" not in proc.stderr
