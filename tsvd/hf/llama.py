"""tsvd's ``Transformer`` as a ``transformers`` ``LlamaForCausalLM``: the config map (``llama_config``),
the module-name map (``TSVD_TO_LLAMA``, data) and ``tsvd_to_llama`` which applies both.

Both models rotate the pairs ``(x[i], x[i + d/2])`` (HF's ``rotate_half`` RoPE layout), so q/k rows
need no permutation.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from tsvd.config import ModelConfig
from tsvd.hf.loading import require_transformers
from tsvd.spectral import SpectralEmbedding, SpectralLinear

# tsvd module name -> LlamaForCausalLM module name; "{}" is the block index. Projections (nn.Linear or
# SpectralLinear) are moved into the HF model, the embedding and the norms have their weights copied.
# lm_head exists only without tied embeddings (tied: HF's head shares the embedding's weight).
TSVD_TO_LLAMA: dict[str, str] = {
    "tok_emb": "model.embed_tokens",
    "layers.{}.attn_norm": "model.layers.{}.input_layernorm",
    "layers.{}.attn.q": "model.layers.{}.self_attn.q_proj",
    "layers.{}.attn.k": "model.layers.{}.self_attn.k_proj",
    "layers.{}.attn.v": "model.layers.{}.self_attn.v_proj",
    "layers.{}.attn.o": "model.layers.{}.self_attn.o_proj",
    "layers.{}.mlp_norm": "model.layers.{}.post_attention_layernorm",
    "layers.{}.mlp.gate": "model.layers.{}.mlp.gate_proj",
    "layers.{}.mlp.up": "model.layers.{}.mlp.up_proj",
    "layers.{}.mlp.down": "model.layers.{}.mlp.down_proj",
    "norm": "model.norm",
    "lm_head": "lm_head",
}


def llama_names(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """``(tsvd name, HF name)`` of every module ``TSVD_TO_LLAMA`` maps in a model built from ``cfg``."""
    for ours, theirs in TSVD_TO_LLAMA.items():
        if ours == "lm_head" and cfg.tie_embeddings:
            continue
        if "{}" in ours:
            yield from ((ours.format(i), theirs.format(i)) for i in range(cfg.n_layers))
        else:
            yield ours, theirs


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
    dense table).
    """
    transformers = require_transformers()
    cfg: ModelConfig = model.cfg
    dtype = next(model.parameters()).dtype
    hf = transformers.LlamaForCausalLM(llama_config(cfg, **config_extra)).to(dtype).eval()
    for ours, theirs in llama_names(cfg):
        mod = model.get_submodule(ours)
        if isinstance(mod, (nn.Linear, SpectralLinear)):
            hf.set_submodule(theirs, mod)
        else:
            src = mod.to_embedding() if isinstance(mod, SpectralEmbedding) else mod
            hf.get_submodule(theirs).weight.copy_(src.weight)
    if cfg.tie_embeddings and hf.lm_head.weight is not hf.model.embed_tokens.weight:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf
