"""Single-device engine: plain PyTorch, no launcher. Fused AdamW + retraction after every applied step
(every factor, or with ``train.retract_every: k`` each factor every k steps: ``Retractor.after_step``).

On ``train.device`` (``auto`` takes CUDA when present; ``tsvd.engine.device``): with ``train.tf32`` the
model's float32 matmuls use TF32 on CUDA, never the retraction's. On CUDA a step returns with the device
synchronised, and its forward/backward time (``timings``) and retraction time (``RetractionReport.seconds``)
are the device's; on the CPU there is no synchronisation and no CUDA call.

``TorchEngine.train_step`` is the one training step of a single process: ``tsvd train`` and Hugging Face
fine-tuning (``tsvd.hf.finetune``, through ``loss_fn``) both take it.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from tsvd.config import Config
from tsvd.controller import RankChange, RankPlan
from tsvd.engine.base import Batch, Engine, StepResult
from tsvd.engine.core_guard import CoreSnapshot, bad_cores_reason, finite_flags
from tsvd.engine.device import Stopwatch, exact_fp32_matmul, resolve_device, set_tf32
from tsvd.errors import UserError, unpickler_reason
from tsvd.optim import build_adamw, set_lr
from tsvd.retraction import RetractionReport, Retractor
from tsvd.sketch import GradientSketch
from tsvd.spectral import SpectralModule
from tsvd.surgery import apply_plan

STATE_FILE = "engine_state.pt"

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, inputs (B,T), targets (B,T)) -> mean loss ()


def model_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The loss of tsvd's ``Transformer``, whose ``forward(x, y)`` returns ``(logits, loss)``."""
    return model(x, y)[1]


class TorchEngine(Engine):
    """``model`` on ``cfg.train.device``; ``loss_fn(model, x, y)`` gives a micro-batch's mean loss (default:
    tsvd's ``Transformer``; any other model, e.g. a Hugging Face causal LM, brings its own)."""

    def __init__(self, cfg: Config, model: nn.Module, loss_fn: LossFn = model_loss) -> None:
        self.cfg, self.device, self.loss_fn = cfg, resolve_device(cfg.train.device), loss_fn
        set_tf32(self.device, cfg.train.tf32)
        self.model = model.to(self.device)
        self.optimizer = build_adamw(self.model, cfg.train, self.device)
        # stack=True: the retractor keeps same-shape factors in shared stacks (batched retraction)
        self.retractor = Retractor(self.model, cfg.train.retraction, cfg.train.lazy_tol,
                                   every=cfg.train.retract_every, stack=True)
        # rank changes resize these modules in place (their parameters may be new objects: read m.s each step)
        self.spectral = {n: m for n, m in self.model.named_modules() if isinstance(m, SpectralModule)}
        self.autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
        self.timings: dict[str, float] = {}  # the last step's perf/forward_backward_s

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        with self._autocast():
            return self.loss_fn(self.model, x.to(self.device), y.to(self.device))

    def train_step(self, micro_batches: list[Batch], lr_multiplier: float, measure: bool = False) -> StepResult:
        set_lr(self.optimizer, lr_multiplier)
        self.model.train()
        total = torch.zeros((), device=self.device)
        with Stopwatch(self.device) as forward_backward:
            for x, y in micro_batches:
                loss = self._loss(x, y)
                (loss / len(micro_batches)).backward()
                total += loss.detach()
        self.timings = {"perf/forward_backward_s": forward_backward.seconds}
        loss = float(total) / len(micro_batches)
        clip = self.cfg.train.grad_clip or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, grad_norm, True, RetractionReport())
        cores = {n: m.s for n, m in self.spectral.items()}
        before = CoreSnapshot.take(list(cores.values()), self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # free gradients before the retraction's temporaries
        bad = [n for n, ok in zip(cores, finite_flags(list(cores.values())).tolist()) if not ok]
        if bad:  # keep the old s (and its Adam state); the factors keep their update and are retracted
            before.restore_(self.optimizer)
        report = self._retract(self.retractor.after_step, measure)
        if bad:
            return StepResult(loss, grad_norm, True, report, reason=bad_cores_reason(bad))
        return StepResult(loss, grad_norm, False, report)

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        self.model.eval()
        losses = [float(self._loss(x, y)) for x, y in batches]
        return sum(losses) / max(1, len(losses))

    def apply_rank_plan(self, plan: RankPlan, sketch: GradientSketch | None = None) -> list[RankChange]:
        """Resize layers and AdamW state in place (``tsvd.surgery.apply_plan``; random growth seeded by
        ``(seed, plan.step)``)."""
        return apply_plan(self.model, self.optimizer, plan, sketch, seed=self.cfg.seed)

    def non_finite_parameters(self) -> list[str]:
        named = dict(self.model.named_parameters())
        return [n for n, ok in zip(named, finite_flags(list(named.values())).tolist()) if not ok]

    def spectra(self) -> dict[str, Tensor]:
        return {n: m.s.detach().float().cpu() for n, m in self.spectral.items()}

    def core_grad_sq(self) -> dict[str, Tensor]:
        state = self.optimizer.state
        return {n: state[m.s]["exp_avg_sq"].detach().float().cpu().clone() if "exp_avg_sq" in state.get(m.s, {})
                else torch.zeros(m.s.shape) for n, m in self.spectral.items()}

    def retract_all(self, measure: bool = False) -> RetractionReport:
        return self._retract(self.retractor.retract_all, measure)

    def _retract(self, retract: Callable[..., RetractionReport], measure: bool) -> RetractionReport:
        """Run ``retract`` in exact float32 (no TF32); on CUDA its ``seconds`` are the device's (synchronised)."""
        with exact_fp32_matmul(self.device), Stopwatch(self.device) as clock:
            report = retract(measure_error=measure)
        if clock.cuda:
            report.seconds = clock.seconds
        return report

    def save(self, path: Path, client_state: dict) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "retraction": self.retractor.state_dict(), "client_state": client_state}, Path(path) / STATE_FILE)

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by ``save`` (read by ``read_state``: tensors and plain containers
        only); any unreadable, refused or mismatching file is a ``UserError`` naming it."""
        file = Path(path) / STATE_FILE
        state = read_state(file, self.device)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "retraction" in state:  # the amortized schedule (absent from checkpoints before it existed)
                self.retractor.load_state_dict(state["retraction"])
            return state["client_state"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip())
            raise UserError(f"{file}: does not fit this model and optimizer ({type(e).__name__}: {detail})") from None


def read_state(file: Path, map_location: torch.device | str = "cpu", mmap: bool = False) -> dict:
    """What ``TorchEngine.save`` wrote into ``file``, read with ``weights_only=True``: a hostile file cannot
    run code. A missing, truncated, foreign or refused file is a ``UserError`` naming it."""
    if not file.is_file():
        raise UserError(f"{file.parent}: no {STATE_FILE} (not a checkpoint of the torch engine, or incomplete)")
    try:
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(f"{file}: refused: it holds objects other than tensors and plain containers, which "
                        f"tsvd never writes ({unpickler_reason(e)}); not loaded") from None
    except Exception as e:  # truncated or not a torch file at all
        raise UserError(f"{file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
