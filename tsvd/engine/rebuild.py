"""What a DeepSpeed engine rebuild (a rank change) carries over, and how the ranks agree on it.

A rank change alters parameter shapes, which DeepSpeed cannot do in place: the engine gathers the full
training state (``TrainingState``), rank 0 resizes a plain copy of the model, every rank receives rank
0's result (``broadcast_surgery``), and a fresh DeepSpeed engine gets the state back. ``ZeroAdamState``
reads and writes Adam's per-parameter state at any ZeRO stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import deepspeed.comm as dist
import torch
from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state, safe_set_local_optimizer_state
from torch import Tensor, nn

from tsvd.engine.mixed_precision import MasterWeights
from tsvd.engine.zero_params import full_shape, zero3_local_slice

#: Adam's state tensors, as torch.optim.AdamW names them.
MOMENTS = ("exp_avg", "exp_avg_sq")
#: DeepSpeed's step counters (saved in its checkpoints, carried over by a rebuild).
COUNTERS = ("global_steps", "global_samples", "skipped_steps")


@dataclass
class TrainingState:
    """Everything a rebuild must carry over, as plain full CPU tensors (identical on all ranks)."""

    params: dict[str, Tensor]  # by parameter name (tied parameters once)
    moments: dict[str, dict[str, Tensor]]  # name -> {"exp_avg", "exp_avg_sq"}; empty before the first step
    adam_step: int  # optimizer steps applied (AdamW's bias-correction counter)
    lrs: list[float]  # param_groups' current lr, in group order
    counters: dict[str, int]  # DeepSpeed's COUNTERS
    loss_scaler: object = None  # ZeRO's loss scaler (fp16: the dynamic scale and its history), carried as is


class NamedState:
    """Name-keyed optimizer state seen through the ``optimizer.state[param]`` interface that
    ``tsvd.surgery`` uses; updates land in the underlying per-name dicts."""

    def __init__(self, model: nn.Module, by_name: dict[str, dict[str, Tensor]]) -> None:
        self.state = {p: by_name[n] for n, p in model.named_parameters() if n in by_name}


class ZeroAdamState:
    """Adam's per-parameter state behind DeepSpeed's ``optimizer`` at ZeRO ``stage``, read and written as
    full tensors. Reads at stages 1–3 are collectives: every rank calls them in the same order. At stage 0
    AdamW's state is keyed by the tensor it updates, ``masters.master(p)`` (``p`` itself in fp32)."""

    def __init__(self, optimizer: torch.optim.Optimizer, stage: int, masters: MasterWeights) -> None:
        self.optimizer, self.stage, self.masters = optimizer, stage, masters

    @property
    def base(self) -> torch.optim.Optimizer:
        """The torch AdamW doing the update (ZeRO and the 16-bit stage-0 optimizer wrap it; fp32 stage 0
        uses it directly)."""
        return self.optimizer.optimizer if isinstance(self.optimizer, DeepSpeedOptimizer) else self.optimizer

    def step_count(self) -> int:
        """Optimizer steps applied so far (0 before the first; the same for every parameter)."""
        steps = {int(s["step"]) for s in self.base.state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"AdamW step counts differ between parameters: {sorted(steps)}")
        return steps.pop() if steps else 0

    def relink(self) -> None:
        """Point ZeRO-1/2's per-parameter views of the optimizer state at the current state tensors.

        DeepSpeed 0.19.8 creates those views once, right after the *first* param group's first step,
        when the other groups have no state yet (``safe_*_optimizer_state`` then fail for them), and
        never again, although ``load_checkpoint`` replaces the state tensors. Re-linking is idempotent.
        """
        if self.stage in (1, 2):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def get(self, p: nn.Parameter, key: str) -> Tensor:
        """The full ``key`` moment of ``p`` as a CPU copy (call ``relink`` first)."""
        if self.stage == 0:
            return self.base.state[self.masters.master(p)][key].detach().cpu().clone()
        return safe_get_full_optimizer_state(p, key).detach().reshape(full_shape(p)).cpu().clone()

    def set(self, p: nn.Parameter, key: str, value: Tensor) -> None:
        """Write the full ``value`` (the same on every rank) as ``p``'s ``key`` moment."""
        if self.stage == 0:
            self.base.state[self.masters.master(p)][key].copy_(value)
        elif self.stage == 3:
            safe_set_local_optimizer_state(p, zero3_local_slice(p, value), key)
        else:
            safe_set_full_optimizer_state(p, value, key)


def run_on_main(fn: Callable[[], None]) -> None:
    """``fn()`` on rank 0; if it raises, every rank raises (instead of the others waiting in the next
    collective until the process-group timeout)."""
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, 0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise RuntimeError(f"rank change failed on rank 0: {box[0]}")


def broadcast_from_main(t: Tensor, device: torch.device) -> Tensor:
    """Rank 0's ``t`` (same shape and dtype on every rank), sent through the communication ``device``
    (nccl only moves GPU tensors) and returned on ``t``'s device."""
    buf = t.to(device)
    dist.broadcast(buf, 0)
    return buf.to(t.device)


@torch.no_grad()
def broadcast_surgery(model: nn.Module, moments: dict[str, dict[str, Tensor]], names: set[str],
                      device: torch.device) -> None:
    """Make every rank's ``model`` and ``moments`` equal to rank 0's (new shapes first, then values).
    ``names``: the parameter names before the surgery, which it must not change."""
    rank = dist.get_rank()
    params = dict(model.named_parameters())
    shapes = [{n: tuple(p.shape) for n, p in params.items()},
              {n: {k: tuple(t.shape) for k, t in m.items()} for n, m in moments.items()}]
    dist.broadcast_object_list(shapes, 0)
    if set(shapes[0]) != names:  # every rank sees rank 0's names: all raise together
        raise RuntimeError("surgery_fn added or removed parameters; only their shapes and values may change")
    if rank != 0:
        moments.clear()
    for name in sorted(params):
        p = params[name]
        p.data = broadcast_from_main(p.data if rank == 0 else p.data.new_empty(shapes[0][name]), device)
    for name in sorted(shapes[1]):
        for key in sorted(shapes[1][name]):
            value = moments[name][key] if rank == 0 else torch.empty(shapes[1][name][key])
            moments.setdefault(name, {})[key] = broadcast_from_main(value, device)
