"""Rank-evolution heatmap (layers × steps) from a run's ``ranks.jsonl``.

``<out_dir>/ranks.jsonl`` holds one JSON object per line, ``{"step": int, "ranks": {layer: rank}}``:
the rank of every spectral layer at that step (the trainer writes one at every log step, and a
resumed run appends). Lines with a repeated step replace the earlier one. Usage::

    python -m tsvd.plots runs/tsvd-adaptive/ranks.jsonl runs/tsvd-adaptive/ranks.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np


def load_rank_history(path: str | Path) -> list[dict]:
    """Read ``ranks.jsonl`` into a list of ``{"step", "ranks"}`` records (blank lines skipped)."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if not isinstance(rec.get("step"), int) or not isinstance(rec.get("ranks"), dict):
                raise ValueError(f"{path}:{i}: expected {{\"step\": int, \"ranks\": {{layer: rank}}}}, got {line[:80]!r}")
            records.append(rec)
    return records


def rank_matrix(history: Iterable[Mapping]) -> tuple[list[str], list[int], np.ndarray]:
    """``(layers, steps, R)`` with ``R[i, j]`` the rank of ``layers[i]`` at ``steps[j]`` (NaN where a
    record lacks the layer); steps ascending, the last record of a step wins; layers in order of first
    appearance (the trainer writes them in module order)."""
    by_step = {int(rec["step"]): rec["ranks"] for rec in history}
    steps = sorted(by_step)
    layers = list(dict.fromkeys(name for step in steps for name in by_step[step]))
    R = np.full((len(layers), len(steps)), np.nan)
    for j, step in enumerate(steps):
        for i, name in enumerate(layers):
            if name in by_step[step]:
                R[i, j] = by_step[step][name]
    return layers, steps, R


def rank_heatmap(history: str | Path | Iterable[Mapping], out_png: str | Path, title: str | None = None) -> Path:
    """Draw ranks as a layers (rows, model order) × steps heatmap (each record's ranks hold until the next record) into
    ``out_png``. ``history``: a ``ranks.jsonl`` path or its records. Returns the PNG path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    records = load_rank_history(history) if isinstance(history, (str, Path)) else list(history)
    layers, steps, R = rank_matrix(records)
    if not steps:
        raise ValueError("rank_heatmap: the rank history is empty")
    last_gap = steps[-1] - steps[-2] if len(steps) > 1 else 1
    edges = np.array(steps + [steps[-1] + last_gap], dtype=float)
    fig = Figure(figsize=(10, max(2.5, 0.22 * len(layers) + 1.2)))
    ax = fig.subplots()
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1), np.ma.masked_invalid(R), cmap="viridis", shading="flat")
    ax.set_yticks(np.arange(len(layers)) + 0.5, labels=layers, fontsize=7 if len(layers) > 20 else 9)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    ax.set_title(title or "spectral rank per layer")
    fig.colorbar(mesh, ax=ax, label="rank")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tsvd.plots RANKS_JSONL OUT_PNG")
    print(rank_heatmap(sys.argv[1], sys.argv[2]))
