"""Reproductions of SCT's published numbers (Spectral Compact Training, arXiv 2604.00733,
github.com/EctoSpace/SCT) with tsvd's own layers.

(a) README "Compression Scales with Model Size": per-MLP-layer training memory at rank 32.
(b) examples/sct_steamdeck.py: parameter count of the simplified 70B-architecture stack.
(c) spectral_compact_training/mlp_debug.py: a from-scratch spectral MLP learns sine and XOR.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tsvd import SpectralLinear, attach_retraction
from tsvd.stiefel import orthonormality_error

BYTES_PER_PARAM = 16  # fp32 weight + grad + Adam exp_avg + exp_avg_sq


def spectral_param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# (a) per-layer training memory at rank 32


@pytest.mark.parametrize(
    "m, n, dense_mb, sct_mb, ratio",
    [
        (576, 1536, "14.2", "1.1", 13),  # SmolLM2-135M
        (2048, 8192, "268", "5.2", 51),  # SmolLM2-1.7B
        (4096, 11008, "721", "7.7", 93),  # LLaMA-7B
        (4096, 17408, "1,141", "11.0", 104),  # Qwen-27B
        (8192, 28672, "3,758", "18.9", 199),  # LLaMA-70B
    ],
)
def test_sct_memory_table(m, n, dense_mb, sct_mb, ratio):
    """SCT's convention, recovered from its table: 16 B/param on both sides, U (m×k) + s (k) +
    V (n×k) with no bias, decimal MB, and the ratio of the exact byte counts rounded to the nearest
    integer (4096×17408 is 103.6 → 104, so it is not truncation; ratios of the rounded MB columns
    would give 52 and 94 for rows 2 and 3, so it is not computed from them either)."""
    layer = SpectralLinear(m, n, 32, bias=False, device="meta")
    spectral = spectral_param_count(layer)
    assert spectral == 32 * (m + n + 1)
    dense_bytes, sct_bytes = BYTES_PER_PARAM * m * n, BYTES_PER_PARAM * spectral
    dense_digits = 1 if dense_bytes < 1e8 else 0
    assert f"{dense_bytes / 1e6:,.{dense_digits}f}" == dense_mb
    assert f"{sct_bytes / 1e6:.1f}" == sct_mb
    assert round(dense_bytes / sct_bytes) == ratio
    assert f"{dense_bytes / sct_bytes:.0f}" == str(ratio)  # SCT prints ratios with :.0f


# ---------------------------------------------------------------------------------------------
# (b) the 70B-architecture stack


class SCT70BLayer(nn.Module):
    """SCT's simplified 70B layer: q, k, v, o (d×d), gate/up (d→ffn), down (ffn→d), two RMSNorms."""

    def __init__(self, d: int, ffn: int, rank: int, device=None) -> None:
        super().__init__()
        lin = lambda i, o: SpectralLinear(i, o, rank, bias=False, init="sct", device=device)  # noqa: E731
        self.input_layernorm = nn.RMSNorm(d, device=device)
        self.post_attention_layernorm = nn.RMSNorm(d, device=device)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(d, d) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = lin(d, ffn), lin(d, ffn), lin(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.o_proj(self.q_proj(h) + self.k_proj(h) + self.v_proj(h))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def test_sct_70b_parameter_count():
    stack = nn.ModuleList(SCT70BLayer(8192, 28672, 32, device="meta") for _ in range(80))
    total = spectral_param_count(stack)
    dense_equivalent = sum(m.in_features * m.out_features for m in stack.modules() if isinstance(m, SpectralLinear))
    assert total == 452_216_320
    # SCT's "dense equivalent" counts the projections only (dense_total = (4·d² + 3·d·ffn)·layers)
    assert dense_equivalent == 77_846_282_240
    assert f"{dense_equivalent / 1e9:.1f}B" == "77.8B" and f"{dense_equivalent / total:.0f}x" == "172x"
    assert f"{total * BYTES_PER_PARAM / 1e6:,.1f} MB" == "7,235.5 MB"  # SCT's printed "memory"
    assert all(p.device.type == "meta" for p in stack.parameters())


def test_sct_70b_layer_runs_at_small_width():
    """The same layer code is a real, trainable module (checked at a small width)."""
    torch.manual_seed(0)
    layer = SCT70BLayer(64, 160, 8)
    x = torch.randn(1, 8, 64)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


# ---------------------------------------------------------------------------------------------
# (c) SCT's from-scratch MLP proof


def spectral_mlp(d_in: int, hidden: int, d_out: int, rank: int) -> nn.Sequential:
    """SCT's SpectralMLP: three spectral layers (rank capped by the layer), ReLU, init U, V random
    orthonormal and s = 1."""
    return nn.Sequential(
        SpectralLinear(d_in, hidden, min(rank, d_in), init="sct"), nn.ReLU(),
        SpectralLinear(hidden, hidden, rank, init="sct"), nn.ReLU(),
        SpectralLinear(hidden, d_out, min(rank, d_out), init="sct"),
    )


def train_sct(model: nn.Module, loss_fn, steps: int, lr: float) -> None:
    """AdamW + SCT retraction (Householder QR with sign correction) after every step; fixed rank.
    Weight decay is off and the lr follows a cosine decay: at this size that is what makes the final
    loss reliable across seeds (with SCT's constant lr and weight decay 0.01, one seed in eight
    still ended at MSE 7.7e-4 after 2000 steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    attach_retraction(opt, model, method="householder")
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        schedule.step()


def assert_factors_orthonormal(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, SpectralLinear):
            for p in m.factors():
                assert float(orthonormality_error(p)) <= 1e-5  # fp32 QR: ~1e-6, see test_stiefel.py


def test_sct_mlp_learns_sine():
    """SCT: hidden 64, rank 16, 200 points on [-π, π]; SCT reports MSE 1.7e-5 after 2000 steps at
    lr 1e-2. Here 600 steps at lr 2e-2 with cosine decay. Measured with this exact code over seeds
    0–29: median MSE 1.0e-5, worst 5.3e-5; seed 0 (below) ends at 1.3e-5, 7× inside the bound."""
    torch.manual_seed(0)
    X = torch.linspace(-math.pi, math.pi, 200).unsqueeze(1)
    Y = torch.sin(X)
    model = spectral_mlp(1, 64, 1, rank=16)
    train_sct(model, lambda m: F.mse_loss(m(X), Y), steps=600, lr=2e-2)
    with torch.no_grad():
        mse = F.mse_loss(model(X), Y).item()
    assert mse < 1e-4
    assert_factors_orthonormal(model)
    assert model[2].rank == 16  # fixed rank


def test_sct_mlp_learns_xor():
    """SCT: hidden 32, rank 16, BCE, 100% accuracy. 200 steps at lr 1e-2 (cosine): measured with this
    exact code over seeds 0–29, every run is 100% accurate with a worst logit margin of 1.86
    (seed 0: 2.2); the test also asks for a margin > 1."""
    torch.manual_seed(0)
    X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    Y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    model = spectral_mlp(2, 32, 1, rank=16)
    train_sct(model, lambda m: F.binary_cross_entropy_with_logits(m(X), Y), steps=200, lr=1e-2)
    with torch.no_grad():
        logits = model(X)
    assert torch.equal((logits > 0).float(), Y)  # 100% accuracy
    assert float(((2 * Y - 1) * logits).min()) > 1.0  # and not by a hair
    assert_factors_orthonormal(model)
