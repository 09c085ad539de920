"""What the DeepSpeed engine tests and their worker share: a tiny spectral model, its config, its data.

The model is the real ``tsvd.model`` decoder at toy size. Its factor shapes are chosen so that
several have an odd element count (ffn 35 × rank 5, vocab 37 × rank 7): ZeRO-3 must pad those when
it partitions them over two ranks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from tsvd.config import Config, ModelConfig, SpectralConfig
from tsvd.model import build_model
from tsvd.optim import lr_multiplier as schedule

VOCAB, DIM, FFN, SEQ = 37, 24, 35, 8
BATCH, GRAD_ACCUM = 4, 2  # global rows per micro-batch, micro-batches per step
SHRUNK = "layers.0.mlp.up"  # the layer the rank-change test shrinks (apply_rank_change)
GROWN = "layers.0.mlp.gate"  # the layer it grows (apply_rank_plan)
POISONED_S = "layers.0.attn.q"  # the layer whose s an update makes non-finite (poison_s)
POISONED_FACTOR = "layers.0.mlp.down.U"  # the factor the non-finite parameter check finds


def tiny_model(seed: int = 0) -> nn.Module:
    """A one-block spectral decoder; ``model.poison = True`` makes this process's loss infinite (to test
    that a non-finite loss on one rank skips the step on all)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=FFN, max_seq_len=16,
                      tie_embeddings=False,
                      spectral=SpectralConfig(targets=["q", "k", "v", "o", "gate", "up", "down", "lm_head"], rank=5,
                                              rank_overrides={"lm_head": 7}))
    model = build_model(cfg)
    model.poison = False
    model.register_forward_hook(lambda m, args, out: (out[0], out[1] * math.inf) if m.poison else out)
    return model


def make_config(ds_config: str | None = None, dtype: str = "float32") -> Config:
    cfg = Config()
    t = cfg.train
    t.batch_size, t.seq_len, t.grad_accum, t.steps, t.warmup_steps = BATCH, SEQ, GRAD_ACCUM, 20, 2
    t.lr = t.spectral_lr = t.core_lr = 1e-2
    t.grad_clip, t.threads, t.dtype = 1.0, 1, dtype
    if ds_config is not None:
        cfg.engine.kind, cfg.engine.deepspeed_config, cfg.engine.timeout_s = "deepspeed", ds_config, 60
    return cfg


def batches(step: int, cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global micro-batches of ``step``: sequences of x ↦ 3x + 1 mod VOCAB from random starts."""
    out = []
    for i in range(cfg.train.grad_accum):
        g = torch.Generator().manual_seed(1000 * step + i)
        x = torch.randint(VOCAB, (cfg.train.batch_size, 1), generator=g)
        seq = [x]
        for _ in range(cfg.train.seq_len):
            seq.append((3 * seq[-1] + 1) % VOCAB)
        seq = torch.cat(seq, dim=1)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def lr_multiplier(step: int) -> float:
    return schedule(step, make_config().train)


def broadcast_list(engine, value: list | None) -> list:
    """Rank 0's ``value`` on every rank."""
    import deepspeed.comm as dist

    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


@contextlib.contextmanager
def poison_s(engine, enabled: bool = True, layer: str = POISONED_S):
    """While active, every optimizer update writes an infinity into element 0 of ``layer``'s fp32 ``s`` —
    where the optimizer keeps it: the parameter itself (``TorchEngine``), or the DeepSpeed engine's fp32
    master piece that holds element 0 (every rank's at stage 0; one rank's partition at ZeRO 1–3, so the
    other ranks see it only through ZeRO)."""
    if not enabled:
        yield
        return
    s = engine.model.get_submodule(layer).s
    masters = getattr(engine, "masters", None)

    def hook(optimizer, args, kwargs) -> None:
        if masters is None:
            s.data[0] = math.inf
            return
        piece = masters.piece(s)
        if piece is not None and piece.start == 0:
            piece.values[0] = math.inf

    optimizer = engine.adam.base if masters is not None else engine.optimizer
    handle = optimizer.register_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def sloppy_retraction(enabled: bool = True):
    """While active, every Cholesky-QR result is slightly non-orthonormal (R⁻¹ scaled by 1 + 1e-3): a
    stand-in for a retraction gone wrong, which a measured retraction must repair (Householder QR)."""
    if not enabled:
        yield
        return
    from tsvd import stiefel

    real = stiefel.cholesky_r

    def sloppy(G):
        R, R_inv, ok = real(G)
        return R, R_inv * (1 + 1e-3), ok

    stiefel.cholesky_r = sloppy
    try:
        yield
    finally:
        stiefel.cholesky_r = real


def spec_step(engine, cfg: Config, step: int, spec: dict):
    """Training step ``step`` as a worker spec describes it (the same for ``DeepSpeedEngine`` ranks and the
    one-process ``TorchEngine`` reference): ``poison`` makes the last rank's loss infinite, ``poison_s``
    overflows one ``s`` in the update, ``sloppy`` spoils the Cholesky-QR results of a measured retraction."""
    engine.model.poison = step == spec.get("poison") and engine.rank == engine.world_size - 1
    with poison_s(engine, step == spec.get("poison_s")), sloppy_retraction(step == spec.get("sloppy")):
        return engine.train_step(batches(step, cfg), lr_multiplier(step), measure=step == spec.get("sloppy"))
