"""DeepSpeed engine: data parallel over any number of processes, ZeRO stages 0–3, CPU (gloo) or GPUs (nccl).

It mirrors ``TorchEngine``'s semantics — same AdamW parameter groups and learning rates, same
clipping, same guards ("non-finite loss or gradient ⇒ no update", "an update making any ``s``
non-finite is undone for every ``s``", ``tsvd.engine.core_guard``), same retraction — so the trainer
cannot tell them apart, and a run on N processes follows the single-process run up to rounding.

Invariants after every ``train_step`` (and after ``load`` / ``apply_rank_change``):

* every rank holds bitwise identical parameters;
* every spectral factor's fp32 master (what the optimizer updates: ``mixed_precision.MasterWeights``)
  is orthonormal, and the copy the next forward uses equals it (fp32) or is its rounding (bf16/fp16
  parameters); an edit of the working copy alone would be overwritten by the next step
  (tests/test_deepspeed_engine.py and tests/test_deepspeed_bf16.py check both copies);
* every parameter is contiguous.

The pieces live beside this module: ``mixed_precision`` (the fp32 masters at every stage and
precision), ``retraction_owners`` (each factor retracted by one owner rank, results broadcast),
``zero_params`` (ZeRO layouts: full shapes, local slices, plain-module copies), ``rebuild`` (the state a
rank change carries over), ``ds_checkpoint`` (reading checkpoints safely, without an engine).

What the trainer should know:

* The DeepSpeed JSON (``engine.deepspeed_config``) selects ZeRO stage and communication options. The
  batch keys (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
  ``train_batch_size``) and ``gradient_clipping`` are always filled from ``train.*``; the optimizer is
  built here (``tsvd.optim``: per-component groups) and the lr is set every step, so the JSON must not
  carry ``optimizer`` or ``scheduler``. Precision (``tsvd.engine.ds_config``): fp32; DeepSpeed's native
  ``bf16`` (or ``fp16``, where the accelerator computes in it) — 16-bit parameters, fp32 masters, which
  the retraction, the checks and rank changes read and write; or torch autocast over fp32 parameters.
* Checkpoints are DeepSpeed checkpoints (one directory per ``save``), loaded with
  ``torch.load(weights_only=True)``. ``client_state`` must therefore hold only plain containers,
  numbers, strings and tensors.
* ``apply_rank_plan`` / ``apply_rank_change`` rebuild the DeepSpeed engine: ``engine.model`` stays the
  same object, but its submodules and parameters are new (re-read them; do not cache them).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from tsvd import distributed
from tsvd.config import Config
from tsvd.controller import RankChange, RankPlan
from tsvd.engine.base import Batch, Engine, StepResult
from tsvd.engine.core_guard import CoreSnapshot, bad_cores_reason, finite_flags
from tsvd.engine.ds_checkpoint import MASTER_NAMES, TAG, read_full_params, weights_only_loader
from tsvd.engine.ds_config import native_precision, read_ds_config, resolve_ds_config, zero_stage
from tsvd.engine.mixed_precision import MasterWeights
from tsvd.engine.rebuild import (COUNTERS, MOMENTS, NamedState, TrainingState, ZeroAdamState, broadcast_surgery,
                                 run_on_main)
from tsvd.engine.retraction_owners import OwnedRetraction
from tsvd.engine.zero_params import adopt_, full_shape, make_contiguous_, materialize, meta_skeleton
from tsvd.errors import UserError
from tsvd.optim import build_adamw, set_lr
from tsvd.retraction import RetractionReport, Retractor, spectral_factors
from tsvd.sketch import GradientSketch
from tsvd.spectral import SpectralModule, spectral_ranks
from tsvd.surgery import apply_plan

#: ``surgery_fn(model, optimizer_state)`` for ``apply_rank_change``; see there.
Surgery = Callable[[nn.Module, dict[str, dict[str, Tensor]]], None]
#: ``read_full_params`` and ``weights_only_loader`` live in ``tsvd.engine.ds_checkpoint``; re-exported for
#: the importers of this module that predate it (``tsvd export``, tests/test_reliability.py).
__all__ = ["DeepSpeedEngine", "Surgery", "read_full_params", "weights_only_loader"]


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.param_dtype = self._check_precision(cfg)
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
    def _check_precision(cfg: Config) -> torch.dtype:
        """The parameters' dtype the JSON asks for; fp16 only where DeepSpeed's accelerator computes in it
        (checked before any process group exists)."""
        source = cfg.engine.deepspeed_config
        dtype = getattr(torch, native_precision(read_ds_config(source), source) or "float32")
        if dtype == torch.float16 and not get_accelerator().is_fp16_supported():
            raise UserError(f"{source}: fp16 is on, but DeepSpeed's {get_accelerator().device_name()} accelerator "
                            f"cannot compute in fp16 on this machine; use bf16 (configs/ds/zero*-bf16.json)")
        return dtype

    @staticmethod
    def _check_device(requested: str) -> None:
        actual = get_accelerator().device_name()
        if requested not in ("auto", actual) and torch.device(requested).type != actual:
            raise UserError(f"train.device: {requested!r}, but DeepSpeed selected the {actual!r} accelerator "
                            f"(set DS_ACCELERATOR={torch.device(requested).type} before launching)")

    # ---- construction ------------------------------------------------------------------

    def _initialize(self, model: nn.Module) -> None:
        """Wrap a plain fp32 module: same start on every rank, fresh optimizer, ``deepspeed.initialize``.
        With 16-bit parameters the masters are set to the module's fp32 values (DeepSpeed would start
        them from the rounded copies), so a rank change or a fresh start loses no precision."""
        make_contiguous_(model)
        self._broadcast_module(model)
        self.skeleton = meta_skeleton(model)
        fp32_values = [p.data for p in model.parameters()]  # DeepSpeed rounds the parameters, not these
        optimizer = build_adamw(model, self.cfg.train, get_accelerator().device_name())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.engine.checkpoint_engine.load = weights_only_loader
        self.model = self.engine.module
        self.device = self.engine.device
        self.masters = MasterWeights(self.optimizer, self.stage, self.param_dtype, self.device)
        self.adam = ZeroAdamState(self.optimizer, self.stage, self.masters)
        if self.masters.low_precision:
            for p, value in zip(self.model.parameters(), fp32_values):
                self.masters.write_(p, value)
            self.adam.base.state.clear()  # stage 0's wrapper took an AdamW step on zero gradients to create it
        schedule = self.retractor.state_dict() if hasattr(self, "retractor") else None  # a rebuild keeps it
        self.retractor = Retractor(self.model, self.cfg.train.retraction, self.cfg.train.lazy_tol,
                                   every=self.cfg.train.retract_every)
        if schedule is not None:
            self.retractor.load_state_dict(schedule)
        # What every step reads, fixed until the next rebuild (ZeRO keeps these parameter objects).
        self.retraction = OwnedRetraction(self.retractor, list(spectral_factors(self.model).items()), self.masters,
                                          self.device)
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
        before = CoreSnapshot.take(self._core_tensors(), self.adam.base)
        scale = self._loss_scale()
        grad_norm, skipped = self._optimizer_step()
        if skipped:
            overflow = self.param_dtype == torch.float16 and math.isfinite(mean_loss)
            reason = f"fp16 gradients overflowed at loss scale {scale:g}: step skipped, scale lowered" if overflow else ""
            return StepResult(mean_loss, grad_norm, True, RetractionReport(), reason=reason)
        bad = self._non_finite_cores()
        if bad:  # keep the old s (and its Adam state) on every rank; the factors keep their update
            before.restore_(self.adam.base)
        report = self.retractor.after_step(measure, retract=self.retraction)
        if bad:
            return StepResult(mean_loss, grad_norm, True, report, reason=bad_cores_reason(bad))
        return StepResult(mean_loss, grad_norm, False, report)

    def _core_tensors(self) -> list[Tensor]:
        """Every tensor of this rank that an optimizer step writes for the ``cores`` group (the ``s``):
        the fp32 tensors AdamW updates — the ``s`` (or their fp32 masters) at stage 0, this rank's flat
        partition of the group under ZeRO (one per sub-group at stage 3) — and the working copies derived
        from them: the full ``s`` at stages 0–2 (bf16/fp16 at stage 0), the local partition (plus the full
        copy of a persistent ``s``) at stage 3. Full copies are given as the parameters: ZeRO-3 swaps a
        persistent one's ``.data`` when it re-gathers it after the step, and a restore must write into the
        current storage."""
        group, cores = self.cores_group, list(self.cores.values())
        if group is None:
            return []
        if self.stage == 0:
            return [self.masters.master(s) for s in cores] + (cores if self.masters.low_precision else [])
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
        """Names of ``params`` whose fp32 master holds a NaN or an infinity, the same list on every rank:
        where every rank holds the masters whole they are identical everywhere; otherwise each rank
        checks its pieces and the verdicts are combined (one small all-reduce)."""
        seen = [self.masters.local(p) for p in params.values()]
        bad = (~finite_flags(seen)).to(device=self.device, dtype=torch.int32)
        if self.masters.partitioned and self.world_size > 1:
            dist.all_reduce(bad)
        return [n for n, b in zip(params, bad.tolist()) if b]

    def _loss_scale(self) -> float:
        """DeepSpeed's current loss scale (fp16; 1 otherwise)."""
        return float(self.optimizer.loss_scale) if self.param_dtype == torch.float16 else 1.0

    def _optimizer_step(self) -> tuple[float, bool]:
        """The boundary ``engine.step()``; returns (gradient norm before clipping, skipped). ZeRO 1–3 and the 16-bit optimizers compute the norm and skip non-finite steps themselves
        (consistently over ranks); stage 0 in fp32 does neither, so it is done here."""
        if self.stage == 0 and not self.masters.low_precision:
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

    # ---- observation -------------------------------------------------------------------

    def retract_all(self, measure: bool = False) -> RetractionReport:
        return self.retractor.retract_all(measure, retract=self.retraction)

    @torch.no_grad()
    def spectra(self) -> dict[str, Tensor]:
        """The fp32 masters of every ``s`` (collective where the masters are partitioned)."""
        values = self.masters.full(list(self.cores.values()))
        return {n: v.detach().float().cpu().clone() for n, v in zip(self.cores, values)}

    @torch.no_grad()
    def core_grad_sq(self) -> dict[str, Tensor]:  # through ZeroAdamState: collective at ZeRO 1–3
        if self.adam.step_count() == 0:
            return {n: torch.zeros(full_shape(p)) for n, p in self.cores.items()}
        self.adam.relink()
        return {n: self.adam.get(p, "exp_avg_sq").float() for n, p in self.cores.items()}

    @torch.no_grad()
    def sketch_factors(self, layers: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """The layers' fp32 master factors (collective where the masters are partitioned; a few layers at
        a time is the caller's choice: the controller sketches only the layers about to grow). Where every
        rank holds them, the live tensors."""
        modules = dict(self.model.named_modules())
        values = iter(self.masters.full([p for name in layers for p in (modules[name].U, modules[name].V)]))
        return {name: (next(values), next(values)) for name in layers}

    # ---- checkpoints -------------------------------------------------------------------

    def save(self, path: Path, client_state: dict) -> None:
        """All ranks: a DeepSpeed checkpoint under ``path/deepspeed`` with ``client_state`` and the model's
        per-layer ranks (``read_client_state`` reads the client state back without an engine)."""
        state = {"tsvd_client_state": client_state, "tsvd_spectral_ranks": spectral_ranks(self.model),
                 "tsvd_retraction": self.retractor.state_dict()}
        if self.stage == 0 and self.masters.low_precision:  # name the masters for read_full_params
            names = {id(p): n for n, p in self.model.named_parameters()}
            state[MASTER_NAMES] = {"groups": [[names[id(p)] for p in g] for g in self.optimizer.fp16_groups],
                                   "aliases": {alias: names[id(p)] for alias, p in
                                               self.model.named_parameters(remove_duplicate=False)
                                               if names[id(p)] != alias}}
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
        if "tsvd_retraction" in state:  # the amortized schedule (absent from checkpoints before it existed)
            self.retractor.load_state_dict(state["tsvd_retraction"])
        return state["tsvd_client_state"]

    # ---- rank change -------------------------------------------------------------------

    def apply_rank_plan(self, plan: RankPlan, sketch: GradientSketch | None = None) -> list[RankChange]:
        """``tsvd.surgery.apply_plan`` through ``apply_rank_change``: resized on rank 0 (random growth
        seeded as in ``TorchEngine``), broadcast, engine rebuilt. Every rank
        returns the same changes. A ``sketch`` is first summed over ranks, so rank 0 reads the gradient
        of the whole global batch."""
        if sketch is not None:
            sketch.all_reduce_(dist.all_reduce)
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
        run_on_main(lambda: surgery_fn(model, state.moments))
        broadcast_surgery(model, state.moments, set(state.params), self.device)
        root = self.model
        self._teardown()
        adopt_(root, model)
        self._initialize(root)
        self._restore(state)

    def gather_training_state(self) -> TrainingState:
        """Full fp32 master parameters and Adam state as plain CPU tensors, identical on every rank
        (collective)."""
        named = list(self.model.named_parameters())
        params: dict[str, Tensor] = {}
        for chunk in self.masters.chunks(named):
            values = self.masters.full([p for _, p in chunk])
            params.update({n: v.detach().cpu().clone() for (n, _), v in zip(chunk, values)})
        adam_step, moments = self.adam.step_count(), {}
        if adam_step > 0:
            self.adam.relink()
            moments = {n: {k: self.adam.get(p, k) for k in MOMENTS} for n, p in named}
        counters = {k: int(getattr(self.engine, k)) for k in COUNTERS}
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        return TrainingState(params, moments, adam_step, lrs, counters, getattr(self.optimizer, "loss_scaler", None))

    def _teardown(self) -> None:
        """Release the DeepSpeed engine. ZeRO-3 also keeps its module on a global stack
        (``parameter_offload.FWD_MODULE_STACK``) that ``destroy`` does not clear, which would keep every
        replaced engine's module alive; it is removed here."""
        from deepspeed.runtime.zero import parameter_offload

        old = self.engine.module
        self.engine.destroy()
        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not old]
        del self.engine, self.optimizer, self.model, self.masters, self.adam, self.retractor, self.retraction, self.cores

    def _restore(self, state: TrainingState) -> None:
        """Put Adam's moments and step, the lrs, DeepSpeed's counters and loss scaler back into a fresh engine."""
        if state.adam_step > 0:
            self._create_adam_state()
            self.adam.relink()
            named = dict(self.model.named_parameters())
            for name, moments in state.moments.items():
                for key, value in moments.items():
                    self.adam.set(named[name], key, value.to(self.device))
            for s in self.adam.base.state.values():
                s["step"].fill_(state.adam_step)
        for group, lr in zip(self.optimizer.param_groups, state.lrs):
            group["lr"] = lr
        for key, value in state.counters.items():
            setattr(self.engine, key, value)
        if state.loss_scaler is not None:  # as DeepSpeed's own load_checkpoint does
            self.optimizer.loss_scaler = state.loss_scaler

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

    # ---- lifecycle ---------------------------------------------------------------------

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        votes = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(votes)
        return bool(votes.item() > 0)

    def close(self) -> None:
        """Destroy the DeepSpeed engine and the process group (the object is unusable afterwards)."""
        self._teardown()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
