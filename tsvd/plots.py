"""Rank-evolution heatmap (layers × steps) from a run's ``ranks.jsonl``, and the rank overview grid
(blocks × projection types, one number per cell) that TensorBoard shows at each rank decision.

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


GRID_ROW_IN = 0.17  # inches per grid row: 17 px at 100 dpi, room for a 7-point number at 80 blocks
GRID_FONT_PT = 7


def grid_figure(grid, values: Mapping[str, float], labels: Mapping[str, str], title: str, colour_label: str):
    """A ``grid`` (``tsvd.rank_overview.LayerGrid``) as a heatmap: colour ``values[layer]``, the colour
    scale spanning the values shown (so that small differences show; the colour bar gives the range),
    the text ``labels[layer]`` written in each cell; empty cells grey. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    n, t = len(grid.rows), len(grid.types)
    V = np.full((n, t), np.nan)
    for layer, (i, j) in grid.cell.items():
        V[i, j] = values[layer]
    width, height = 0.9 + 0.6 * t + 1.1, 1.0 + GRID_ROW_IN * n  # inches: labels, cells, colour bar
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_axes((0.9 / width, 0.15 / height, 0.6 * t / width, GRID_ROW_IN * n / height))
    bar = fig.add_axes(((0.9 + 0.6 * t + 0.2) / width, 0.15 / height, 0.15 / width, min(3.0, GRID_ROW_IN * n) / height))
    cmap = __import__("matplotlib").colormaps["viridis"].with_extremes(bad="0.85")
    lo, hi = float(np.nanmin(V)), float(np.nanmax(V))
    lo, hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    image = ax.imshow(np.ma.masked_invalid(V), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    for layer, (i, j) in grid.cell.items():
        ax.text(j, i, labels[layer], ha="center", va="center", fontsize=GRID_FONT_PT,
                color="white" if values[layer] < lo + 0.55 * (hi - lo) else "black")
    ax.set_xticks(range(t), labels=grid.types, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n), labels=grid.rows, fontsize=GRID_FONT_PT)
    ax.set_ylabel("block")
    ax.set_title(f"{title}\ncolour: {colour_label}", fontsize=9, pad=18)
    fig.colorbar(image, cax=bar)
    return fig


def figure_rgb(fig) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array (for ``SummaryWriter.add_image``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tsvd.plots RANKS_JSONL OUT_PNG")
    print(rank_heatmap(sys.argv[1], sys.argv[2]))
