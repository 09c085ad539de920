"""tsvd.hf.llama: tsvd's Transformer as LlamaForCausalLM (through `export` of a training checkpoint)."""

from __future__ import annotations

import pytest
import torch
from hf_common import ATOL, VOCAB, load_dense, logits_of, tsvd_checkpoint, tsvd_model_config

from tsvd.hf.conversion import load_converted
from tsvd.hf.export import export
from tsvd.hf.llama import llama_config, llama_names, tsvd_to_llama
from tsvd.model import build_model


@pytest.mark.parametrize("tie", [True, False])
def test_name_map_covers_both_models(tie):
    """Every parameter of each model lies under exactly one mapped module (nothing left at init)."""
    import transformers

    cfg = tsvd_model_config(tie, ["q", "up"])
    ours = build_model(cfg, device="meta")
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(llama_config(cfg))
    pairs = list(llama_names(cfg))
    for model, prefixes in ((ours, [a for a, _ in pairs]), (theirs, [b for _, b in pairs])):
        names = {n for n, _ in model.named_parameters()}  # a tied head appears once, as the embedding
        assert {n for n in names if sum(n.startswith(p + ".") for p in prefixes) != 1} == set()


@pytest.mark.parametrize("tie,targets", [(True, ["q", "v", "gate", "down"]), (False, ["k", "o", "up", "lm_head"]),
                                         (True, ["q", "embed"])])
def test_tsvd_model_exports_to_llama(tmp_path, tie, targets):
    model, _ = tsvd_checkpoint(tmp_path / "run", tie, targets)
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    ref = logits_of(model, x)
    result = export(tmp_path / "run", tmp_path / "hf")  # a run's out_dir resolves to its latest checkpoint
    hf = load_dense(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM" and result.source == "tsvd checkpoint"
    cfg = hf.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (48, 80, 4, 2)
    assert cfg.tie_word_embeddings == tie
    torch.testing.assert_close(logits_of(hf, x), ref, rtol=0, atol=ATOL)
    # factor export of the same checkpoint keeps the spectral layers and the function
    export(tmp_path / "run", tmp_path / "factors", factors=True)
    spectral, meta = load_converted(tmp_path / "factors")
    n_linear = sum(t in targets for t in ("q", "k", "v", "o", "gate", "up", "down")) * 2 + ("lm_head" in targets)
    assert len(meta["spectral"]) == n_linear
    torch.testing.assert_close(logits_of(spectral, x), ref, rtol=0, atol=ATOL)


def test_rope_layout_matters(tmp_path):
    """The export check is sensitive to the RoPE convention: interleaving q/k rows breaks it."""
    model, _ = tsvd_checkpoint(tmp_path / "run", True, [])
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = logits_of(model, x)
    hf = tsvd_to_llama(model)  # moves the projections: model and hf share them from here on
    torch.testing.assert_close(logits_of(hf, x), ref, rtol=0, atol=ATOL)
    hd = 12
    perm = torch.arange(48).view(4, 2, hd // 2).transpose(1, 2).reshape(-1)  # split halves -> interleaved pairs
    with torch.no_grad():
        for blk in hf.model.layers:
            blk.self_attn.q_proj.weight.copy_(blk.self_attn.q_proj.weight[perm])
    assert (logits_of(hf, x) - ref).abs().max() > 100 * ATOL
