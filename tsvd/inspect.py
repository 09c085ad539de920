"""``tsvd inspect``: describe a config or checkpoint without allocating the model (``meta`` device)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tsvd import checkpoint as ckpt
from tsvd.config import Config, config_from_dict, load_config
from tsvd.data import META_FILE as DATA_META_FILE
from tsvd.data import read_meta as read_data_meta
from tsvd.errors import UserError
from tsvd.spectral import SpectralModule, set_ranks_for_loading

BYTES_PER_PARAM_ADAMW = 16  # fp32 weight + gradient + two Adam moments


def _gb(n_params: int) -> str:
    return f"{n_params * BYTES_PER_PARAM_ADAMW / 2**30:.2f} GiB"


def _resolve_vocab(cfg: Config) -> None:
    if cfg.model.vocab_size:
        return
    if not (Path(cfg.data.dir) / DATA_META_FILE).is_file():
        raise UserError("model.vocab_size: 0 means 'from the data', but data.dir has no prepared dataset; "
                        "run `tsvd prepare` or set model.vocab_size")
    cfg.model.vocab_size = read_data_meta(cfg.data.dir).vocab_size


def load_target(target: Path, overrides: list[str]) -> tuple[Config, dict[str, int], str]:
    """(config, per-layer ranks from a checkpoint or {}, a title) for a config file or checkpoint."""
    if target.is_file():
        cfg = load_config(target, overrides)
        _resolve_vocab(cfg)
        return cfg, {}, f"config {target}"
    if overrides:
        raise UserError("--set applies to configs, not checkpoints")
    path = ckpt.resolve_checkpoint(target)
    meta = ckpt.read_meta(path)
    return config_from_dict(meta["config"]), meta.get("ranks", {}), f"checkpoint {path} (step {meta['step']})"


def describe_model(model: nn.Module) -> str:
    """Per-layer table (spectral layers and dense matrices) plus totals and AdamW training memory."""
    from tsvd.model import count_params

    lines = [f"{'layer':<32} {'kind':<9} {'shape':>13} {'rank':>5} {'params':>13} {'dense eq.':>14} {'compress':>8}"]
    dense_equiv = 0
    for name, mod in model.named_modules():
        if isinstance(mod, SpectralModule):
            rows, cols = mod.U.shape[0], mod.V.shape[0]
            n = sum(p.numel() for p in mod.parameters())
            dense = rows * cols + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
            lines.append(f"{name:<32} {'spectral':<9} {f'{cols}x{rows}':>13} {mod.rank:>5} {n:>13,} {dense:>14,} {dense / n:>7.1f}x")
            dense_equiv += dense
        elif isinstance(mod, (nn.Linear, nn.Embedding)):
            n = mod.weight.numel()
            shape = "x".join(str(d) for d in mod.weight.shape)
            lines.append(f"{name:<32} {'dense':<9} {shape:>13} {'-':>5} {n:>13,} {n:>14,} {1.0:>7.1f}x")
            dense_equiv += n
    counts = count_params(model)
    total = counts["total"]
    other = total - sum(p.numel() for m in model.modules() if isinstance(m, (SpectralModule, nn.Linear, nn.Embedding))
                        for p in m.parameters(recurse=False))
    dense_equiv += other
    lines.append("")
    lines.append(f"parameters: {total:,} (dense equivalent {dense_equiv:,}, {dense_equiv / total:.1f}x)")
    lines.append(f"training memory, fp32 AdamW (weights + grads + 2 moments): {_gb(total)} "
                 f"(dense equivalent {_gb(dense_equiv)}); activations not included")
    return "\n".join(lines)


def describe(target: Path, overrides: list[str] = ()) -> str:
    from tsvd.model import build_model

    cfg, ranks, title = load_target(Path(target), list(overrides))
    model = build_model(cfg.model, device="meta")
    if ranks:
        set_ranks_for_loading(model, ranks)
    return f"{title}\n{describe_model(model)}"
