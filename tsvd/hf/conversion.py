"""Hugging Face causal LM ⇄ factor checkpoint: ``convert_hf`` (load, spectralize, save with a report),
``save_converted`` / ``load_converted`` (a HF model with spectral layers, its architecture and config
recorded in the factor checkpoint's meta) and ``report_dict``.

On top of ``tsvd.hf.factors`` (the file format) the meta gains ``architecture``, ``hf_config``,
``source`` and ``conversion`` (the settings ``convert_hf`` used); the directory gains ``REPORT_JSON``,
``REPORT_TXT`` and the tokenizer's files.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tsvd.convert import LayerReport, format_report, matches_glob, spectralize
from tsvd.errors import UserError
from tsvd.hf.factors import load_factors, read_factor_meta, save_factors, write_json
from tsvd.hf.loading import check_out_dir, load_hf_model, locate, require_transformers
from tsvd.spectrum import check_energy

REPORT_JSON, REPORT_TXT = "report.json", "report.txt"


def report_dict(rows: Sequence[LayerReport], **extra: Any) -> dict:
    """A conversion report as JSON-able data: per-layer rows and totals."""
    dense = sum(r.dense_params for r in rows)
    spectral = sum(r.spectral_params for r in rows)
    ranks = [r.rank for r in rows]
    return {**extra,
            "layers": [{**asdict(r), "dense_params": r.dense_params, "spectral_params": r.spectral_params,
                        "compression": r.compression} for r in rows],
            "total": {"layers": len(rows), "dense_params": dense, "spectral_params": spectral,
                      "compression": dense / spectral if spectral else math.nan,
                      "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                      "min_retained_energy": min((r.retained_energy for r in rows), default=1.0)}}


def save_converted(model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, conversion: dict | None = None,
                   report: Sequence[LayerReport] | None = None, source: str | None = None) -> Path:
    """Write a HF model with spectral layers as a factor checkpoint (+ report and tokenizer)."""
    out = Path(out_dir)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise UserError("save_converted needs a Hugging Face model (with .config); use save_factors for other modules")
    meta = {"architecture": type(model).__name__, "hf_config": config.to_dict(), "source": source,
            "conversion": conversion}
    save_factors(model, out, meta)
    if report is not None:
        write_json(out / REPORT_JSON, report_dict(report, source=source, conversion=conversion))
        (out / REPORT_TXT).write_text(format_report(report) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def build_hf_model(meta: dict) -> nn.Module:
    """An (untrained) HF model of the architecture and config recorded by ``save_converted``."""
    transformers = require_transformers()
    cfg = dict(meta.get("hf_config") or {})
    if "model_type" not in cfg:
        raise UserError("factor checkpoint: hf_config has no model_type (not a Hugging Face model)")
    arch = meta.get("architecture") or "AutoModelForCausalLM"
    config = transformers.AutoConfig.for_model(**cfg)
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise UserError(f"factor checkpoint: this transformers has no class {arch!r}")
    model = transformers.AutoModelForCausalLM.from_config(config) if arch.startswith("Auto") else cls(config)
    dtype = meta.get("dtype")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        model.to(getattr(torch, dtype))
    return model


def load_converted(path: str | Path) -> tuple[nn.Module, dict]:
    """``(HF model with spectral layers at the stored ranks, meta)`` from a factor checkpoint."""
    meta = read_factor_meta(path)
    if "hf_config" not in meta:
        raise UserError(f"{path}: a factor checkpoint of a non-Hugging Face module; use load_factors(model, path)")
    model = build_hf_model(meta)
    load_factors(model, path, meta)
    return model.eval(), meta


def _check_budget(energy: float | None, rank: int | None) -> None:
    """Exactly one of ``energy`` / ``rank``, each valid (checked before the slow model load)."""
    if (energy is None) == (rank is None):
        raise UserError("convert: give exactly one of energy= or rank=")
    if energy is not None:
        check_energy(energy)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"rank must be a positive integer, got {rank!r}")


def _output_head(model: nn.Module) -> tuple[str | None, bool]:
    """``(name of the output projection, whether it is tied to the input embedding)``."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return None, False
    name = next((n for n, m in model.named_modules() if m is head), None)
    emb = get_in() if callable(get_in) else None
    tied = emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", 1)
    return name, tied


def choose_targets(model: nn.Module, targets: Sequence[str] | None,
                   exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(targets, exclude)`` globs for ``spectralize``: by default every ``nn.Linear`` but the output head;
    a head tied to the input embedding may not be targeted."""
    head, tied = _output_head(model)
    exclude = list(exclude)
    if targets is None:
        targets = ["*"]
        if head:
            exclude.append(head)
    targets = list(targets)
    if head and tied and matches_glob(head, targets) and not matches_glob(head, exclude):
        raise UserError(f"{head} is tied to the input embedding and cannot be spectral on its own; "
                        f"add --exclude {head}")
    return targets, exclude


def convert_hf(src: str | Path, out_dir: str | Path, *, energy: float | None = None, rank: int | None = None,
               targets: Sequence[str] | None = None, exclude: Sequence[str] = (), overwrite: bool = False,
               log: Callable[[str], None] | None = print) -> list[LayerReport]:
    """Convert a HF causal LM (directory or ``.gguf``) to a factor checkpoint in ``out_dir``; returns
    the per-layer report.

    ``targets``: globs over module names (default: every ``nn.Linear`` except the output head).
    Exactly one of ``energy`` (per-layer rank keeping this fraction of ``Σ sᵢ²``) or ``rank``.
    Steps: check the arguments, load, choose the layers, factorize (``spectralize``), save.
    """
    _check_budget(energy, rank)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    locate(Path(src))  # fail fast, before the (slow) load

    t0 = time.perf_counter()
    model, tokenizer = load_hf_model(src)
    t_load = time.perf_counter() - t0
    targets, exclude = choose_targets(model, targets, exclude)
    report = spectralize(model, targets, rank=rank, energy=energy, exclude=exclude)
    conversion = {"targets": targets, "exclude": exclude, "energy": energy, "rank": rank}
    save_converted(model, out, tokenizer=tokenizer, conversion=conversion, report=report, source=str(src))
    if log is not None:
        log(format_report(report))
        log(f"converted {len(report)} layers of {type(model).__name__} in {time.perf_counter() - t0:.1f} s "
            f"(load {t_load:.1f} s) -> {out}")
    return report
