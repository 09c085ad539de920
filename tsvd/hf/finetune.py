"""Fine-tuning and evaluation of a model with spectral layers (a Hugging Face causal LM or tsvd's
``Transformer``) on a 1-D token tensor.

A step is ``TorchEngine.train_step`` — the trainer's single-process step — with ``lm_loss`` as its
loss: per-component AdamW groups, the warmup + cosine schedule, autocast (``train.dtype``), clipping,
the non-finite loss / gradient / core guards, and the retraction that follows every applied step (of
every factor, or with ``train.retract_every = k`` of the factors due; a skipped step leaves factors and
optimizer state untouched). ``finetune`` retracts every factor exactly before it hands the model back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsvd.config import Config, TrainConfig
from tsvd.engine.base import StepResult
from tsvd.engine.torch_engine import TorchEngine
from tsvd.errors import UserError
from tsvd.optim import lr_multiplier


def lm_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits ``(B,T,V)`` of a HF causal LM or a tsvd ``Transformer`` for inputs ``x`` ``(B,T)``."""
    out = model(input_ids=x, use_cache=False) if hasattr(model, "config") and hasattr(model.config, "to_dict") \
        else model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def lm_loss(model: nn.Module, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy (fp32, ``"mean"`` or ``"sum"`` over the tokens) of ``lm_logits(model, x)``
    against ``y`` ``(B,T)``: ``TorchEngine``'s ``loss_fn`` for HF models."""
    return F.cross_entropy(lm_logits(model, x).flatten(0, 1).float(), y.flatten(), reduction=reduction)


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
    ``tokens`` (each window predicts ``seq_len`` tokens, on the model's device). Perplexity is ``exp(loss)``."""
    n = (tokens.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"need more than {seq_len + 1} tokens for one evaluation window, got {tokens.numel()}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        starts = torch.arange(b, min(n, b + batch_size)) * seq_len
        w = tokens[starts[:, None] + torch.arange(seq_len + 1)].long().to(device)
        total += float(lm_loss(model, w[:, :-1], w[:, 1:], reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count, count


class FineTuner:
    """One optimizer step at a time on a model with spectral layers (HF or a tsvd ``Transformer``),
    through ``TorchEngine`` on the model's own device.

    AdamW over tsvd's per-component groups (``train.spectral_lr`` for ``U``/``V``, ``train.core_lr``
    for ``s``, ``train.lr`` for dense weights; frozen parameters are skipped), the warmup + cosine
    schedule of ``train``, gradient clipping, and the engine's retraction after every applied step. With
    ``train.retract_every > 1`` some factors are left for later: ``retract_all`` before reading ``s`` as
    the spectrum, evaluating or saving.
    """

    def __init__(self, model: nn.Module, train: TrainConfig) -> None:
        self.train = train
        device = next(model.parameters()).device
        self.engine = TorchEngine(Config(train=replace(train, device=str(device))), model, loss_fn=lm_loss)
        self.steps_done = 0
        self.skipped: list[int] = []  # 1-based numbers of the steps whose update was discarded

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    def step(self, micro_batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, float, float]:
        """One ``TorchEngine.train_step`` over the micro-batches at this step's learning rate. Returns
        ``(mean loss, retraction seconds, max factor drift before the retraction)``; a skipped step
        (non-finite loss, gradient norm or ``s``) is recorded in ``skipped``."""
        result: StepResult = self.engine.train_step(list(micro_batches), lr_multiplier(self.steps_done, self.train))
        self.steps_done += 1
        if result.skipped:
            self.skipped.append(self.steps_done)
        return result.loss, result.retraction.seconds, result.retraction.max_drift

    def retract_all(self) -> float:
        """Make every factor exactly orthonormal again (a no-op in strict mode); returns its seconds."""
        return self.engine.retract_all().seconds


@dataclass
class FinetuneResult:
    losses: list[float]
    seconds: float
    retraction_seconds: float
    max_drift: float  # largest ‖AᵀA − I‖_F a step left before its retraction
    skipped: list[int] = field(default_factory=list)  # 1-based steps whose update was discarded


def finetune(model: nn.Module, tokens: Tensor, train: TrainConfig, *, seed: int = 0,
             callback: Callable[[int, float, float], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` for ``train.steps`` steps (``FineTuner``) on random windows of a 1-D token
    tensor (``train.batch_size × train.seq_len``, ``train.grad_accum`` micro-batches per step).
    ``callback(step, loss, seconds)`` runs after every step. The model is handed back with every factor
    exactly orthonormal (``FineTuner.retract_all``, also with ``train.retract_every > 1``) and in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    tuner = FineTuner(model, train)
    losses: list[float] = []
    t_start, t_retract, max_drift = time.perf_counter(), 0.0, 0.0
    try:
        for step in range(train.steps):
            t0 = time.perf_counter()
            micro = [sample_batch(tokens, train.batch_size, train.seq_len, gen) for _ in range(train.grad_accum)]
            loss, retract_s, drift = tuner.step(micro)
            t_retract += retract_s
            max_drift = max(max_drift, drift)
            losses.append(loss)
            if callback is not None:
                callback(step + 1, loss, time.perf_counter() - t0)
        t_retract += tuner.retract_all()
    finally:
        model.eval()
    return FinetuneResult(losses, time.perf_counter() - t_start, t_retract, max_drift, tuner.skipped)
