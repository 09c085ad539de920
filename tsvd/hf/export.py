"""``export``: a factor checkpoint or a tsvd training checkpoint (either engine) as a Hugging Face
checkpoint — dense (the only place tsvd materializes dense weights) or as factors.

A tsvd training checkpoint is read by ``load_tsvd_checkpoint`` (``weights_only=True``) and mapped to
``LlamaForCausalLM`` by ``tsvd.hf.llama``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tsvd import checkpoint as ckpt
from tsvd.config import config_from_dict
from tsvd.convert import densify
from tsvd.errors import UserError
from tsvd.hf.conversion import load_converted, save_converted
from tsvd.hf.factors import is_factor_checkpoint
from tsvd.hf.llama import tsvd_to_llama
from tsvd.hf.loading import check_out_dir, require_transformers
from tsvd.spectral import SpectralEmbedding, SpectralModule, set_ranks_for_loading

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


@dataclass
class ExportResult:
    out_dir: Path
    kind: str  # "dense" or "factors"
    source: str  # "factor checkpoint" or "tsvd checkpoint"
    architecture: str
    params: int
    notes: list[str] = field(default_factory=list)


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
    check_out_dir(out, overwrite)
    require_transformers()
    notes: list[str] = []
    tokenizer, tok_dir = None, None
    if is_factor_checkpoint(src):
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
