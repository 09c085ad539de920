"""Shared by tests/test_hf*.py: tiny random Hugging Face and tsvd models — no downloads.

Tolerances: a full-energy conversion stores the float64 SVD of each fp32 weight as fp32 factors, so
each projection reproduces its weight to a few ulp; the factored matmuls round differently from the
dense ones (relative ~1e-7 per op). Through two decoder layers the logits (O(1)) agree to ~1e-6;
ATOL = 1e-4 leaves headroom and is still far below what any real mistake costs: a dropped direction,
a wrong RoPE layout or a transposed weight moves the logits by O(0.1–1) here (checked in the tests).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (after HF_HUB_OFFLINE: read at import)

from tsvd import checkpoint as ckpt  # noqa: E402
from tsvd.config import Config, ModelConfig, SpectralConfig, TrainConfig, to_dict  # noqa: E402
from tsvd.hf import convert_hf  # noqa: E402

ATOL = 1e-4
VOCAB = 96


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def load_dense(path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def tiny_language(n: int = 4000) -> torch.Tensor:
    """Uniform random tokens from an 8-token alphabet: a model starting from VOCAB=96 outputs learns fast."""
    return torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (2 layers, hidden 64, GQA, tied head) saved as safetensors."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, rope_theta=500.0, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """``(factor checkpoint dir, report)``: every block projection of ``hf_dir`` at full energy."""
    out = tmp_path_factory.mktemp("conv") / "full"
    report = convert_hf(hf_dir, out, energy=1.0, log=None)
    return out, report


def tsvd_model_config(tie: bool, targets: list[str]) -> ModelConfig:
    spectral = SpectralConfig(targets=targets, rank=6, rank_overrides={"embed": 16} if "embed" in targets else {})
    return ModelConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=32,
                       rope_theta=321.0, norm_eps=1e-5, tie_embeddings=tie, init_std=0.2, spectral=spectral)


def tsvd_checkpoint(root, tie: bool, targets: list[str], seed: int = 0):
    """A torch-engine training checkpoint (meta.json + engine_state.pt) of a random tsvd Transformer."""
    from tsvd.model import build_model

    torch.manual_seed(seed)
    mcfg = tsvd_model_config(tie, targets)
    cfg = Config(model=mcfg, train=TrainConfig(seq_len=16))
    model = build_model(mcfg)
    with torch.no_grad():  # non-trivial norm weights so a mapping mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ranks = {n: m.rank for n, m in model.named_modules() if hasattr(m, "rank") and hasattr(m, "s")}
    path = ckpt.save_checkpoint(root / "checkpoints", 7, {"ranks": ranks, "config": to_dict(cfg)},
                                lambda d: torch.save({"model": model.state_dict(), "optimizer": {},
                                                      "client_state": {"step": 7}}, d / "engine_state.pt"))
    return model.eval(), path
