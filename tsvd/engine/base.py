"""The interface the trainer drives. An engine owns the model's parameters, the optimizer and the
retraction; the trainer owns data, schedule, metrics, rank control and checkpoint cadence.

Batches are *global*: ``train_step`` receives the full micro-batches of one optimizer step, and
a multi-process engine takes its own slice (rows ``rank::world_size``), so a run's data order does
not depend on the number of processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from tsvd.retraction import RetractionReport

if TYPE_CHECKING:
    from tsvd.controller import RankChange, RankPlan
    from tsvd.sketch import GradientSketch

Batch = tuple[Tensor, Tensor]  # (inputs (B,T), targets (B,T)), int64


@dataclass
class StepResult:
    loss: float  # mean loss over the global batch (all micro-batches, all ranks)
    grad_norm: float  # global gradient norm before clipping
    skipped: bool  # a bad step: non-finite loss or gradient (no update applied), or non-finite s (see reason)
    retraction: RetractionReport
    reason: str = ""  # why a step was skipped, when not the loss or gradient


class Engine(ABC):
    """One optimizer step at a time; see the module docstring for the division of labour."""

    model: nn.Module  # the unwrapped tsvd model (module names as in tsvd.model)
    rank: int = 0
    world_size: int = 1
    timings: dict[str, float] = {}  # the last step's phase times the trainer logs (e.g. perf/forward_backward_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def train_step(self, micro_batches: list[Batch], lr_multiplier: float, measure: bool = False) -> StepResult:
        """Forward/backward over the micro-batches, clip, AdamW step at ``base_lr · lr_multiplier``,
        retract. ``measure=True`` also measures post-retraction orthonormality (for logging)."""

    @abstractmethod
    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean loss over the given (global) batches, no gradients."""

    @abstractmethod
    def non_finite_parameters(self) -> list[str]:
        """Names of the parameters holding a NaN or an infinity (the same list on every rank; collective)."""

    @abstractmethod
    def spectra(self) -> dict[str, Tensor]:
        """``{module name: s}`` for every spectral module (full, on CPU, identical on every rank)."""

    @abstractmethod
    def core_grad_sq(self) -> dict[str, Tensor]:
        """``{module name: AdamW's running mean of (∂L/∂s)²}`` (its ``exp_avg_sq``, not bias-corrected),
        shaped like ``s``, fp32 on CPU, identical on every rank; zeros before the first step. Read by the
        controller's Fisher score (``rank.score: fisher``)."""

    @abstractmethod
    def retract_all(self, measure: bool = False) -> RetractionReport:
        """Make every spectral factor exactly orthonormal again (with ``train.retract_every > 1`` some
        moved since their last retraction; a no-op otherwise). Every rank calls it, before anything reads
        ``s`` as the spectrum or hands the weights on: a rank decision, spectrum statistics, a checkpoint."""

    @abstractmethod
    def apply_rank_plan(self, plan: RankPlan, sketch: GradientSketch | None = None) -> list[RankChange]:
        """Apply a rank decision at a step boundary (every rank calls it): resize the spectral layers
        and their optimizer state as ``tsvd.surgery.apply_plan`` does; returns the changes."""

    @abstractmethod
    def save(self, path: Path, client_state: dict) -> None:
        """Write model + optimizer state and ``client_state`` into the directory ``path``."""

    @abstractmethod
    def load(self, path: Path) -> dict:
        """Restore what ``save`` wrote; returns the ``client_state``."""

    def sketch_factors(self, layers: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (U, V)}``, full, for a ``GradientSketch`` of these spectral layers (every rank calls
        it: collective where the engine partitions parameters)."""
        modules = dict(self.model.named_modules())
        return {name: (modules[name].U, modules[name].V) for name in layers}

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def any_rank(self, flag: bool) -> bool:
        """``True`` on every rank when ``flag`` is true on any rank (collective; one process: ``flag``)."""
        return flag

    def close(self) -> None:
        """Release resources (process groups, engines)."""
