"""Hugging Face sources: find and load a local causal-LM directory or ``.gguf`` file, and its tokenizer.

``transformers`` is imported only inside these functions (``require_transformers``): importing
``tsvd.hf`` never imports it. Nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsvd.errors import UserError


def require_transformers() -> Any:
    """The ``transformers`` module, or a ``UserError`` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face support needs the 'hf' extra: pip install 'tsvd[hf]' "
                        "(transformers, gguf, accelerate)") from None
    return transformers


def locate(src: Path) -> tuple[Path, str | None]:
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


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty ``out_dir`` unless ``overwrite`` (and never into a file)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise UserError(f"{out_dir}: exists and is not empty (choose another directory or pass --overwrite)")
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a directory")


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
    directory, gguf = locate(Path(src))
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
    directory, gguf = (Path(path), None) if Path(path).is_dir() else locate(Path(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
