"""DeepSpeed engine: data parallel over any number of processes, ZeRO stages 0–3, CPU (gloo) or GPUs (nccl).

It mirrors ``TorchEngine``'s semantics — same AdamW parameter groups and learning rates, same
clipping, same guards ("non-finite loss or gradient ⇒ no update", "an update making any ``s``
non-finite is undone for every ``s``", ``tsvd.engine.core_guard``), same retraction — so the trainer
cannot tell them apart, and a run on N processes follows the single-process run up to rounding.

Invariants after every ``train_step`` (and after ``load`` / ``apply_rank_change``):

* every rank holds bitwise identical parameters;
* every spectral factor is orthonormal, both in the copy the next forward uses and in the fp32 master
  copy the optimizer updates (ZeRO 1–3 keep a separate one; writing only the working copy would be
  undone by the next step, DESIGN §5);
* every parameter is contiguous.

Retraction work is spread over ranks: each factor has one owner (assigned once, balancing the
Cholesky-QR cost ``rows·rank²``); the owner retracts it with the shared ``Retractor`` and broadcasts
the result. Stage 0 never re-synchronizes replicas by itself, so broadcasting from owners is also what
keeps its factors bitwise equal across ranks.

What the trainer should know:

* The DeepSpeed JSON (``engine.deepspeed_config``) selects ZeRO stage and communication options. The
  batch keys (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
  ``train_batch_size``) and ``gradient_clipping`` are always filled from ``train.*``; the optimizer is
  built here (``tsvd.optim``: per-component groups) and the lr is set every step, so the JSON must not
  carry ``optimizer`` or ``scheduler``. Precision: ``train.dtype: bfloat16`` is torch autocast with
  fp32 parameters (as in ``TorchEngine``), i.e. the JSON's ``torch_autocast`` section; DeepSpeed's
  ``bf16``/``fp16`` modes (low-precision parameters) are refused — the retraction must read and write
  the fp32 master, which those modes keep out of reach.
* Checkpoints are DeepSpeed checkpoints (one directory per ``save``), loaded with
  ``torch.load(weights_only=True)``. ``client_state`` must therefore hold only plain containers,
  numbers, strings and tensors.
* ``apply_rank_plan`` / ``apply_rank_change`` rebuild the DeepSpeed engine: ``engine.model`` stays the
  same object, but its submodules and parameters are new (re-read them; do not cache them).
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state
from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor, nn
from torch.nn import functional as F

from tsvd import distributed
from tsvd.config import Config
from tsvd.controller import RankChange, RankPlan
from tsvd.engine.base import Batch, Engine, StepResult
from tsvd.engine.core_guard import CoreSnapshot, bad_cores_reason, finite_flags
from tsvd.engine.ds_config import resolve_ds_config, zero_stage
from tsvd.errors import UserError, unpickler_reason
from tsvd.optim import build_adamw, set_lr
from tsvd.retraction import RetractionReport, Retractor, spectral_factors
from tsvd.sketch import GradientSketch
from tsvd.spectral import SpectralModule, spectral_ranks
from tsvd.surgery import apply_plan

#: Checkpoint tag: ``save(path)`` writes ``path/<TAG>/...``.
TAG = "deepspeed"
#: Bound on the bytes of ZeRO-3 factors gathered at once for the retraction.
GATHER_BYTES = 256 * 2**20
#: Adam's state tensors, as torch.optim.AdamW names them.
MOMENTS = ("exp_avg", "exp_avg_sq")
#: DeepSpeed's step counters (saved in its checkpoints, carried over by a rebuild).
COUNTERS = ("global_steps", "global_samples", "skipped_steps")
#: What DeepSpeed pickles besides tensors and containers; allow-listed for ``weights_only`` loads.
CHECKPOINT_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
#: ``surgery_fn(model, optimizer_state)`` for ``apply_rank_change``; see there.
Surgery = Callable[[nn.Module, dict[str, dict[str, Tensor]]], None]


# --------------------------------------------------------------------------------------------
# Small pure helpers


def assign_owners(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """Give each item to a rank so that the summed costs are balanced (greedy, largest first).

    Deterministic: every rank computes the same assignment from the same ``costs``.
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def retraction_cost(shape: tuple[int, ...]) -> int:
    """Cholesky-QR flops of an ``m×r`` factor, up to a constant: ``m·r²``."""
    m, r = shape
    return m * r * r


def make_contiguous_(model: nn.Module) -> None:
    """Row-major storage for every parameter (DeepSpeed's flattening needs it; DESIGN §5)."""
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


def full_numel(p: nn.Parameter) -> int:
    """Element count of the whole parameter (ZeRO-3 keeps only a partition in ``p.data``)."""
    return getattr(p, "ds_numel", p.numel())


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def zero3_local_slice(p: nn.Parameter, full: Tensor) -> Tensor:
    """This rank's part of ``full`` in ZeRO-3's partitioning of ``p``.

    The flat value is zero-padded to ``partition size × partitions`` and cut at this rank's index.
    ``safe_set_full_*`` skip the padding and fail when ``numel % world_size != 0`` (DESIGN §5).
    """
    n, group = p.ds_tensor.numel(), p.ds_process_group
    flat = full.reshape(-1)
    padded = F.pad(flat, (0, n * dist.get_world_size(group=group) - flat.numel()))
    return padded.narrow(0, n * dist.get_rank(group=group), n)


def zero3_valid_part(p: nn.Parameter) -> Tensor:
    """This rank's ZeRO-3 partition of ``p`` without the zero padding past the parameter's end."""
    n, rank = p.ds_tensor.numel(), dist.get_rank(group=p.ds_process_group)
    return p.ds_tensor.reshape(-1).narrow(0, 0, max(0, min(n, full_numel(p) - n * rank)))


def weights_only_loader(path: str, map_location=None) -> dict:
    """``torch.load`` with ``weights_only=True`` for DeepSpeed's checkpoint files (no code runs on load).
    A file holding anything else (a hostile or foreign pickle) is refused with a ``UserError`` naming it."""
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"{path}: refused: it holds objects other than tensors, plain containers and "
                            f"DeepSpeed's checkpoint classes ({unpickler_reason(e)}); not loaded") from None


def _model_states(path: Path) -> tuple[Path, dict]:
    """(file, contents) of the first model-states file of the checkpoint ``DeepSpeedEngine.save`` wrote
    into ``path`` (every rank's holds the same client state and layout)."""
    directory = Path(path) / TAG
    files = sorted(directory.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{directory}: no DeepSpeed model states (not a checkpoint of the DeepSpeed engine)")
    return files[0], weights_only_loader(str(files[0]), map_location="cpu")


def read_client_state(path: Path) -> dict:
    """The ``client_state`` that ``DeepSpeedEngine.save`` stored in ``path``, without building an engine."""
    return _model_states(path)[1]["tsvd_client_state"]


def read_full_params(path: Path) -> dict[str, Tensor]:
    """Every parameter in the checkpoint that ``DeepSpeedEngine.save`` wrote into ``path``: full, fp32, on
    CPU, by name (tied parameters under each name), without an engine or a process group (``tsvd export``).

    Stages 0–2 keep full parameters in the model states. ZeRO-3 keeps only each rank's fp32 partitions:
    every parameter, in ``param_shapes`` order, holds ``ceil(numel / ranks)`` values of each rank's flat
    groups (zero-padded at its end), which are put back together here."""
    file, states = _model_states(path)
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


class NamedState:
    """Name-keyed optimizer state seen through the ``optimizer.state[param]`` interface that
    ``tsvd.surgery`` uses; updates land in the underlying per-name dicts."""

    def __init__(self, model: nn.Module, by_name: dict[str, dict[str, Tensor]]) -> None:
        self.state = {p: by_name[n] for n, p in model.named_parameters() if n in by_name}


@dataclass
class TrainingState:
    """Everything a rebuild must carry over, as plain full CPU tensors (identical on all ranks)."""

    params: dict[str, Tensor]  # by parameter name (tied parameters once)
    moments: dict[str, dict[str, Tensor]]  # name -> {"exp_avg", "exp_avg_sq"}; empty before the first step
    adam_step: int  # optimizer steps applied (AdamW's bias-correction counter)
    lrs: list[float]  # param_groups' current lr, in group order
    counters: dict[str, int]  # DeepSpeed's COUNTERS


# --------------------------------------------------------------------------------------------
# The engine


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines come from every rank
        info = distributed.launch_info()
        distributed.configure_threads(distributed.threads_per_rank(cfg.train.threads, info.local_world_size))
        distributed.init_process_group(cfg.engine.timeout_s, info.local_rank)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._check_device(cfg.train.device)
        self.ds_config = resolve_ds_config(cfg, self.world_size)
        self.stage = zero_stage(self.ds_config)
        self.grad_accum = cfg.train.grad_accum
        self._initialize(model)

    @staticmethod
    def _check_device(requested: str) -> None:
        actual = get_accelerator().device_name()
        if requested not in ("auto", actual) and torch.device(requested).type != actual:
            raise UserError(f"train.device: {requested!r}, but DeepSpeed selected the {actual!r} accelerator "
                            f"(set DS_ACCELERATOR={torch.device(requested).type} before launching)")

    # ---- construction ------------------------------------------------------------------

    def _initialize(self, model: nn.Module) -> None:
        """Wrap a plain module: same start on every rank, fresh optimizer, ``deepspeed.initialize``."""
        make_contiguous_(model)
        self._broadcast_module(model)
        self.skeleton = meta_skeleton(model)
        factors = spectral_factors(model)
        self.owners = assign_owners({n: retraction_cost(tuple(p.shape)) for n, p in factors.items()}, self.world_size)
        optimizer = build_adamw(model, self.cfg.train, get_accelerator().device_name())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.engine.checkpoint_engine.load = weights_only_loader
        self.model = self.engine.module
        self.device = self.engine.device
        self.retractor = Retractor(self.model, self.cfg.train.retraction, self.cfg.train.lazy_tol)
        # What every step reads, fixed until the next rebuild (ZeRO keeps these parameter objects).
        self.factors = list(spectral_factors(self.model).items())
        self.cores = {n: m.s for n, m in self.model.named_modules() if isinstance(m, SpectralModule)}
        names = [g.get("name") for g in self.optimizer.param_groups]
        self.cores_group = names.index("cores") if "cores" in names else None

    @torch.no_grad()
    def _broadcast_module(self, model: nn.Module) -> None:
        """Move ``model`` to this rank's device and give it rank 0's parameters and buffers (ZeRO-3 would
        otherwise partition each rank's own initialization)."""
        model.to(get_accelerator().current_device_name())
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)

    # ---- training ----------------------------------------------------------------------

    def _shard(self, t: Tensor) -> Tensor:
        return t[self.rank::self.world_size].to(self.device)

    def _all_mean(self, local_sum: Tensor, count: int) -> float:
        """``Σ over ranks of local_sum / (count · world_size)``: the global mean of per-batch means."""
        total = local_sum.detach().float().clone()
        dist.all_reduce(total)
        return float(total) / (count * self.world_size)

    def train_step(self, micro_batches: list[Batch], lr_multiplier: float, measure: bool = False) -> StepResult:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; DeepSpeed was set up for "
                             f"train.grad_accum={self.grad_accum}")
        set_lr(self.optimizer, lr_multiplier)
        self.engine.train()
        local, last = torch.zeros((), device=self.device), len(micro_batches) - 1
        for i, (x, y) in enumerate(micro_batches):
            _, loss = self.engine(self._shard(x), self._shard(y))
            local += loss.detach().float()
            if i == last:
                mean_loss = self._all_mean(local, len(micro_batches))
                if not math.isfinite(mean_loss):
                    loss = loss * math.nan  # every rank's gradient turns non-finite: all skip alike
            self.engine.backward(loss)
            if i < last:
                self.engine.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
        before = CoreSnapshot.take(self._core_tensors(), self._base_optimizer())
        grad_norm, skipped = self._optimizer_step()
        if skipped:
            return StepResult(mean_loss, grad_norm, True, RetractionReport())
        bad = self._non_finite_cores()
        if bad:  # keep the old s (and its Adam state) on every rank; the factors keep their update
            before.restore_(self._base_optimizer())
        report = self._retract(measure)
        if bad:
            return StepResult(mean_loss, grad_norm, True, report, reason=bad_cores_reason(bad))
        return StepResult(mean_loss, grad_norm, False, report)

    def _core_tensors(self) -> list[Tensor]:
        """Every tensor of this rank that an optimizer step writes for the ``cores`` group (the ``s``):
        the fp32 tensors AdamW updates — the ``s`` themselves at stage 0, this rank's flat partition of
        the group under ZeRO (one per sub-group at stage 3) — and the working copies ZeRO derives from
        them: the full ``s`` at stages 1–2, the local partition (plus the full copy of a persistent ``s``)
        at stage 3. Full copies are given as the parameters: ZeRO-3 swaps a persistent one's ``.data``
        when it re-gathers it after the step, and a restore must write into the current storage."""
        group, cores = self.cores_group, list(self.cores.values())
        if group is None:
            return []
        if self.stage == 0:
            return cores
        if self.stage in (1, 2):
            return [self.optimizer.single_partition_of_fp32_groups[group]] + cores
        masters = [flat for sub, flat in enumerate(self.optimizer.fp32_partitioned_groups_flat)
                   if self.optimizer.sub_group_to_group_id[sub] == group]
        return masters + [s.ds_tensor for s in cores] + [s for s in cores if s.ds_persist]

    def _non_finite_cores(self) -> list[str]:
        """Names of the spectral modules whose ``s`` holds a NaN or an infinity (the same on every rank)."""
        return self._non_finite(self.cores)

    def non_finite_parameters(self) -> list[str]:
        return self._non_finite(dict(self.model.named_parameters()))

    @torch.no_grad()
    def _non_finite(self, params: dict[str, nn.Parameter]) -> list[str]:
        """Names of ``params`` holding a NaN or an infinity, the same list on every rank: stages 0–2 see
        full copies, identical everywhere; at stage 3 each rank checks its partition and the verdicts
        are combined (one small all-reduce)."""
        seen = [zero3_valid_part(p) if self.stage == 3 else p.data for p in params.values()]
        bad = (~finite_flags(seen)).to(device=self.device, dtype=torch.int32)
        if self.stage == 3 and self.world_size > 1:
            dist.all_reduce(bad)
        return [n for n, b in zip(params, bad.tolist()) if b]

    def _optimizer_step(self) -> tuple[float, bool]:
        """The boundary ``engine.step()``; returns (gradient norm before clipping, skipped). ZeRO 1–3
        compute the norm and skip non-finite steps themselves (consistently over ranks); stage 0 does
        neither, so it is done here."""
        if self.stage == 0:
            norm, skipped = self._clip_or_drop_grads()
            self.engine.step()
            self.engine.skipped_steps += int(skipped)  # counted as DeepSpeed counts its own skips
            return norm, skipped
        self.engine.step()
        skipped = not self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        return (math.nan if skipped or norm is None else float(norm)), skipped

    def _clip_or_drop_grads(self) -> tuple[float, bool]:
        """Stage 0, after the all-reduce: clip like ``TorchEngine``; a non-finite norm drops every gradient,
        so the optimizer (which skips parameters without a gradient) applies nothing. Same on all ranks:
        the gradients were all-reduced."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip or math.inf))
        if math.isfinite(norm):
            return norm, False
        for p in params:
            p.grad = None
        return norm, True

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        self.engine.eval()
        local = torch.zeros((), device=self.device)
        for x, y in batches:
            local += self.engine(self._shard(x), self._shard(y))[1].float()
        return self._all_mean(local, max(1, len(batches)))

    # ---- retraction --------------------------------------------------------------------

    @torch.no_grad()
    def _retract(self, measure: bool) -> RetractionReport:
        """Orthonormalize every factor — each by its owner — and leave the result, identical on every
        rank, in both the working parameters and the fp32 master."""
        t0 = time.perf_counter()
        factors = self.factors
        if self.stage == 3:
            for chunk in chunks_by_bytes(factors, GATHER_BYTES):
                with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=0):
                    self._retract_owned_and_share(chunk, measure)
                    for _, p in chunk:
                        safe_set_local_fp32_param(p, zero3_local_slice(p, p.data))
                # leaving the context re-broadcasts from rank 0 (identical by now) and re-partitions
        else:
            self._retract_owned_and_share(factors, measure)
            if self.stage in (1, 2):
                for _, p in factors:
                    safe_set_full_fp32_param(p, p.data)
        report = self._merge_reports([n for n, _ in factors])
        report.seconds = time.perf_counter() - t0
        return report

    def _retract_owned_and_share(self, factors: list[tuple[str, nn.Parameter]], measure: bool) -> None:
        """Retract this rank's factors among ``factors`` (full tensors in ``p.data``), then broadcast each
        rank's results so that every rank holds all of them."""
        self.retractor(only=[n for n, _ in factors if self.owners[n] == self.rank], measure_error=measure)
        if self.world_size == 1:
            return
        for owner in range(self.world_size):
            owned = [p for n, p in factors if self.owners[n] == owner]
            if not owned:
                continue
            flat = torch.cat([p.data.reshape(-1) for p in owned])
            dist.broadcast(flat, owner)
            if owner != self.rank:
                for p, piece in zip(owned, flat.split([p.numel() for p in owned])):
                    p.data.copy_(piece.view_as(p))

    def _merge_reports(self, names: list[str]) -> RetractionReport:
        """Share every owner's cache entries (one small all-reduce) so that each rank's ``retractor.cache``
        and the returned report (retracted, fallbacks, repairs, drift) cover all factors."""
        rows = []
        for name in names:
            c = self.retractor.cache[name]
            rows.append([c.drift, float(c.householder), float(c.skipped), float(c.repaired),
                         math.nan if c.error is None else c.error] if self.owners[name] == self.rank else [0.0] * 5)
        stats = torch.tensor(rows, dtype=torch.float64, device=self.device).reshape(len(names), 5)
        if self.world_size > 1:
            stats = stats.nan_to_num(nan=-1.0)
            dist.all_reduce(stats)
            stats[:, 4] = torch.where(stats[:, 4] == -1.0, torch.full_like(stats[:, 4], math.nan), stats[:, 4])
        report = RetractionReport()
        for name, (d, householder, skipped, repaired, error) in zip(names, stats.tolist()):
            c = self.retractor.cache[name]
            c.drift, c.householder, c.skipped, c.repaired = d, bool(householder), bool(skipped), bool(repaired)
            c.error = None if math.isnan(error) else error
            report.max_drift = max(report.max_drift, d)
            if not c.skipped:
                report.retracted.append(name)
            if c.householder:
                report.fallbacks.append(name)
            if c.repaired:
                report.repaired.append(name)
        return report

    # ---- observation -------------------------------------------------------------------

    @torch.no_grad()
    def spectra(self) -> dict[str, Tensor]:
        cores = {n: m.s for n, m in self.model.named_modules() if isinstance(m, SpectralModule)}
        with deepspeed.zero.GatheredParameters(list(cores.values()), modifier_rank=None, enabled=self.stage == 3):
            return {n: s.detach().float().cpu().clone() for n, s in cores.items()}

    @torch.no_grad()
    def sketch_factors(self, layers: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """ZeRO-3: the layers' factors gathered and copied (a few at a time is the caller's choice: the
        controller sketches only the layers about to grow); other stages hold them whole."""
        if self.stage != 3:
            return super().sketch_factors(layers)
        modules = dict(self.model.named_modules())
        pairs = {name: (modules[name].U, modules[name].V) for name in layers}
        gathered = [p for pair in pairs.values() for p in pair]
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None):
            return {name: (U.detach().clone(), V.detach().clone()) for name, (U, V) in pairs.items()}

    # ---- checkpoints -------------------------------------------------------------------

    def save(self, path: Path, client_state: dict) -> None:
        """All ranks: a DeepSpeed checkpoint under ``path/deepspeed`` with ``client_state`` and the model's
        per-layer ranks (``read_client_state`` reads the client state back without an engine)."""
        state = {"tsvd_client_state": client_state, "tsvd_spectral_ranks": spectral_ranks(self.model)}
        self.engine.save_checkpoint(str(path), tag=TAG, client_state=state, save_latest=False)

    def load(self, path: Path) -> dict:
        """All ranks: restore parameters, optimizer state and step counters bitwise; returns ``client_state``.

        The model must already have the checkpoint's per-layer ranks (build it from
        the ``ranks`` in the checkpoint's ``meta.json``, as the trainer does)."""
        load_path, state = self.engine.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {Path(path) / TAG}")
        saved, current = state["tsvd_spectral_ranks"], spectral_ranks(self.model)
        if saved != current:
            diff = {n: (saved.get(n), current.get(n)) for n in sorted(set(saved) | set(current))
                    if saved.get(n) != current.get(n)}
            raise UserError(f"{path}: checkpoint ranks differ from the model's (checkpoint, model): {diff}")
        return state["tsvd_client_state"]

    # ---- rank change -------------------------------------------------------------------

    def apply_rank_plan(self, plan: RankPlan, sketch: GradientSketch | None = None) -> list[RankChange]:
        """``tsvd.surgery.apply_plan`` through ``apply_rank_change``: resized on rank 0 (random growth
        seeded as in ``TorchEngine``), broadcast, engine rebuilt. Every rank
        returns the same changes. A ``sketch`` is first summed over ranks, so rank 0 reads the gradient
        of the whole global batch."""
        if sketch is not None:
            self._sum_sketch(sketch)
        changes: list[RankChange] = []

        def surgery(model: nn.Module, optimizer_state: dict[str, dict[str, Tensor]]) -> None:
            if sketch is not None:  # read the current factors from the copy (ZeRO-3's live ones are partitioned)
                sketch.modules = {n: m for n, m in model.named_modules() if isinstance(m, SpectralModule)}
            state = NamedState(model, optimizer_state)
            changes.extend(apply_plan(model, state, plan, sketch, seed=self.cfg.seed))

        self.apply_rank_change(surgery)
        box = [changes]
        dist.broadcast_object_list(box, 0)
        return box[0]

    @torch.no_grad()
    def _sum_sketch(self, sketch: GradientSketch) -> None:
        """Each rank sketched its own rows; the sketches are linear in the gradient (sums over tokens)
        with test matrices drawn identically on every rank, so their sum is the global batch's sketch."""
        for name in sorted(sketch.sketches):
            sk = sketch.sketches[name]
            tokens = torch.tensor([float(sk.tokens)], dtype=sk.Y.dtype, device=sk.Y.device)
            for t in (sk.Y, sk.Z, tokens):
                dist.all_reduce(t)
            sk.tokens = int(tokens.item())

    def apply_rank_change(self, surgery_fn: Surgery) -> None:
        """Change parameter shapes (e.g. per-layer ranks) by rebuilding the DeepSpeed engine. All ranks
        call it at a step boundary.

        1. Gather full parameters and Adam moments into plain CPU tensors (collective).
        2. On rank 0 only, build a plain CPU copy of the model and call
           ``surgery_fn(model, optimizer_state)`` with ``optimizer_state = {param name: {"exp_avg": m,
           "exp_avg_sq": v}}`` (empty before the first step). It must mutate both in place: give
           parameters new data (``SpectralModule.truncate_`` / ``grow_``) and replace each affected moment
           with one of the new shape (kept columns keep theirs, new columns start at zero). It must not
           add or remove parameters.
        3. Broadcast the result from rank 0, destroy the old engine, initialize a fresh one on the new
           module and restore moments, Adam's step count, every group's lr and DeepSpeed's counters.

        ``self.model`` stays the same object (its contents are replaced, ``adopt_``); its submodules and
        parameters are new objects. Memory: every rank holds a full CPU copy of the parameters and
        moments during the rebuild.
        """
        state = self.gather_training_state()
        model = materialize(self.skeleton, state.params)
        self._run_on_main(lambda: surgery_fn(model, state.moments))
        self._broadcast_surgery(model, state.moments, set(state.params))
        root = self.model
        self._teardown()
        adopt_(root, model)
        self._initialize(root)
        self._restore(state)

    def _run_on_main(self, fn: Callable[[], None]) -> None:
        """``fn()`` on rank 0; if it raises, every rank raises (instead of the others waiting in the next
        collective until the process-group timeout)."""
        error: BaseException | None = None
        if self.rank == 0:
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

    def gather_training_state(self) -> TrainingState:
        """Full parameters and Adam state as plain CPU tensors, identical on every rank (collective)."""
        named = list(self.model.named_parameters())
        params: dict[str, Tensor] = {}
        for chunk in chunks_by_bytes(named, GATHER_BYTES):
            gathered = [p for _, p in chunk]
            with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=self.stage == 3):
                params.update({n: p.detach().cpu().clone() for n, p in chunk})
        adam_step, moments = self._adam_step(), {}
        if adam_step > 0:
            self._relink_zero12_state()
            moments = {n: {k: self._full_moment(p, k) for k in MOMENTS} for n, p in named}
        counters = {k: int(getattr(self.engine, k)) for k in COUNTERS}
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        return TrainingState(params, moments, adam_step, lrs, counters)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW doing the update (ZeRO wraps it; stage 0 uses it directly)."""
        return self.optimizer.optimizer if self.stage > 0 else self.optimizer

    def _adam_step(self) -> int:
        steps = {int(s["step"]) for s in self._base_optimizer().state.values() if "step" in s}
        if len(steps) > 1:
            raise RuntimeError(f"AdamW step counts differ between parameters: {sorted(steps)}")
        return steps.pop() if steps else 0

    def _relink_zero12_state(self) -> None:
        """Point ZeRO-1/2's per-parameter views of the optimizer state at the current state tensors.

        DeepSpeed 0.19.8 creates those views once, right after the *first* param group's first step,
        when the other groups have no state yet (``safe_*_optimizer_state`` then fail for them), and
        never again, although ``load_checkpoint`` replaces the state tensors. Re-linking is idempotent.
        """
        if self.stage in (1, 2):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _full_moment(self, p: nn.Parameter, key: str) -> Tensor:
        if self.stage == 0:
            return self._base_optimizer().state[p][key].detach().cpu().clone()
        return safe_get_full_optimizer_state(p, key).detach().reshape(full_shape(p)).cpu().clone()

    @torch.no_grad()
    def _broadcast_surgery(self, model: nn.Module, moments: dict[str, dict[str, Tensor]], names: set[str]) -> None:
        """Make every rank's ``model`` and ``moments`` equal to rank 0's (new shapes first, then values).
        ``names``: the parameter names before the surgery, which it must not change."""
        params = dict(model.named_parameters())
        shapes = [{n: tuple(p.shape) for n, p in params.items()},
                  {n: {k: tuple(t.shape) for k, t in m.items()} for n, m in moments.items()}]
        dist.broadcast_object_list(shapes, 0)
        if set(shapes[0]) != names:  # every rank sees rank 0's names: all raise together
            raise RuntimeError("surgery_fn added or removed parameters; only their shapes and values may change")
        if self.rank != 0:
            moments.clear()
        for name in sorted(params):
            p = params[name]
            p.data = self._broadcast_from_main(p.data if self.rank == 0 else p.data.new_empty(shapes[0][name]))
        for name in sorted(shapes[1]):
            for key in sorted(shapes[1][name]):
                value = moments[name][key] if self.rank == 0 else torch.empty(shapes[1][name][key])
                moments.setdefault(name, {})[key] = self._broadcast_from_main(value)

    def _broadcast_from_main(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` (same shape and dtype on every rank), sent through the communication device
        (nccl only moves GPU tensors) and returned on ``t``'s device."""
        buf = t.to(self.device)
        dist.broadcast(buf, 0)
        return buf.to(t.device)

    def _teardown(self) -> None:
        """Release the DeepSpeed engine; ZeRO-3 also keeps its module on a global stack (a leak, DESIGN §5)."""
        from deepspeed.runtime.zero import parameter_offload

        old = self.engine.module
        self.engine.destroy()
        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not old]
        del self.engine, self.optimizer, self.model, self.retractor, self.factors, self.cores

    def _restore(self, state: TrainingState) -> None:
        """Put Adam's moments and step, the lrs and DeepSpeed's counters back into a fresh engine."""
        if state.adam_step > 0:
            self._create_adam_state()
            self._relink_zero12_state()
            named = dict(self.model.named_parameters())
            for name, moments in state.moments.items():
                for key, value in moments.items():
                    self._set_full_moment(named[name], key, value.to(self.device))
            for s in self._base_optimizer().state.values():
                s["step"].fill_(state.adam_step)
        for group, lr in zip(self.optimizer.param_groups, state.lrs):
            group["lr"] = lr
        for key, value in state.counters.items():
            setattr(self.engine, key, value)

    def _create_adam_state(self) -> None:
        """One optimizer step at lr 0 on a zero loss: AdamW allocates its state and changes no parameter
        (``p·(1 − 0·wd) − 0·update = p`` exactly). Runs ``grad_accum`` micro-steps to reach the boundary."""
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.engine.eval()
        tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        for _ in range(self.grad_accum):
            self.engine.backward(self.engine(tokens, tokens)[1] * 0.0)
            self.engine.step()

    def _set_full_moment(self, p: nn.Parameter, key: str, value: Tensor) -> None:
        if self.stage == 0:
            self._base_optimizer().state[p][key].copy_(value)
        elif self.stage == 3:
            safe_set_local_optimizer_state(p, zero3_local_slice(p, value), key)
        else:
            safe_set_full_optimizer_state(p, value, key)

    # ---- lifecycle ---------------------------------------------------------------------

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Destroy the DeepSpeed engine and the process group (the object is unusable afterwards)."""
        self._teardown()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
