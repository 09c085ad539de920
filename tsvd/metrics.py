"""Metrics: TensorBoard scalars/histograms plus a JSONL log (``metrics.jsonl``) that scripts can read.

Per spectral layer (tag ``spectral/<stat>/<layer>``): rank, rank needed for the configured energy
τ (``rank_at_tau``), tail share, effective rank, orthonormality error of ``U``/``V`` (post-retraction,
from the retraction cache), Gram drift the step caused, largest/smallest ``|s|``; histograms of ``s``.
Run-level: loss, lr, tokens/s, RSS / peak RSS / device memory, retraction time share.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import psutil
import torch
from torch import Tensor

from tsvd.retraction import FactorCache
from tsvd.spectrum import effective_rank, energy, rank_for_energy, tail_share


def memory_stats() -> dict[str, float]:
    """Current and peak resident memory of this process (GB), and device peak allocation if any."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = peak_kb / 2**30 if sys.platform == "darwin" else peak_kb / 2**20
    out = {"memory/rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30, "memory/peak_rss_gb": peak}
    if torch.cuda.is_available():
        out["memory/device_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


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
    """Writes to TensorBoard (``<out_dir>/tb``) and ``<out_dir>/metrics.jsonl`` on the main rank only."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.writer = None
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
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def spectral(self, step: int, spectra: dict[str, Tensor], stats: dict[str, dict[str, float]]) -> None:
        """Per-layer stats (scalars), ``s`` histograms, and one ``ranks.jsonl`` line."""
        if not self.enabled:
            return
        for layer, st in stats.items():
            for k, v in st.items():
                self.writer.add_scalar(f"spectral/{k}/{layer}", v, step)
            self.writer.add_histogram(f"spectrum/{layer}", spectra[layer], step)
        if stats:
            totals = {"spectral/total_rank": sum(st["rank"] for st in stats.values())}
            errors = [st["ortho_error"] for st in stats.values() if "ortho_error" in st]
            if errors:
                totals["spectral/max_ortho_error"] = max(errors)
            self.scalars(step, totals)
        self.ranks_jsonl.write(json.dumps({"step": step, "ranks": {k: s.numel() for k, s in spectra.items()}}) + "\n")
        self.ranks_jsonl.flush()

    def rank_events(self, step: int, events: list) -> None:
        """Every rank change as a text event and a JSONL record (``event: rank_change``)."""
        if not self.enabled or not events:
            return
        for e in events:
            d = e.to_dict() if hasattr(e, "to_dict") else dict(e)
            self.writer.add_text("rank_changes", json.dumps(d), step)
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
