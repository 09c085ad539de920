"""Parameters under ZeRO: full shapes of partitioned parameters, this rank's slice of a full value,
gathering in bounded chunks, and plain-module copies of a model that DeepSpeed has wrapped.

ZeRO-3 keeps only a partition of each parameter in ``p.data`` (``p.ds_tensor``); the full shape and
element count are ``p.ds_shape`` / ``p.ds_numel``. Stages 0–2 keep full parameters, and the helpers
here fall back to ``p.shape`` / ``p.numel()`` for them.
"""

from __future__ import annotations

import copy
from typing import Iterator

import deepspeed.comm as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: Bound on the bytes of ZeRO-3 parameters gathered at once (retraction, state gathering).
GATHER_BYTES = 256 * 2**20


def full_numel(p: nn.Parameter) -> int:
    """Element count of the whole parameter (ZeRO-3 keeps only a partition in ``p.data``)."""
    return getattr(p, "ds_numel", p.numel())


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Shape of the whole parameter (ZeRO-3 keeps only a partition in ``p.data``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def chunks_by_bytes(params: list[tuple[str, nn.Parameter]], limit: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Consecutive groups of ``params`` of at most ``limit`` bytes each (a larger one alone)."""
    group, size = [], 0
    for name, p in params:
        nbytes = full_numel(p) * p.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append((name, p))
        size += nbytes
    if group:
        yield group


def zero3_local_slice(p: nn.Parameter, full: Tensor) -> Tensor:
    """This rank's part of ``full`` in ZeRO-3's partitioning of ``p``.

    The flat value is zero-padded to ``partition size × partitions`` and cut at this rank's index.
    DeepSpeed 0.19.8's ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` ignore that
    padding and fail when ``numel % world_size != 0`` (an odd rank on two processes, for example), so
    the engine writes this slice with the ``safe_set_local_*`` setters instead.
    """
    n, group = p.ds_tensor.numel(), p.ds_process_group
    flat = full.reshape(-1)
    padded = F.pad(flat, (0, n * dist.get_world_size(group=group) - flat.numel()))
    return padded.narrow(0, n * dist.get_rank(group=group), n)


def zero3_partition(p: nn.Parameter) -> tuple[int, int]:
    """``(start, count)``: this rank's ZeRO-3 partition of ``p`` holds elements ``start … start + count``
    of the flattened full value (``count`` excludes the zero padding past the parameter's end)."""
    n, rank = p.ds_tensor.numel(), dist.get_rank(group=p.ds_process_group)
    return n * rank, max(0, min(n, full_numel(p) - n * rank))


def make_contiguous_(model: nn.Module) -> None:
    """Row-major storage for every parameter. ``deepspeed.initialize`` flattens parameters through
    byte views and fails on a column-major one ("self.stride(-1) must be 1 to view Float as Byte");
    LAPACK's QR returns column-major ``Q``."""
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters live on the meta device (no memory), buffers kept.

    Taken before ``deepspeed.initialize`` (ZeRO-3 rewrites the module's parameters); ``materialize``
    turns it back into a plain module with given values.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    """A plain module shaped like ``skeleton`` holding ``values`` (by parameter name). Tied parameters
    (one tensor under two names) stay tied."""
    model = copy.deepcopy(skeleton)
    fresh: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in fresh:
            fresh[id(p)] = nn.Parameter(values[name].clone(), requires_grad=p.requires_grad)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = fresh[id(p)]
    return model


def adopt_(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` *be* ``source``: same class, and ``source``'s whole instance state (submodules,
    parameters, buffers, hooks, attributes) replaces ``target``'s — including anything DeepSpeed
    attached to ``target``. Holders of ``target`` (the trainer's ``model``) stay valid."""
    if type(target) is not type(source):
        raise TypeError(f"cannot adopt a {type(source).__name__} into a {type(target).__name__}")
    target.__dict__.clear()
    target.__dict__.update(source.__dict__)
