"""Reading the DeepSpeed checkpoints that ``DeepSpeedEngine.save`` writes, safely and without an engine.

Layout: ``save(path)`` writes ``path/<TAG>/`` with one ``*model_states.pt`` per rank (client state,
ZeRO stage, full parameters at stages 0–2, parameter shapes) and one ``*optim_states.pt`` per rank
(optimizer partitions; at ZeRO-3 also the only copy of the parameters, as fp32 flat partitions).

DeepSpeed's own loader calls ``torch.load(weights_only=False)``, which runs whatever code a hostile
file carries. Every file of stages 0–3 loads with ``weights_only=True`` once DeepSpeed's three
checkpoint classes (``CHECKPOINT_GLOBALS``) are allow-listed; the engine installs
``weights_only_loader`` as its checkpoint loader, and restores state bitwise with it
(``tests/test_deepspeed_engine.py``).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor

from tsvd.engine.ds_config import zero_stage
from tsvd.errors import UserError, unpickler_reason

#: Checkpoint tag: ``save(path)`` writes ``path/<TAG>/...``.
TAG = "deepspeed"
#: What DeepSpeed pickles besides tensors and containers; allow-listed for ``weights_only`` loads.
CHECKPOINT_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


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
    """Every parameter in the checkpoint that ``DeepSpeedEngine.save`` wrote into ``path``: full, fp32, on
    CPU, by name (tied parameters under each name), without an engine or a process group (``tsvd export``).

    Stages 0–2 keep full parameters in the model states. ZeRO-3 keeps only each rank's fp32 partitions:
    every parameter, in ``param_shapes`` order, holds ``ceil(numel / ranks)`` values of each rank's flat
    groups (zero-padded at its end), which are put back together here."""
    file, states = model_states(path)
    if zero_stage(states.get("ds_config", {}), str(file)) < 3:
        return {name: t.detach().float().clone() for name, t in states["module"].items()}
    directory = file.parent
    shards = sorted(directory.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                    key=lambda f: int(f.name.split("_")[3]))
    flats = [torch.cat(weights_only_loader(str(f), map_location="cpu")["optimizer_state_dict"]["fp32_flat_groups"])
             for f in shards]
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
