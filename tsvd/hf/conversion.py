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

from tsvd.calibration import lead_batches, token_windows
from tsvd.convert import LayerReport, format_report, matches_glob, spectralize
from tsvd.data import load_data, read_meta
from tsvd.errors import UserError
from tsvd.hf.factors import load_factors, read_factor_meta, save_factors, write_json
from tsvd.hf.loading import check_out_dir, load_hf_model, locate, require_transformers
from tsvd.sizes import check_positive_int, check_size

REPORT_JSON, REPORT_TXT = "report.json", "report.txt"
CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN, CALIBRATION_BATCH = 32768, 512, 4
SENSITIVITY_TOKENS = 2048  # the output-curvature pass; 512 tokens were too few on SmolLM2 (docs/results.md)


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


def _check_calibration_source(path: Path) -> None:
    """A readable, non-empty text file or a prepared tsvd dataset directory (before the slow load)."""
    if path.is_dir():
        read_meta(path)
    elif not path.is_file():
        raise UserError(f"calibration: {path} does not exist (a text file or a prepared tsvd dataset directory)")
    elif path.stat().st_size == 0:
        raise UserError(f"calibration: {path} is empty")


def calibration_windows(path: str | Path, tokenizer: Any, n_tokens: int = CALIBRATION_TOKENS,
                        seq_len: int = CALIBRATION_SEQ_LEN, batch_size: int = CALIBRATION_BATCH) -> list[torch.Tensor]:
    """Token windows ``(≤batch_size, seq_len + 1)`` predicting about ``n_tokens`` tokens of the calibration
    text, tokenized by the model's own tokenizer. ``path``: a text file, or a prepared tsvd dataset
    directory (its train split, decoded with the dataset's tokenizer)."""
    path = Path(path)
    _check_calibration_source(path)
    check_positive_int(n_tokens, "calibration tokens")
    if tokenizer is None:
        raise UserError("calibration needs the model's tokenizer, and the source has none")
    max_chars = 16 * (n_tokens + seq_len)  # far more characters than tokens needed; bounds the tokenizer's work
    if path.is_dir():
        data = load_data(path)
        text = data.tokenizer.decode(data.train[:4 * (n_tokens + seq_len)].tolist())
    else:
        text = path.read_text(errors="replace")[:max_chars]
    if not text.strip():
        raise UserError(f"calibration: {path} has no text")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= seq_len:
        raise UserError(f"calibration: {path} is too short: {ids.numel()} tokens, need at least {seq_len + 1} "
                        "(one window)")
    return token_windows(ids, seq_len, n_tokens, batch_size)


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
               params_ratio: float | None = None, budget: int | None = None, calibration: str | Path | None = None,
               calibration_tokens: int = CALIBRATION_TOKENS, sensitivity_tokens: int = SENSITIVITY_TOKENS,
               sequential: bool = False,
               targets: Sequence[str] | None = None,
               exclude: Sequence[str] = (), overwrite: bool = False,
               log: Callable[[str], None] | None = print) -> list[LayerReport]:
    """Convert a HF causal LM (directory or ``.gguf``) to a factor checkpoint in ``out_dir``; returns
    the per-layer report.

    ``targets``: globs over module names (default: every ``nn.Linear`` except the output head).
    Exactly one of ``energy`` (per-layer rank keeping this fraction of ``Σ sᵢ²``), ``rank``,
    ``params_ratio`` (the targeted layers' factors hold this fraction of their dense parameters) or
    ``budget`` (that many parameters). ``calibration`` (a text file or a prepared tsvd dataset
    directory; its first ``calibration_tokens`` tokens): activation-aware factors, and with
    ``params_ratio``/``budget`` factors weighted by the loss's output curvature and ranks allocated by
    the model's loss (``tsvd.convert.spectralize``; its gradient pass reads the first
    ``sensitivity_tokens`` calibration tokens, whole windows);
    ``sequential`` fits each layer to the inputs of the partly converted model.
    Steps: check the arguments, load, choose the layers, factorize (``spectralize``), save.
    """
    check_size(rank=rank, energy=energy, params_ratio=params_ratio, budget=budget)  # before the slow load
    check_positive_int(sensitivity_tokens, "sensitivity tokens")
    if calibration is not None:
        if energy is not None:
            raise UserError("convert: --calibration works with --rank, --params-ratio or --budget, not --energy")
        _check_calibration_source(Path(calibration))
    elif sequential:
        raise UserError("convert: --sequential needs --calibration")
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    locate(Path(src))  # fail fast, before the (slow) load

    t0 = time.perf_counter()
    model, tokenizer = load_hf_model(src)
    t_load = time.perf_counter() - t0
    targets, exclude = choose_targets(model, targets, exclude)
    windows = None if calibration is None else calibration_windows(calibration, tokenizer, calibration_tokens)
    gradient_batches = 1
    if windows is not None:
        windows, gradient_batches = lead_batches(windows, sensitivity_tokens)
        if log is not None:
            log(f"calibration: {sum(w.shape[0] for w in windows) * CALIBRATION_SEQ_LEN:,} tokens of {calibration}")
    report = spectralize(model, targets, rank=rank, energy=energy, exclude=exclude, params_ratio=params_ratio,
                         budget=budget, calibration=windows, gradient_batches=gradient_batches, sequential=sequential, log=log)
    conversion = {"targets": targets, "exclude": exclude, "energy": energy, "rank": rank,
                  "params_ratio": params_ratio, "budget": budget,
                  "calibration": None if calibration is None else str(calibration),
                  "calibration_tokens": None if calibration is None else calibration_tokens,
                  "sensitivity_tokens": None if calibration is None else sensitivity_tokens,
                  "sequential": sequential}
    save_converted(model, out, tokenizer=tokenizer, conversion=conversion, report=report, source=str(src))
    if log is not None:
        log(format_report(report))
        log(f"converted {len(report)} layers of {type(model).__name__} in {time.perf_counter() - t0:.1f} s "
            f"(load {t_load:.1f} s) -> {out}")
    return report
