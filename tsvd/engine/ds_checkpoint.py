"""Reading the DeepSpeed checkpoints that ``DeepSpeedEngine.save`` writes, safely and without an engine.

Layout: ``save(path)`` writes ``path/<TAG>/`` with one ``*model_states.pt`` per rank (client state,
ZeRO stage, full parameters at stages 0–2 — 16-bit ones with DeepSpeed's native mixed precision — and
parameter shapes) and, at ZeRO 1–3, one ``*optim_states.pt`` per rank (``bf16_*`` with bf16): the
optimizer's partitions, fp32 masters included; at ZeRO-3 the only copy of the parameters. With 16-bit
parameters at stage 0 the fp32 masters sit in the model states (``optimizer.fp32_groups``, one list per
param group, named by ``MASTER_NAMES``).

DeepSpeed's own loader calls ``torch.load(weights_only=False)``, which runs whatever code a hostile
file carries. Every file of stages 0–3 loads with ``weights_only=True`` once DeepSpeed's four
checkpoint classes (``CHECKPOINT_GLOBALS``) are allow-listed; the engine installs
``weights_only_loader`` as its checkpoint loader, and restores state bitwise with it
(``tests/test_deepspeed_engine.py``).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor

from tsvd.engine.ds_config import native_precision, zero_stage
from tsvd.errors import UserError, unpickler_reason

#: Checkpoint tag: ``save(path)`` writes ``path/<TAG>/...``.
TAG = "deepspeed"
#: Stage 0 with 16-bit parameters: the key under which ``DeepSpeedEngine.save`` stores the names of the
#: fp32 masters (``{"groups": [[name, ...] per param group], "aliases": {tied name: name}}``).
MASTER_NAMES = "tsvd_master_names"
#: What DeepSpeed pickles besides tensors and containers; allow-listed for ``weights_only`` loads.
CHECKPOINT_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loader(path: str, map_location=None) -> dict:
    """``torch.load`` with ``weights_only=True`` for DeepSpeed's checkpoint files (no code runs on load).
    A file holding anything else (a hostile or foreign pickle) is refused with a ``UserError`` naming it."""
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"{path}: refused: it holds objects other than tensors, plain containers and "
                            f"DeepSpeed's checkpoint classes ({unpickler_reason(e)}); not loaded") from None


def model_states(path: Path) -> tuple[Path, dict]:
    """(file, contents) of the first model-states file of the checkpoint ``DeepSpeedEngine.save`` wrote
    into ``path`` (every rank's holds the same client state and layout)."""
    directory = Path(path) / TAG
    files = sorted(directory.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{directory}: no DeepSpeed model states (not a checkpoint of the DeepSpeed engine)")
    return files[0], weights_only_loader(str(files[0]), map_location="cpu")


def read_client_state(path: Path) -> dict:
    """The ``client_state`` that ``DeepSpeedEngine.save`` stored in ``path``, without building an engine."""
    return model_states(path)[1]["tsvd_client_state"]


def read_full_params(path: Path) -> dict[str, Tensor]:
    """Every parameter in the checkpoint that ``DeepSpeedEngine.save`` wrote into ``path``: full, fp32 (the
    masters, with 16-bit parameters), on CPU, by name (tied parameters under each name), without an
    engine or a process group (``tsvd export``); bitwise what the engine's masters held when it saved."""
    file, states = model_states(path)
    config = states.get("ds_config", {})
    stage = zero_stage(config, str(file))
    if stage == 3:
        return _zero3_params(file, states)
    if native_precision(config, str(file)) is None:
        return {name: t.detach().float().clone() for name, t in states["module"].items()}
    if stage == 0:
        names = states[MASTER_NAMES]
        masters = states["optimizer"]["fp32_groups"]
        params = {n: t.detach().clone() for group, ts in zip(names["groups"], masters) for n, t in zip(group, ts)}
        aliases = names["aliases"]
    else:
        params = _zero12_masters(file, states)
        aliases = states.get("shared_params") or {}
    for alias, source in aliases.items():
        params[alias] = params[source]
    return params


def optim_files(directory: Path) -> list[Path]:
    """Every rank's ``*optim_states.pt`` in rank order (DeepSpeed prefixes them ``bf16_`` with bf16)."""
    files = list(directory.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return sorted(files, key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))


def _zero12_masters(file: Path, states: dict) -> dict[str, Tensor]:
    """ZeRO 1–2 with 16-bit parameters: each rank's fp32 partition of each group holds, per parameter,
    the fragment ``param_slice_mappings`` names; a parameter's fragments in rank order are its value."""
    pieces: dict[str, list[Tensor]] = {}
    for f in optim_files(file.parent):
        optim = weights_only_loader(str(f), map_location="cpu")["optimizer_state_dict"]
        for flat, mapping in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    params = {}
    for group in states["param_shapes"]:
        for name, shape in group.items():
            flat = torch.cat(pieces.get(name, []))
            if flat.numel() != math.prod(shape):
                raise UserError(f"{file.parent}: the fp32 partitions hold {flat.numel()} values of {name}, "
                                f"which has {math.prod(shape)} (a layout this reader does not know)")
            params[name] = flat.view(shape).clone()
    return params


def _zero3_params(file: Path, states: dict) -> dict[str, Tensor]:
    """ZeRO-3 keeps only each rank's fp32 partitions: every parameter, in ``param_shapes`` order, holds
    ``ceil(numel / ranks)`` values of each rank's flat groups (zero-padded at its end), which are put
    back together here."""
    directory = file.parent
    flats = [torch.cat(weights_only_loader(str(f), map_location="cpu")["optimizer_state_dict"]["fp32_flat_groups"])
             for f in optim_files(directory)]
    params, offset = {}, 0
    for group in states["param_shapes"]:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = -(-numel // len(flats))
            params[name] = torch.cat([flat.narrow(0, offset, part) for flat in flats])[:numel].view(shape).clone()
            offset += part
    if any(flat.numel() != offset for flat in flats):
        raise UserError(f"{directory}: ZeRO-3 partitions hold {[f.numel() for f in flats]} values per rank, but "
                        f"the parameter shapes account for {offset} (a layout this reader does not know)")
    for alias, source in states.get("shared_params", {}).items():
        params[alias] = params[source]
    return params
