"""Block replay: run a stack of blocks (a transformer's layers) one block at a time on cached inputs.

Sequential calibration needs every layer's inputs as the *partly converted* model produces them. Running
the whole model for each stage of layers costs about ``stages / 2`` full passes. When every target layer
lies in one block of an ``nn.ModuleList`` (a decoder's ``layers``), the inputs of the current block can
be kept for every calibration batch instead — ``tokens × hidden`` floats plus each batch's keyword
inputs (rotary tables, masks) — and each stage then runs only its own block: about three block passes
per block for a Llama MLP (two stopped stages and one full pass to the next block's inputs), a few full
passes in all.

``find_blocks`` finds the list, ``block_inputs`` captures the first block's inputs (one pass, stopped
there), ``run_block`` replays a block on them (to the next block's inputs, or stopped early by a hook).
A block's output is its first positional output (a tensor, or the first item of a tuple); its other
positional and keyword inputs are passed on unchanged to the next block. Key/value caches are dropped
(every replay is a fresh forward).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

BlockInput = tuple[tuple, dict]  # (positional, keyword) inputs of one block for one calibration batch
CACHE_KEYS = ("cache", "past_key_value", "past_key_values", "layer_past")


class StopForward(Exception):
    """Raised from a forward hook to end a pass once the wanted inputs have been seen."""


def stop_forward(module: nn.Module, *hook_args) -> None:
    """A forward pre-hook or forward hook that ends the pass (``StopForward``)."""
    raise StopForward


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """``(name, list)`` of the outermost ``nn.ModuleList`` such that every module in ``names`` lies inside
    one of its items (``<name>.<index>.<...>``), or None."""
    names = list(names)
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not names:
            continue
        head = f"{prefix}." if prefix else ""

        def inside(n: str) -> bool:
            index, _, rest = n[len(head):].partition(".")
            return n.startswith(head) and index.isdigit() and int(index) < len(module) and rest != ""
        if all(inside(n) for n in names):
            return prefix, module
    return None


def block_index(list_name: str, name: str) -> int:
    """The index of the block that holds module ``name`` (``find_blocks``' list named ``list_name``)."""
    head = f"{list_name}." if list_name else ""
    return int(name[len(head):].split(".")[0])


def _fresh(kwargs: dict) -> dict:
    """The keyword inputs without key/value caches (a replay is a fresh forward)."""
    out = {}
    for key, value in kwargs.items():
        if key in CACHE_KEYS or type(value).__name__.endswith("Cache"):
            value = None
        elif key == "use_cache":
            value = False
        out[key] = value
    return out


@torch.no_grad()
def block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[Tensor],
                 loss_fn: Callable[[nn.Module, Tensor], Tensor]) -> list[BlockInput]:
    """The inputs ``loss_fn(model, batch)`` gives block ``first``, one per batch (each pass stops there)."""
    seen: list[BlockInput] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), _fresh(kwargs)))
        raise StopForward

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        stopped_passes(model, batches, loss_fn)
    finally:
        handle.remove()
    return seen


def stopped_passes(model: nn.Module, batches: Iterable[Tensor], loss_fn: Callable[[nn.Module, Tensor], Tensor],
                   after_batch: Callable[[], None] | None = None) -> None:
    """``loss_fn(model, batch)`` for every batch, each pass ended early where a hook raises ``StopForward``;
    ``after_batch`` is called after each."""
    for batch in batches:
        try:
            loss_fn(model, batch)
        except StopForward:
            pass
        if after_batch is not None:
            after_batch()


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput], stop_at: nn.Module | None = None,
              after_batch: Callable[[], None] | None = None) -> list[BlockInput] | None:
    """Replay ``block`` on each cached input. With ``stop_at`` (a submodule) every replay ends when it is
    about to run (its pre-hooks registered earlier still run) and None is returned; without, the block's
    outputs as the next block's inputs. ``after_batch`` is called after each replay."""
    handle = None if stop_at is None else stop_at.register_forward_pre_hook(stop_forward)
    out: list[BlockInput] = []
    try:
        for args, kwargs in inputs:
            try:
                y = block(*args, **kwargs)
                hidden = y[0] if isinstance(y, (tuple, list)) else y
                out.append(((hidden,) + tuple(args[1:]), kwargs))
            except StopForward:
                pass
            if after_batch is not None:
                after_batch()
    finally:
        if handle is not None:
            handle.remove()
    return None if stop_at is not None else out
