"""The factor checkpoint: a directory holding any ``nn.Module`` with spectral layers, safetensors only.

Layout (the file names are ``FACTORS_FILE`` and ``META_FILE``; nothing else in tsvd spells them)::

    factors.safetensors   every parameter/buffer; a spectral layer as <layer>.U (in×r) / .s (r) / .V (out×r);
                          tensors shared by several names (tied weights) stored once
    tsvd_factors.json     {"format", "version", "dtype", "spectral": {layer: {kind, rank}},
                           "aliases": {tied name: stored name}, ...the caller's meta}

``save_factors`` and ``load_factors`` are inverses for any module; ``read_factor_meta`` is the one
reader (and validator) of the JSON file. ``tsvd.hf.conversion`` adds the Hugging Face architecture
and config to the meta; this module knows nothing of Hugging Face.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tsvd.errors import UserError, read_document
from tsvd.spectral import SpectralEmbedding, SpectralLinear

FORMAT = "tsvd-hf-factors"
FORMAT_VERSION = 1
FACTORS_FILE = "factors.safetensors"
META_FILE = "tsvd_factors.json"

# layout kind -> (spectral class, the dense class it replaces)
KINDS: dict[str, tuple[type, type]] = {"linear": (SpectralLinear, nn.Linear),
                                       "embedding": (SpectralEmbedding, nn.Embedding)}


def spectral_layout(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"kind": "linear" | "embedding", "rank": r}}`` for every spectral layer."""
    return {name: {"kind": kind, "rank": mod.rank} for name, mod in model.named_modules()
            for kind, (spectral, _) in KINDS.items() if isinstance(mod, spectral)}


def _unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: ``(tensors, {alias: stored name})``."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _spectral_shell(mod: nn.Module, name: str, kind: str, rank: int) -> nn.Module | None:
    """A spectral layer of ``rank`` with uninitialized content to replace ``mod`` (``None``: resized in place)."""
    spectral, dense = KINDS.get(kind, (None, None))
    if spectral is not None and isinstance(mod, spectral):
        if mod.rank != rank:
            mod.reallocate_(rank)
        return None
    if dense is not None and isinstance(mod, dense):
        dtype = mod.weight.dtype
        new = (SpectralLinear(mod.in_features, mod.out_features, rank, bias=mod.bias is not None, device="meta",
                              dtype=dtype) if kind == "linear"
               else SpectralEmbedding(mod.num_embeddings, mod.embedding_dim, rank, device="meta", dtype=dtype))
        return new.to_empty(device=mod.weight.device)
    raise UserError(f"factor checkpoint: layer {name!r} is a spectral {kind} but the model has a "
                    f"{type(mod).__name__} there (checkpoint from a different model?)")


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> None:
    """Give ``model`` spectral layers of the stored kinds and ranks (content comes from the load)."""
    modules = dict(model.named_modules())
    for name, spec in layout.items():
        if name not in modules or name == "":
            raise UserError(f"factor checkpoint has layer {name!r}, which this model does not have "
                            "(checkpoint from a different model?)")
        new = _spectral_shell(modules[name], name, spec.get("kind", ""), int(spec["rank"]))
        if new is not None:
            model.set_submodule(name, new)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (the meta and report files of a factor checkpoint)."""
    path.write_text(json.dumps(obj, indent=1) + "\n")


def save_factors(model: nn.Module, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write ``FACTORS_FILE`` (all parameters/buffers, tied ones once) and ``META_FILE`` (``meta`` +
    format, dtype, spectral layout and aliases) into ``out_dir``. Works for any module; returns ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _unique_state(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    save_file(tensors, str(out / FACTORS_FILE), metadata={"format": FORMAT})
    write_json(out / META_FILE, {"format": FORMAT, "version": FORMAT_VERSION, **(meta or {}),
                                 "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                                 "spectral": spectral_layout(model), "aliases": aliases})
    return out


def is_factor_checkpoint(path: str | Path) -> bool:
    """Does ``path`` look like a factor checkpoint (has ``META_FILE``)? ``read_factor_meta`` validates it."""
    return (Path(path) / META_FILE).is_file()


def read_factor_meta(path: str | Path) -> dict:
    """``META_FILE`` of the factor checkpoint ``path``, validated (format, version, ``FACTORS_FILE`` present)."""
    meta_file = Path(path) / META_FILE
    meta = read_document(meta_file, "JSON", f"{path}: not a tsvd factor checkpoint (no {META_FILE})")
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file}: expected a JSON object")
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{meta_file}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    if not (Path(path) / FACTORS_FILE).is_file():
        raise UserError(f"{path}: {FACTORS_FILE} is missing")
    return meta


def load_factors(model: nn.Module, path: str | Path, meta: dict | None = None) -> dict:
    """Load the factor checkpoint ``path`` into ``model`` (its spectral layers are created/resized to the
    stored ranks first). safetensors only: nothing is unpickled. ``meta``: the checkpoint's
    ``read_factor_meta``, when the caller already read it. Returns the meta."""
    from safetensors.torch import load_file

    meta = read_factor_meta(path) if meta is None else meta
    apply_layout(model, meta.get("spectral", {}))
    tensors = load_file(str(Path(path) / FACTORS_FILE))
    for alias, name in meta.get("aliases", {}).items():
        if name in tensors:
            tensors[alias] = tensors[name]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: the factors do not fit the model ({str(e).splitlines()[0]} …)") from None
    return meta
