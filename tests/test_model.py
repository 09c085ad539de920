"""The Llama-style decoder: parameter counts (70B on meta), shapes, causality, RoPE, GQA, spectral
equivalence after conversion, tied heads, loss at init.

Tolerances: logits of the small models here are sums of ≤ ~100 O(0.1) fp32 products per layer;
comparisons of two fp32 computations of the same function use 1e-5 (rounding is ~1e-6).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tsvd import SpectralEmbedding, SpectralLinear, UserError, spectralize
from tsvd.config import ModelConfig, SpectralConfig
from tsvd.model import apply_rope, build_model, count_params, rope_tables

ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "lm_head", "embed"]


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def llama3_70b(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                       max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, **kw)


def test_llama3_70b_dense_param_count_on_meta():
    counts = count_params(build_model(llama3_70b(), device="meta"))
    d, f, kv, V, L = 8192, 28672, 1024, 128256, 80
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert counts["total"] == 2 * V * d + L * per_layer + d == 70_553_706_496
    assert counts["spectral"] == 0 and counts["dense"] == counts["total"]
    assert counts["embedding"] + counts["lm_head"] + counts["linear"] + counts["norm"] == counts["total"]


def test_llama3_70b_rank32_everywhere_param_count():
    cfg = llama3_70b(spectral=SpectralConfig(targets=ALL_TARGETS, rank=32))
    model = build_model(cfg, device="meta")
    counts = count_params(model)
    d, f, kv, V, L, r = 8192, 28672, 1024, 128256, 80, 32

    def sp(m: int, n: int) -> int:
        return r * (m + n + 1)

    layers = L * (2 * sp(d, d) + 2 * sp(d, kv) + 3 * sp(d, f))
    assert counts["linear"] == layers == 414_205_440
    assert counts["total"] == layers + 2 * sp(V, d) + (2 * L + 1) * d == 424_257_088  # the model of bench/llama70b_step.py
    assert counts["dense"] == (2 * L + 1) * d  # only the norms
    assert all(p.device.type == "meta" for p in model.parameters())


def test_output_shapes_and_loss():
    model = build_model(small_cfg())
    idx = torch.randint(0, 97, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 97) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    model = build_model(small_cfg())
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("targets", [[], ["q", "k", "v", "o", "gate", "up", "down", "embed"]])
def test_causality(targets):
    torch.manual_seed(0)
    model = build_model(small_cfg(spectral=SpectralConfig(targets=targets, rank=8)))
    a = torch.randint(0, 97, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, 97, (2, 7))
    la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :9], lb[:, :9], atol=1e-5, rtol=0)
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


def test_rope_is_a_relative_rotation():
    hd, T = 16, 32
    cos, sin = rope_tables(hd, T, 10000.0)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    # the same vector at every position: (1, 1, T, hd)
    rq = apply_rope(q.expand(1, 1, T, hd).clone(), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, T, hd).clone(), cos, sin)[0, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(T), atol=1e-6, rtol=0)
    dots = rq @ rk.T  # dots[m, n] = <rope(q, m), rope(k, n)>
    for shift in (0, 3, 11):
        diag = torch.diagonal(dots, offset=shift)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-5, rtol=0)
    assert torch.allclose(rq[0], q)  # position 0 is the identity


def test_gqa_matches_explicitly_repeated_heads():
    """n_kv_heads=2 equals a full-head model whose k/v weights repeat each kv head n_heads/n_kv times."""
    torch.manual_seed(0)
    gqa = build_model(small_cfg(n_kv_heads=2))
    mha = build_model(small_cfg(n_kv_heads=4))
    state = gqa.state_dict()
    hd = 32 // 4
    for i in range(2):
        for t in ("k", "v"):
            w = state[f"layers.{i}.attn.{t}.weight"].view(2, hd, 32)
            state[f"layers.{i}.attn.{t}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_full_rank_spectral_conversion_preserves_logits(tie):
    torch.manual_seed(0)
    dense = build_model(small_cfg(tie_embeddings=tie))
    idx = torch.randint(0, 97, (2, 12))
    ref = dense(idx)[0]
    model = copy.deepcopy(dense)
    targets = ["layers.*.attn.*", "layers.*.mlp.*"] + ([] if tie else ["lm_head"])
    report = spectralize(model, targets=targets, energy=1.0)
    assert len(report) == 2 * 7 + (0 if tie else 1)
    model.tok_emb = SpectralEmbedding.from_embedding(model.tok_emb, energy=1.0)
    assert isinstance(model.layers[1].mlp.down, SpectralLinear)
    torch.testing.assert_close(model(idx)[0], ref, atol=1e-5, rtol=0)


def test_tied_head_is_the_embedding():
    model = build_model(small_cfg(tie_embeddings=True))
    assert not hasattr(model, "lm_head")
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(model.logits(h), h @ model.tok_emb.weight.T)
    untied = build_model(small_cfg(tie_embeddings=False))
    assert count_params(untied)["total"] - count_params(model)["total"] == 97 * 32


def test_spectral_targets_ranks_and_inits():
    cfg = small_cfg(tie_embeddings=False, spectral=SpectralConfig(
        targets=["q", "down", "lm_head", "embed"], rank=4, rank_overrides={"embed": 6}, init="sct"))
    model = build_model(cfg)
    assert isinstance(model.layers[0].attn.q, SpectralLinear) and model.layers[0].attn.q.rank == 4
    assert isinstance(model.layers[0].attn.k, torch.nn.Linear) and model.layers[0].attn.k.bias is None
    assert isinstance(model.lm_head, SpectralLinear) and model.lm_head.out_features == 97
    assert isinstance(model.tok_emb, SpectralEmbedding) and model.tok_emb.rank == 6
    assert torch.equal(model.layers[1].mlp.down.s, torch.ones(4))  # sct: s = 1
    names = {n for n, _ in model.named_modules()}
    assert {"tok_emb", "layers.1.attn_norm", "layers.1.attn.o", "layers.1.mlp_norm", "layers.1.mlp.gate",
            "norm", "lm_head"} <= names


def test_per_layer_rank_overrides_win_over_the_type():
    """``rank_overrides`` keyed by a module name sets that layer's rank only; the type's override and the
    global rank hold elsewhere."""
    cfg = small_cfg(spectral=SpectralConfig(targets=["q", "up"], rank=4, rank_overrides={
        "q": 5, "layers.1.attn.q": 2, "layers.0.mlp.up": 7}))
    model = build_model(cfg)
    assert [b.attn.q.rank for b in model.layers] == [5, 2]
    assert [b.mlp.up.rank for b in model.layers] == [7, 4]


def test_residual_projections_use_gpt2_scaled_init():
    torch.manual_seed(0)
    cfg = small_cfg(dim=256, ffn_dim=512, n_layers=8, n_heads=4, n_kv_heads=4, init_std=0.02)
    model = build_model(cfg)
    assert model.layers[0].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("cfg, match", [
    (small_cfg(vocab_size=0), "model.vocab_size"),
    (small_cfg(tie_embeddings=True, spectral=SpectralConfig(targets=["lm_head"])), "model.spectral.targets"),
    (small_cfg(spectral=SpectralConfig(targets=["k"], rank=17)), "model.spectral.rank"),
    (small_cfg(spectral=SpectralConfig(targets=["q"], rank_overrides={"q": 40})), "model.spectral.rank_overrides.q"),
    (small_cfg(n_kv_heads=3), "n_kv_heads"),
    (small_cfg(spectral=SpectralConfig(targets=["q"], rank_overrides={"layers.1.attn.q": 40})),
     "model.spectral.rank_overrides.layers.1.attn.q=40 is impossible"),
    (small_cfg(spectral=SpectralConfig(targets=["q"], rank_overrides={"layers.2.attn.q": 3})), "'layers.2.attn.q'"),
    (small_cfg(spectral=SpectralConfig(targets=["q"], rank_overrides={"layers.0.mlp.q": 3})), "'layers.0.mlp.q'"),
    (small_cfg(spectral=SpectralConfig(targets=["q"], rank_overrides={"layers.0.attn.k": 3})), "'layers.0.attn.k'"),
    (small_cfg(spectral=SpectralConfig(targets=["q"], rank_overrides={"layers.0.attn": 3})), "unknown target"),
])
def test_config_errors_name_the_key(cfg, match):
    with pytest.raises(UserError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("targets", [[], ["q", "k", "v", "o", "gate", "up", "down", "embed"]])
def test_loss_at_init_is_uniform(targets):
    torch.manual_seed(0)
    V = 512
    model = build_model(small_cfg(vocab_size=V, dim=64, spectral=SpectralConfig(targets=targets, rank=8)))
    idx = torch.randint(0, V, (32, 16))
    logits, loss = model(idx, torch.randint(0, V, (32, 16)))
    std = logits.std().item()
    assert std < 0.5  # near-uniform predictions, so E[loss] ≈ ln V + std²/2 (second-order expansion)
    assert abs(loss.item() - math.log(V) - std**2 / 2) < 0.05


def test_backward_reaches_every_parameter():
    cfg = small_cfg(tie_embeddings=False, spectral=SpectralConfig(targets=["q", "up", "lm_head"], rank=4))
    model = build_model(cfg)
    idx = torch.randint(0, 97, (2, 8))
    model(idx, idx)[1].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
