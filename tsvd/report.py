"""``tsvd report RUN_DIR``: one picture and a short text summary of a training run.

Reads only what the trainer's rank 0 writes into ``out_dir`` — ``config.yaml``, ``metrics.jsonl`` and
``ranks.jsonl`` — so it works the same on a finished run, a run that is still going (a half-written
last line is skipped) and a DeepSpeed run. A resumed run logs the replayed steps again; the later
record of a step wins.

Training FLOPs are the usual estimate, per token ``6·N + 12·L·T·d`` (forward and backward of the
matrix multiplications with ``N`` parameters, plus attention scores and values over ``T`` positions
in ``L`` blocks of width ``d``). ``N`` counts what each token multiplies by: ``r·(m+n)`` for a spectral
layer of rank ``r`` (its rank over time, from ``ranks.jsonl``), ``m·n`` for a dense one, the output
head, and no embedding lookup. Retraction (QR of the factors), evaluation and the gradient sketch
are not counted. Wall time is the time between consecutive records while the step advanced, so a
pause between a crash and a resume does not count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsvd.config import Config, config_from_dict
from tsvd.errors import UserError
from tsvd.plots import rank_matrix
from tsvd.rank_overview import LayerGrid

REPORT_FILE = "report.png"


@dataclass
class RunLog:
    run_dir: Path
    cfg: Config
    records: list[dict]  # metrics.jsonl
    ranks: list[dict]  # ranks.jsonl: {"step", "ranks": {layer: rank}}

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``key`` in ``metrics.jsonl``, steps ascending, the last record of a step winning."""
        by_step = {r["step"]: r[key] for r in self.records if key in r and isinstance(r[key], (int, float))}
        steps = sorted(by_step)
        return np.array(steps, dtype=float), np.array([by_step[s] for s in steps], dtype=float)

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)


def _read_records(path: Path) -> list[dict]:
    """JSON lines; a last line that does not parse (a run writing it right now) is skipped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON line: {line[:60]!r}") from None
    return out


def read_run(run_dir: str | Path) -> RunLog:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR: {run_dir} is not a directory (give a run's out_dir, e.g. runs/tiny-cpu)")
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config.is_file() or not metrics.is_file():
        raise UserError(f"RUN_DIR: {run_dir} holds no training run (config.yaml and metrics.jsonl, written "
                        "by `tsvd train` into its out_dir)")
    import yaml

    try:
        cfg = config_from_dict(yaml.safe_load(config.read_text()))
    except yaml.YAMLError as e:
        raise UserError(f"{config}: not valid YAML ({str(e).splitlines()[0]})") from None
    records = _read_records(metrics)
    if not any("train/loss" in r for r in records):
        raise UserError(f"RUN_DIR: {run_dir} has no logged training step yet (metrics.jsonl holds no train/loss)")
    return RunLog(run_dir, cfg, records, _read_records(run_dir / "ranks.jsonl"))


# ------------------------------------------------------------------------------------------ numbers


def matmul_params(cfg: Config, ranks: dict[str, int]) -> int:
    """``N``: parameters a token is multiplied by, for a model with these spectral ranks (see the module
    docstring). Sized on the ``meta`` device: nothing is allocated."""
    from torch import nn

    from tsvd.model import build_model
    from tsvd.spectral import SpectralEmbedding, SpectralModule, set_ranks_for_loading

    model = build_model(cfg.model, device="meta")
    set_ranks_for_loading(model, ranks)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, SpectralModule) and not isinstance(mod, SpectralEmbedding):
            n += mod.rank * (mod.U.shape[0] + mod.V.shape[0])
        elif isinstance(mod, nn.Linear):
            n += mod.weight.numel()
    if cfg.model.tie_embeddings:  # the head multiplies by the embedding matrix
        emb = model.tok_emb
        n += emb.rank * (emb.U.shape[0] + emb.V.shape[0]) if isinstance(emb, SpectralModule) else emb.weight.numel()
    return n


def training_flops(run: RunLog) -> float:
    """``Σ_steps tokens_per_step · (6·N(step) + 12·L·T·d)``, ``N(step)`` from the rank in force at each step."""
    m, t = run.cfg.model, run.cfg.train
    attention = 12 * m.n_layers * t.seq_len * m.dim
    by_step = {int(r["step"]): r["ranks"] for r in run.ranks}
    steps = sorted(by_step)
    cache: dict[tuple, int] = {}

    def n_at(ranks: dict[str, int]) -> int:
        key = tuple(sorted(ranks.items()))
        if key not in cache:
            cache[key] = matmul_params(run.cfg, ranks)
        return cache[key]

    # Steps after a record's step up to the next record's run at that record's ranks; steps up to the
    # first record at the first record's.
    total, done = 0.0, 0
    bounds = [s for s in steps if s <= run.last_step] + [run.last_step]
    current = by_step[steps[0]] if steps else {}
    for s in bounds:
        if s > done:
            total += (s - done) * run.tokens_per_step * (6 * n_at(current) + attention)
            done = s
        current = by_step.get(s, current)
    return total


def wall_seconds(run: RunLog) -> float:
    """Sum of the gaps between consecutive timed records while the step advanced (resumes excluded)."""
    timed = [(r["step"], r["time"]) for r in run.records if "time" in r]
    return sum(t2 - t1 for (s1, t1), (s2, t2) in zip(timed, timed[1:]) if s2 > s1 and t2 >= t1)


def ranks_by_type(ranks: dict[str, int]) -> dict[str, tuple[float, int, int]]:
    """``{type: (mean, min, max)}`` of the ranks (see ``tsvd.rank_overview``)."""
    grid = LayerGrid.of(list(ranks))
    out = {}
    for t in grid.types:
        r = [ranks[n] for n in grid.layers_of(t)]
        out[t] = (sum(r) / len(r), min(r), max(r))
    return out


def summary_text(run: RunLog) -> str:
    steps, train = run.series("train/loss")
    val_steps, val = run.series("val/loss")
    tokens = run.last_step * run.tokens_per_step
    finished = run.last_step >= run.cfg.train.steps
    lines = [f"run {run.run_dir}: step {run.last_step} of {run.cfg.train.steps}"
             f"{'' if finished else ' (not finished: still going or stopped)'}",
             f"train loss {train[-1]:.4f} (ppl {math.exp(min(train[-1], 50)):.2f}) at step {int(steps[-1])}"]
    if val.size:
        lines.append(f"val loss   {val[-1]:.4f} (ppl {math.exp(min(val[-1], 50)):.2f}) at step {int(val_steps[-1])}")
    else:
        lines.append("val loss   not evaluated yet")
    wall = wall_seconds(run)
    lines.append(f"tokens {tokens:,}; training FLOPs {training_flops(run):.3g} (6·N·D + attention; "
                 f"see tsvd/report.py); wall time {wall / 60:.1f} min" if wall else
                 f"tokens {tokens:,}; training FLOPs {training_flops(run):.3g}; wall time unknown (no timed records)")
    if run.ranks:
        final = run.ranks[-1]["ranks"]
        parts = [f"{t} {mean:.1f} ({lo}–{hi})" for t, (mean, lo, hi) in ranks_by_type(final).items()]
        lines.append(f"final ranks (mean, min–max) at step {run.ranks[-1]['step']}: " + ", ".join(parts))
    _, ratio = run.series("params/ratio")
    if ratio.size:
        lines.append(f"parameters / dense: {ratio[-1]:.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ picture


def report_figure(run: RunLog):
    """Four panels: loss vs tokens (train, val), ranks over time (layers × steps), parameters / dense
    vs step, retraction share of the step time vs step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), dpi=100)
    (loss_ax, rank_ax), (ratio_ax, retr_ax) = fig.subplots(2, 2)
    steps, train = run.series("train/loss")
    loss_ax.plot(steps * run.tokens_per_step, train, label="train", lw=1)
    val_steps, val = run.series("val/loss")
    if val.size:
        loss_ax.plot(val_steps * run.tokens_per_step, val, "o-", label="val", ms=4)
    loss_ax.set(xlabel="tokens", ylabel="loss (nats)", title="loss")
    loss_ax.legend()

    if run.ranks:
        layers, rsteps, R = rank_matrix(run.ranks)
        gap = rsteps[-1] - rsteps[-2] if len(rsteps) > 1 else 1
        mesh = rank_ax.pcolormesh(np.array(rsteps + [rsteps[-1] + gap], float), np.arange(len(layers) + 1),
                                  np.ma.masked_invalid(R), cmap="viridis", shading="flat")
        step_labels = max(1, len(layers) // 40)
        rank_ax.set_yticks(np.arange(0, len(layers), step_labels) + 0.5, labels=layers[::step_labels],
                           fontsize=5 if len(layers) > 30 else 7)
        rank_ax.invert_yaxis()
        fig.colorbar(mesh, ax=rank_ax, label="rank")
    else:
        rank_ax.text(0.5, 0.5, "no ranks.jsonl (dense model?)", ha="center", transform=rank_ax.transAxes)
    rank_ax.set(xlabel="step", title="rank per layer")

    for ax, key, title in ((ratio_ax, "params/ratio", "parameters / dense model"),
                           (retr_ax, "perf/retraction_share", "retraction share of step time")):
        xs, ys = run.series(key)
        if xs.size:
            ax.plot(xs, ys, drawstyle="steps-post" if key == "params/ratio" else "default", lw=1)
        else:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", transform=ax.transAxes)
        ax.set(xlabel="step", title=title)
    fig.suptitle(f"{run.run_dir}  (step {run.last_step} of {run.cfg.train.steps})")
    fig.tight_layout()
    return fig


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the picture (default ``RUN_DIR/report.png``); return its path and the text summary."""
    run = read_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / REPORT_FILE
    report_figure(run).savefig(out)
    return out, summary_text(run)
