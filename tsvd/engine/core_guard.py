"""The non-finite ``s`` guard shared by both engines: undo one optimizer update of the spectral cores.

Before the update an engine takes a ``CoreSnapshot`` of every tensor the update writes for the cores
(the ``s`` parameters, or ZeRO's fp32 partition of their group, and their AdamW state: ``r`` values per
layer, kilobytes even at 70B scale). If the update leaves some ``s`` non-finite, ``restore_`` puts them
all back, so the step's update of every ``s`` is discarded while factors and dense weights keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CoreSnapshot:
    """Copies of ``tensors`` and of their optimizer state (``None``: the tensor had no state yet).

    AdamW's ``step`` counter is not part of it: every parameter keeps one shared count (the DeepSpeed
    engine rebuilds on it), so a discarded update leaves the moments as they were and the count advanced.
    """

    tensors: list[Tensor]
    values: list[Tensor]
    states: list[dict | None]

    @classmethod
    def take(cls, tensors: list[Tensor], optimizer: torch.optim.Optimizer) -> CoreSnapshot:
        values = [t.detach().clone() for t in tensors]
        states = [{k: v.clone() for k, v in optimizer.state[t].items() if k != "step" and torch.is_tensor(v)}
                  if t in optimizer.state else None for t in tensors]
        return cls(list(tensors), values, states)

    @torch.no_grad()
    def restore_(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the copies back in place; state created by the update (none before) is zeroed, as AdamW
        creates it."""
        for t, value, state in zip(self.tensors, self.values, self.states):
            t.copy_(value)
            current = optimizer.state.get(t, {})
            for k, v in current.items():
                if k == "step" or not torch.is_tensor(v):
                    continue
                if state is None:
                    v.zero_()
                else:
                    v.copy_(state[k])


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """``(len(tensors),)`` bool on the tensors' device: no NaN and no infinity in each (one sync to read).

    One pass per tensor and no temporary of its size: a NaN anywhere makes its min and max NaN, an
    infinity is its max or min. ``isfinite(t).all()`` would build a full-size boolean temporary per
    tensor (both timed by bench/guards.py; docs/results.md)."""
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    return torch.stack([torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all() if t.numel()
                        else torch.ones((), dtype=torch.bool, device=t.device) for t in tensors])


def bad_cores_reason(names: list[str]) -> str:
    """``StepResult.reason`` for a step whose update made the ``s`` of ``names`` non-finite."""
    return f"non-finite s after the update in {', '.join(names)}: the step's update of every s was discarded"
