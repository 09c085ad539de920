"""Hugging Face interop: convert a pretrained causal LM to spectral factors, fine-tune it, export it.

- ``convert_hf(src, out_dir, energy=… | rank=…)``: load a HF causal-LM directory (safetensors/bin) or a
  ``.gguf`` file, turn the targeted ``nn.Linear`` layers into ``SpectralLinear`` with ``spectralize``
  and write a *factor checkpoint* plus a per-layer report.
- ``load_converted(dir)``: rebuild the HF model with spectral layers at the stored ranks and load the
  factors (safetensors only — nothing is ever unpickled).
- ``finetune(model, tokens, TrainConfig)``: AdamW with per-component learning rates
  (``tsvd.optim.param_groups``) and a retraction after every step; ``perplexity`` evaluates.
- ``export(src, out_dir, factors=False)``: dense Hugging Face checkpoint (the only place dense
  weights are materialized) from a factor checkpoint or from a tsvd training checkpoint (mapped to
  ``LlamaForCausalLM``); ``factors=True`` keeps the factors (a factor checkpoint).

Factor checkpoint layout (a directory)::

    factors.safetensors   every parameter; spectral layers as <layer>.U / .s / .V (tied weights once)
    tsvd_factors.json     format, HF architecture + config, per-layer {kind, rank}, conversion settings
    report.json/.txt      per-layer rank, retained energy, compression (when converted here)
    tokenizer files       as saved by the source's tokenizer, when it has one

``save_factors`` / ``load_factors`` work for any ``nn.Module``; the HF functions are a convenience on top.
``transformers`` is imported lazily (the ``hf`` extra).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsvd import checkpoint as ckpt
from tsvd.config import ModelConfig, TrainConfig, config_from_dict
from tsvd.convert import LayerReport, densify, format_report, matches_glob, spectralize
from tsvd.errors import UserError, read_document
from tsvd.optim import build_adamw, lr_multiplier, set_lr
from tsvd.retraction import Retractor
from tsvd.spectral import SpectralEmbedding, SpectralLinear, SpectralModule, set_ranks_for_loading
from tsvd.spectrum import check_energy

FORMAT = "tsvd-hf-factors"
FORMAT_VERSION = 1
FACTORS_FILE = "factors.safetensors"
META_FILE = "tsvd_factors.json"
REPORT_JSON, REPORT_TXT = "report.json", "report.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def require_transformers() -> Any:
    """The ``transformers`` module, or a ``UserError`` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face support needs the 'hf' extra: pip install 'tsvd[hf]' "
                        "(transformers, gguf, accelerate)") from None
    return transformers


# ------------------------------------------------------------------------------------------------
# Loading Hugging Face models


def _locate(src: Path) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for a HF model directory or a ``.gguf`` file."""
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix == ".gguf":
            return src.parent, src.name
        raise UserError(f"{src}: expected a Hugging Face model directory or a .gguf file")
    if (src / "config.json").is_file():
        return src, None
    ggufs = sorted(p.name for p in src.glob("*.gguf"))
    if len(ggufs) == 1:
        return src, ggufs[0]
    if ggufs:
        raise UserError(f"{src}: holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise UserError(f"{src}: not a Hugging Face model directory (no config.json) and no .gguf file in it")


def _drop_gguf_quantizer(model: nn.Module, gguf: str | None) -> None:
    """transformers dequantizes GGUF weights into plain float tensors but keeps a quantizer attached,
    which forbids ``save_pretrained``. Detach it; refuse genuinely quantized models."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if gguf is None:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "unknown")
        raise UserError(f"quantized checkpoints ({method}) are not supported: convert from a float checkpoint")
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def load_hf_model(src: str | Path, dtype: torch.dtype = torch.float32,
                  with_tokenizer: bool = True) -> tuple[nn.Module, Any | None]:
    """``(model, tokenizer or None)`` from a local HF causal-LM directory or ``.gguf`` file (no downloads)."""
    transformers = require_transformers()
    directory, gguf = _locate(Path(src))
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except ImportError as e:
        raise UserError(f"{src}: {str(e).splitlines()[0]} (pip install 'tsvd[hf]')") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{src}: transformers cannot load it as a causal LM ({str(e).splitlines()[0]})") from None
    _drop_gguf_quantizer(model, gguf)
    model.to(dtype).eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # a model without tokenizer files is still convertible
    return model, tokenizer


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer saved next to a model or factor checkpoint."""
    transformers = require_transformers()
    directory, gguf = (Path(path), None) if Path(path).is_dir() else _locate(Path(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None


# ------------------------------------------------------------------------------------------------
# Factor checkpoints (any nn.Module)


def spectral_layout(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"kind": "linear" | "embedding", "rank": r}}`` for every spectral layer."""
    layout: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SpectralLinear):
            layout[name] = {"kind": "linear", "rank": mod.rank}
        elif isinstance(mod, SpectralEmbedding):
            layout[name] = {"kind": "embedding", "rank": mod.rank}
    return layout


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
    spectral, dense = {"linear": (SpectralLinear, nn.Linear), "embedding": (SpectralEmbedding, nn.Embedding)}.get(
        kind, (None, None))
    if spectral is not None and isinstance(mod, spectral):
        if mod.rank != rank:
            mod.reallocate_(rank)
        return None
    if dense is not None and isinstance(mod, dense):
        new = (SpectralLinear(mod.in_features, mod.out_features, rank, bias=mod.bias is not None, device="meta",
                              dtype=mod.weight.dtype) if kind == "linear"
               else SpectralEmbedding(mod.num_embeddings, mod.embedding_dim, rank, device="meta", dtype=mod.weight.dtype))
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def save_factors(model: nn.Module, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write ``factors.safetensors`` (all parameters/buffers, tied ones once) and ``tsvd_factors.json``
    (``meta`` + the spectral layout). Works for any module; returns ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _unique_state(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    save_file(tensors, str(out / FACTORS_FILE), metadata={"format": FORMAT})
    _write_json(out / META_FILE, {"format": FORMAT, "version": FORMAT_VERSION, **(meta or {}),
                                  "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                                  "spectral": spectral_layout(model), "aliases": aliases})
    return out


def read_factor_meta(path: str | Path) -> dict:
    """``tsvd_factors.json`` of a factor checkpoint (validated)."""
    meta_file = Path(path) / META_FILE
    meta = read_document(meta_file, "JSON", f"{path}: not a tsvd factor checkpoint (no {META_FILE})")
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file}: expected a JSON object")
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{meta_file}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    if not (Path(path) / FACTORS_FILE).is_file():
        raise UserError(f"{path}: {FACTORS_FILE} is missing")
    return meta


def load_factors(model: nn.Module, path: str | Path) -> dict:
    """Load a factor checkpoint into ``model`` (its spectral layers are created/resized to the stored
    ranks first). safetensors only: nothing is unpickled. Returns the checkpoint's meta."""
    from safetensors.torch import load_file

    meta = read_factor_meta(path)
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


# ------------------------------------------------------------------------------------------------
# Converting Hugging Face models


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise UserError(f"{out_dir}: exists and is not empty (choose another directory or pass --overwrite)")
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a directory")


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
        _write_json(out / REPORT_JSON, report_dict(report, source=source, conversion=conversion))
        (out / REPORT_TXT).write_text(format_report(report) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def convert_hf(src: str | Path, out_dir: str | Path, *, energy: float | None = None, rank: int | None = None,
               targets: Sequence[str] | None = None, exclude: Sequence[str] = (), overwrite: bool = False,
               log: Callable[[str], None] | None = print) -> list[LayerReport]:
    """Convert a HF causal LM (directory or ``.gguf``) to a factor checkpoint in ``out_dir``.

    ``targets``: globs over module names (default: every ``nn.Linear`` except the output head).
    Exactly one of ``energy`` (per-layer rank keeping this fraction of ``Σ sᵢ²``) or ``rank``.
    """
    if (energy is None) == (rank is None):
        raise UserError("convert: give exactly one of energy= or rank=")
    if energy is not None:
        check_energy(energy)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserError(f"rank must be a positive integer, got {rank!r}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    _locate(Path(src))  # fail fast, before the (slow) load

    t0 = time.perf_counter()
    model, tokenizer = load_hf_model(src)
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
    t_load = time.perf_counter() - t0
    report = spectralize(model, targets, rank=rank, energy=energy, exclude=exclude)
    conversion = {"targets": targets, "exclude": exclude, "energy": energy, "rank": rank}
    save_converted(model, out, tokenizer=tokenizer, conversion=conversion, report=report, source=str(src))
    if log is not None:
        log(format_report(report))
        log(f"converted {len(report)} layers of {type(model).__name__} in {time.perf_counter() - t0:.1f} s "
            f"(load {t_load:.1f} s) -> {out}")
    return report


def build_hf_model(meta: dict) -> nn.Module:
    """An (untrained) HF model of the architecture and config recorded in a factor checkpoint."""
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
    load_factors(model, path)
    return model.eval(), meta


# ------------------------------------------------------------------------------------------------
# tsvd's own model -> LlamaForCausalLM


def llama_config(cfg: ModelConfig, **extra: Any) -> Any:
    """A ``LlamaConfig`` describing the same network as tsvd's ``Transformer`` built from ``cfg``."""
    transformers = require_transformers()
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.dim // cfg.n_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, initializer_range=cfg.init_std,
        architectures=["LlamaForCausalLM"], **extra)


@torch.no_grad()
def tsvd_to_llama(model: nn.Module, **config_extra: Any) -> nn.Module:
    """``LlamaForCausalLM`` computing the same function as tsvd's ``Transformer`` ``model``.

    Projections are *moved* (spectral ones stay spectral: densify or ``save_converted`` afterwards);
    norms and the embedding are copied (a spectral embedding is materialized: HF ties the head to a
    dense table). Both models use the rotate-half RoPE layout, so q/k need no permutation.
    """
    transformers = require_transformers()
    cfg: ModelConfig = model.cfg
    dtype = next(model.parameters()).dtype
    hf = transformers.LlamaForCausalLM(llama_config(cfg, **config_extra)).to(dtype).eval()
    emb = model.tok_emb.to_embedding() if isinstance(model.tok_emb, SpectralEmbedding) else model.tok_emb
    hf.model.embed_tokens.weight.copy_(emb.weight)
    for blk, h in zip(model.layers, hf.model.layers):
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            setattr(h.self_attn, theirs, getattr(blk.attn, ours))
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            setattr(h.mlp, theirs, getattr(blk.mlp, ours))
        h.input_layernorm.weight.copy_(blk.attn_norm.weight)
        h.post_attention_layernorm.weight.copy_(blk.mlp_norm.weight)
    hf.model.norm.weight.copy_(model.norm.weight)
    if cfg.tie_embeddings:
        if hf.lm_head.weight is not hf.model.embed_tokens.weight:
            hf.lm_head.weight = hf.model.embed_tokens.weight
    else:
        hf.lm_head = model.lm_head
    return hf


def load_tsvd_checkpoint(src: str | Path) -> tuple[nn.Module, dict]:
    """``(tsvd Transformer, meta)`` from a training checkpoint dir, checkpoints root or run out_dir.
    Reads the single-device engine's ``engine_state.pt`` (memory-mapped) or a DeepSpeed engine's
    checkpoint (any ZeRO stage; needs ``deepspeed``), always with ``weights_only=True``."""
    from tsvd.model import build_model

    path = ckpt.resolve_checkpoint(Path(src))
    meta = ckpt.read_meta(path)
    source, weights = _checkpoint_weights(path, meta)
    cfg = config_from_dict(meta.get("config", {}))
    model = build_model(cfg.model)
    set_ranks_for_loading(model, meta.get("ranks", {}))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{source}: does not fit the model in its meta.json ({str(e).splitlines()[0]} …)") from None
    return model.eval(), meta


def _checkpoint_weights(path: Path, meta: dict) -> tuple[Path, dict[str, Tensor]]:
    """(the file or directory read, the model's state dict) of a training checkpoint of either engine."""
    if meta.get("engine") == "deepspeed":
        try:
            from tsvd.engine.deepspeed_engine import read_full_params
        except ImportError:
            raise UserError(f"{path}: a DeepSpeed checkpoint; reading it needs deepspeed "
                            "(pip install deepspeed)") from None
        return path, read_full_params(path)
    from tsvd.engine.torch_engine import STATE_FILE, read_state

    state_file = path / STATE_FILE
    state = read_state(state_file, mmap=True)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{state_file}: not a tsvd engine state (no 'model' entry)")
    return state_file, state["model"]


def _tsvd_tokenizer(meta: dict) -> Any:
    """A HF tokenizer for a tsvd run's BPE ``tokenizer.json`` (data.dir), or ``None``."""
    data_dir = Path(meta.get("config", {}).get("data", {}).get("dir", ""))
    file = data_dir / "tokenizer.json"
    if not file.is_file():
        return None
    transformers = require_transformers()
    from tsvd.tokenizer import BPETokenizer

    eot = BPETokenizer.from_file(file).eot_id
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
    tok.eos_token = tok.convert_ids_to_tokens(eot)
    return tok


# ------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    out_dir: Path
    kind: str  # "dense" or "factors"
    source: str  # "factor checkpoint" or "tsvd checkpoint"
    architecture: str
    params: int
    notes: list[str] = field(default_factory=list)


def _copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def export(src: str | Path, out_dir: str | Path, *, factors: bool = False, overwrite: bool = False) -> ExportResult:
    """Export a factor checkpoint or a tsvd training checkpoint as a Hugging Face checkpoint.

    Dense (default): ``config.json`` + ``model.safetensors`` loadable with
    ``AutoModelForCausalLM.from_pretrained``. ``factors=True``: a factor checkpoint (HF names,
    ``U``/``s``/``V`` kept) for compact storage; ``load_converted`` reads it.
    """
    src, out = Path(src), Path(out_dir)
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    _check_out_dir(out, overwrite)
    require_transformers()
    notes: list[str] = []
    tokenizer, tok_dir = None, None
    if (src / META_FILE).is_file():
        model, meta = load_converted(src)
        source, conversion, tok_dir = "factor checkpoint", meta.get("conversion"), src
    elif (src / "config.json").is_file() and not (src / ckpt.META_FILE).is_file():
        raise UserError(f"{src}: already a Hugging Face checkpoint; convert it with `tsvd convert` first")
    else:
        tsvd_model, meta = load_tsvd_checkpoint(src)
        if isinstance(tsvd_model.tok_emb, SpectralEmbedding):
            notes.append("the spectral embedding was materialized (HF ties the head to a dense table)")
        tokenizer = _tsvd_tokenizer(meta)
        extra = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": None} if tokenizer is not None else \
            {"eos_token_id": None, "bos_token_id": None}
        if tokenizer is None:
            notes.append("no BPE tokenizer.json found in the run's data.dir: export has no tokenizer")
        model = tsvd_to_llama(tsvd_model, **extra)
        source, conversion = "tsvd checkpoint", {"from": "tsvd", "step": meta.get("step")}
    out.mkdir(parents=True, exist_ok=True)
    if factors:
        save_converted(model, out, tokenizer=tokenizer, conversion=conversion, source=str(src))
        kind = "factors"
    else:
        densify(model)
        if any(isinstance(m, SpectralModule) for m in model.modules()):
            raise UserError("export: a spectral layer kind that cannot be densified in a HF model")
        model.save_pretrained(str(out), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        kind = "dense"
    if tok_dir is not None:
        _copy_tokenizer_files(tok_dir, out)
    params = sum(p.numel() for p in model.parameters())
    return ExportResult(out, kind, source, type(model).__name__, params, notes)


# ------------------------------------------------------------------------------------------------
# Fine-tuning and evaluation


def lm_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits ``(B,T,V)`` of a HF causal LM or a tsvd ``Transformer``."""
    out = model(input_ids=x, use_cache=False) if hasattr(model, "config") and hasattr(model.config, "to_dict") \
        else model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def sample_batch(tokens: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows ``x`` and next tokens ``y`` (``(B,T)`` each) from a 1-D token tensor."""
    if tokens.numel() <= seq_len + 1:
        raise UserError(f"need more than {seq_len + 1} tokens to sample windows, got {tokens.numel()}")
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = tokens[idx].long()
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Tensor, seq_len: int = 256, max_windows: int | None = None,
               batch_size: int = 4) -> tuple[float, int]:
    """``(mean next-token loss in nats, tokens scored)`` over consecutive non-overlapping windows of
    ``tokens`` (each window predicts ``seq_len`` tokens). Perplexity is ``exp(loss)``."""
    n = (tokens.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"need more than {seq_len + 1} tokens for one evaluation window, got {tokens.numel()}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        starts = torch.arange(b, min(n, b + batch_size)) * seq_len
        w = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
        logits = lm_logits(model, w[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count, count


@dataclass
class FinetuneResult:
    losses: list[float]
    seconds: float
    retraction_seconds: float
    max_drift: float  # largest ‖AᵀA − I‖_F a step left before its retraction


class FineTuner:
    """One optimizer step at a time on a model with spectral layers (HF or a tsvd ``Transformer``).

    AdamW over tsvd's per-component groups (``train.spectral_lr`` for ``U``/``V``, ``train.core_lr``
    for ``s``, ``train.lr`` for dense weights; frozen parameters are skipped), the warmup + cosine
    schedule of ``train``, gradient clipping, and a retraction of every factor after every step.
    """

    def __init__(self, model: nn.Module, train: TrainConfig) -> None:
        self.model, self.train = model, train
        self.device = next(model.parameters()).device
        self.optimizer = build_adamw(model, train, self.device)
        self.retractor = Retractor(model, train.retraction, train.lazy_tol)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps_done = 0

    def step(self, micro_batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, float, float]:
        """Forward/backward over the micro-batches, clip, AdamW, retract. Returns
        ``(mean loss, retraction seconds, max factor drift before the retraction)``; a non-finite loss
        or gradient norm skips the update (as in the engines)."""
        self.model.train()
        set_lr(self.optimizer, lr_multiplier(self.steps_done, self.train))
        total = 0.0
        for x, y in micro_batches:
            logits = lm_logits(self.model, x.to(self.device))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(self.device).flatten())
            (loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip or math.inf))
        if math.isfinite(total) and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        report = self.retractor()
        self.steps_done += 1
        return total, report.seconds, report.max_drift


def finetune(model: nn.Module, tokens: Tensor, train: TrainConfig, *, seed: int = 0,
             callback: Callable[[int, float, float], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` for ``train.steps`` steps (``FineTuner``) on random windows of a 1-D token
    tensor (``train.batch_size × train.seq_len``, ``train.grad_accum`` micro-batches per step).
    ``callback(step, loss, seconds)`` runs after every step; the model is left in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    tuner = FineTuner(model, train)
    losses: list[float] = []
    t_start, t_retract, max_drift = time.perf_counter(), 0.0, 0.0
    try:
        for step in range(train.steps):
            t0 = time.perf_counter()
            micro = [sample_batch(tokens, train.batch_size, train.seq_len, gen) for _ in range(train.grad_accum)]
            loss, retract_s, drift_ = tuner.step(micro)
            t_retract += retract_s
            max_drift = max(max_drift, drift_)
            losses.append(loss)
            if callback is not None:
                callback(step + 1, loss, time.perf_counter() - t0)
    finally:
        model.eval()
    return FinetuneResult(losses, time.perf_counter() - t_start, t_retract, max_drift)
