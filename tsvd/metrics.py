"""Metrics: TensorBoard scalars/histograms plus a JSONL log (``metrics.jsonl``) that scripts can read.

Per spectral layer (tag ``spectral/<stat>/<layer>``, for the layers ``train.layer_cards`` selects): rank,
rank needed for the configured energy τ (``rank_at_tau``), tail share, effective rank, orthonormality
error of ``U``/``V`` (post-retraction, from the retraction cache), Gram drift the step caused,
largest/smallest ``|s|``; histograms of ``s``. Per projection type, always: ``rank/<type>/mean|min|max``,
``params/<type>/ratio``, ``energy/<type>/mean``; ``params/ratio`` for the model; the rank overview
images and decision table (``tsvd.rank_overview``). Run-level: loss, lr, tokens/s, RSS / peak RSS /
device memory, retraction time share.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import psutil
from torch import Tensor

from tsvd.engine.device import cuda_memory_stats
from tsvd.rank_overview import LayerGrid, aggregates, card_layers, custom_layout, decision_table
from tsvd.retraction import FactorCache
from tsvd.spectrum import effective_rank, energy, rank_for_energy, tail_share


def memory_stats() -> dict[str, float]:
    """Current and peak resident memory of this process (GB), and its peak CUDA memory allocated and
    reserved when it has used CUDA (``tsvd.engine.device.cuda_memory_stats``)."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = peak_kb / 2**30 if sys.platform == "darwin" else peak_kb / 2**20
    out = {"memory/rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30, "memory/peak_rss_gb": peak}
    return {**out, **cuda_memory_stats()}


def layer_stats(spectra: dict[str, Tensor], cache: dict[str, FactorCache], tau: float,
                tail_fraction: float = 0.1) -> dict[str, dict[str, float]]:
    """``{layer: {stat: value}}`` from each layer's ``s`` and its factors' retraction cache."""
    out: dict[str, dict[str, float]] = {}
    for layer, s in spectra.items():
        a = s.abs()
        r = s.numel()
        stats = {
            "rank": float(r),
            "energy": energy(s),
            "rank_at_tau": float(rank_for_energy(s, tau)),
            "tail_share": tail_share(s, max(1, round(tail_fraction * r))),
            "effective_rank": effective_rank(s),
            "s_max": float(a.max()),
            "s_min": float(a.min()),
        }
        factors = [cache.get(f"{layer}.{f}") for f in ("U", "V")]
        factors = [c for c in factors if c is not None]
        if factors:
            stats["drift"] = max(c.drift for c in factors)
            errors = [c.error for c in factors if c.error is not None]
            if errors:
                stats["ortho_error"] = max(errors)
        out[layer] = stats
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file the trainer writes (``metrics.jsonl``, ``ranks.jsonl``), blank
    lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Metrics:
    """Writes to TensorBoard (``<out_dir>/tb``) and ``<out_dir>/metrics.jsonl`` on the main rank only.
    Scalar records in ``metrics.jsonl`` carry the Unix ``time`` they were written at (``tsvd report``).

    ``dims``: ``{layer: (m, n)}`` of every spectral layer (the dense matrix is ``m × n``); ``max_ranks``:
    the rank each layer may reach (the overview's colour is rank / max rank); ``other_params``: the
    model's parameters outside the spectral factors; ``layer_cards``: ``train.layer_cards``.
    """

    def __init__(self, out_dir: Path, enabled: bool = True, dims: Mapping[str, tuple[int, int]] | None = None,
                 max_ranks: Mapping[str, int] | None = None, other_params: int = 0, layer_cards: str = "all") -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.dims, self.max_ranks, self.other_params = dict(dims or {}), dict(max_ranks or {}), other_params
        self.carded = set(card_layers(list(self.dims), layer_cards))
        self.writer = None
        self.layout_written = False
        self.overview_step: int | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.out_dir / "tb"))
            self.jsonl = open(self.out_dir / "metrics.jsonl", "a")
            self.ranks_jsonl = open(self.out_dir / "ranks.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.jsonl.flush()

    def spectral(self, step: int, spectra: dict[str, Tensor], stats: dict[str, dict[str, float]]) -> None:
        """Per-layer stats (scalars) and ``s`` histograms of the carded layers, the per-type aggregates
        and one ``ranks.jsonl`` line."""
        if not self.enabled:
            return
        for layer, st in stats.items():
            if layer in self.carded:
                for k, v in st.items():
                    self.writer.add_scalar(f"spectral/{k}/{layer}", v, step)
                self.writer.add_histogram(f"spectrum/{layer}", spectra[layer], step)
        if stats:
            totals = {"spectral/total_rank": sum(st["rank"] for st in stats.values())}
            errors = [st["ortho_error"] for st in stats.values() if "ortho_error" in st]
            if errors:
                totals["spectral/max_ortho_error"] = max(errors)
            self.scalars(step, totals | self._aggregates(spectra, stats))
        self.ranks_jsonl.write(json.dumps({"step": step, "ranks": {k: s.numel() for k, s in spectra.items()}}) + "\n")
        self.ranks_jsonl.flush()

    def _aggregates(self, spectra: dict[str, Tensor], stats: dict[str, dict[str, float]]) -> dict[str, float]:
        ranks = {k: s.numel() for k, s in spectra.items() if k in self.dims}
        kept = {k: 1.0 - st["tail_share"] for k, st in stats.items()}
        return aggregates(ranks, self.dims, kept, self.other_params) if ranks else {}

    def rank_overview(self, step: int, spectra: dict[str, Tensor], stats: dict[str, dict[str, float]],
                      changes: Sequence = (), signals: Mapping[str, str] | None = None) -> None:
        """The overview at a rank decision (and at the start and end of a run): the grid images
        ``overview/rank`` (rank / max rank, the rank written in each cell) and ``overview/energy_kept``
        (share of ``Σ sᵢ²`` outside the tail), the aggregates, the custom-scalars layout (once per
        writer) and, when ranks changed, the decision as a table (text ``rank_decision``)."""
        if not self.enabled or not spectra or step == self.overview_step:
            return
        self.overview_step = step  # one overview per step (a decision at the last step is also the end)
        from tsvd.plots import figure_rgb, grid_figure

        if not self.layout_written:
            self.writer.add_custom_scalars(custom_layout(list(self.dims)))
            self.layout_written = True
        grid = LayerGrid.of(list(spectra))
        ranks = {k: s.numel() for k, s in spectra.items()}
        fill = {k: r / self.max_ranks.get(k, r) for k, r in ranks.items()}
        kept = {k: 1.0 - st["tail_share"] for k, st in stats.items()}
        for tag, values, labels, title, colour in (
                ("overview/rank", fill, {k: str(r) for k, r in ranks.items()}, f"rank at step {step}",
                 "rank / max rank"),
                ("overview/energy_kept", kept, {k: f"{v:.2f}" for k, v in kept.items()},
                 f"energy kept without the smallest directions, step {step}", "share of Σ s²")):
            image = figure_rgb(grid_figure(grid, values, labels, title, colour))
            self.writer.add_image(tag, image, step, dataformats="HWC")
        self.scalars(step, self._aggregates(spectra, stats))
        if changes:
            self.writer.add_text("rank_decision", decision_table(step, changes, signals or {}), step)
        self.writer.flush()

    def rank_events(self, step: int, events: list) -> None:
        """Every rank change as a JSONL record (``event: rank_change``)."""
        if not self.enabled or not events:
            return
        for e in events:
            d = e.to_dict() if hasattr(e, "to_dict") else dict(e)
            self.jsonl.write(json.dumps({"step": step, "event": "rank_change", **d}) + "\n")
        self.jsonl.flush()

    def text(self, step: int, tag: str, message: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, message, step)
            self.jsonl.write(json.dumps({"step": step, "event": tag, "message": message}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
            self.ranks_jsonl.close()
