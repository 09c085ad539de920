"""A Llama-style decoder whose projections are spectral (``W = V diag(s) Uᵀ``) or dense by config.

    tokens (B,T) ─► tok_emb ─► n_layers × [x += attn(attn_norm(x)); x += mlp(mlp_norm(x))]
                 ─► norm ─► lm_head (or tok_emb transposed) ─► logits (B,T,V) ─► cross-entropy

- RMSNorm, rotary position embeddings (HF Llama "rotate-half" layout, so exported q/k weights need
  no permutation), grouped-query causal attention (SDPA), SwiGLU MLP, no biases.
- Submodule names are an API used by the rank controller, the engines and the exporter:
  ``tok_emb``, ``layers.{i}.attn_norm``, ``layers.{i}.attn.{q,k,v,o}``, ``layers.{i}.mlp_norm``,
  ``layers.{i}.mlp.{gate,up,down}``, ``norm``, ``lm_head`` (absent with tied embeddings).
- Every projection named in ``cfg.spectral.targets`` is a ``SpectralLinear`` (``embed``: a
  ``SpectralEmbedding``); the others are dense. Inits: normal(0, ``init_std``), residual
  projections ``o`` and ``down`` at ``init_std/√(2·n_layers)`` (GPT-2); spectral layers match
  these stds in expectation (``init="scaled"``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsvd.config import BLOCK_OF, ModelConfig, check_model, initial_rank, layer_shapes
from tsvd.errors import UserError
from tsvd.spectral import SpectralEmbedding, SpectralLinear, SpectralModule

PROJECTIONS = tuple(BLOCK_OF)  # the blocks' projection types: q, k, v, o (attn), gate, up, down (mlp)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim (statistics in fp32)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``(max_seq_len, head_dim/2)``: angle ``t · θ^(-2i/head_dim)``, fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs ``(x[i], x[i + hd/2])`` of ``x (B,H,T,hd)`` by the angles in ``cos, sin (T,hd/2)``.

    A rotation: norms are preserved and ``⟨rope(q, m), rope(k, n)⟩`` depends on ``m − n`` only.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Grouped-query causal self-attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads."""

    def __init__(self, cfg: ModelConfig, proj) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.q, self.k, self.v, self.o = proj("q"), proj("k"), proj("v"), proj("o")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # kv head j serves query heads j·rep … (j+1)·rep − 1
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, proj) -> None:
        super().__init__()
        self.gate, self.up, self.down = proj("gate"), proj("up"), proj("down")

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, cfg: ModelConfig, proj, device=None, dtype=None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.attn = Attention(cfg, proj)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.mlp = MLP(proj)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(idx (B,T), targets (B,T) | None) -> (logits (B,T,V), mean CE | None)``."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        sp, shapes = cfg.spectral, layer_shapes(cfg)
        factory = dict(device=device, dtype=dtype)

        def proj(target: str, std: float | None = None, layer: int | None = None) -> nn.Module:
            """The projection ``target`` (of block ``layer``; shape from ``layer_shapes``): spectral if targeted,
            else dense."""
            out_f, in_f = shapes[target]
            if std is None:
                residual = target in ("o", "down")
                std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std
            if target in sp.targets:
                rank = target_rank(cfg, target, layer)
                return SpectralLinear(in_f, out_f, rank, bias=False, init=sp.init, std=std, **factory)
            lin = nn.Linear(in_f, out_f, bias=False, **factory)
            init_normal_(lin.weight, std)
            return lin

        if "embed" in sp.targets:
            self.tok_emb = SpectralEmbedding(cfg.vocab_size, cfg.dim, target_rank(cfg, "embed"), init=sp.init,
                                             std=cfg.init_std, **factory)
        else:
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, **factory)
            init_normal_(self.tok_emb.weight, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg, functools.partial(proj, layer=i), **factory)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, **factory)
        if not cfg.tie_embeddings:
            self.lm_head = proj("lm_head", std=cfg.init_std)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def logits(self, h: Tensor) -> Tensor:
        """Output head ``(B,T,dim) → (B,T,V)``: ``lm_head``, or the (tied) embedding transposed."""
        if not self.cfg.tie_embeddings:
            return self.lm_head(h)
        if isinstance(self.tok_emb, SpectralEmbedding):
            return self.tok_emb.project(h)
        return F.linear(h, self.tok_emb.weight)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise UserError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.tok_emb(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.logits(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


def init_normal_(weight: Tensor, std: float) -> None:
    """normal(0, std) in place; skipped on meta tensors (no values to fill, and meta init is slow)."""
    if weight.device.type != "meta":
        nn.init.normal_(weight, 0.0, std)


def target_rank(cfg: ModelConfig, target: str, layer: int | None = None) -> int:
    """Initial rank of a spectral ``target`` (in block ``layer``; validated by ``check_model_config``)."""
    return initial_rank(cfg, target, layer)[0]


def check_model_config(cfg: ModelConfig) -> None:
    """``tsvd.config.check_model`` with the vocabulary known (a config may leave it to the data)."""
    if cfg.vocab_size <= 0:
        raise UserError(f"model.vocab_size: must be > 0 to build a model, got {cfg.vocab_size} "
                        "(0 means 'from the prepared data': load the data first)")
    check_model(cfg)


def build_model(cfg: ModelConfig, device=None, dtype=None) -> Transformer:
    """A freshly initialised ``Transformer``; ``device="meta"`` sizes it without allocating."""
    return Transformer(cfg, device=device, dtype=dtype)


def count_params(model: Transformer) -> dict[str, int]:
    """Parameter counts (works on meta). Two partitions of ``total``:
    ``embedding + lm_head + linear + norm`` (``linear``: the blocks' q,k,v,o,gate,up,down) and
    ``spectral + dense`` (``spectral``: every parameter of a spectral layer)."""
    def n(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    linear = sum(n(m) for name, m in model.named_modules()
                 if name.startswith("layers.") and name.rsplit(".", 1)[-1] in PROJECTIONS)
    norm = n(model.norm) + sum(n(blk.attn_norm) + n(blk.mlp_norm) for blk in model.layers)
    spectral = sum(n(m) for m in model.modules() if isinstance(m, SpectralModule))
    total = n(model)
    return {
        "total": total,
        "embedding": n(model.tok_emb),
        "lm_head": n(model.lm_head) if hasattr(model, "lm_head") else 0,
        "linear": linear,
        "norm": norm,
        "spectral": spectral,
        "dense": total - spectral,
    }
