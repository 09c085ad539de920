"""The training loop: data → engine step (forward, backward, AdamW, retraction) → metrics, rank
control, validation and crash-safe checkpoints. The engine (plain PyTorch or DeepSpeed) is
interchangeable; the loop does not know which one it drives.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from tsvd import checkpoint as ckpt
from tsvd.cadence import Cadence
from tsvd.config import Config, to_dict
from tsvd.data import BatchSampler, load_data, unigram_loss, val_batches
from tsvd.distributed import is_collective_failure
from tsvd.engine import build_engine
from tsvd.metrics import Metrics, layer_stats, memory_stats
from tsvd.model import build_model
from tsvd.optim import lr_multiplier
from tsvd.progress import Progress, say
from tsvd.rank_overview import spectral_signals
from tsvd.run_lock import RunLock
from tsvd.spectral import SpectralModule, set_ranks_for_loading, spectral_ranks
from tsvd.trainer.start import (build_controller, check_compatible, ensure_data, find_resume, global_rank, set_threads,
                                set_vocab)
from tsvd.trainer.stop import Stopped, StopRequest, TrainingError


@dataclass
class TrainSummary:
    step: int = 0
    train_losses: list[float] = field(default_factory=list)  # one per step run in this process
    val_loss: float = math.nan
    unigram_loss: float = math.nan
    checkpoint: str | None = None
    tokens_per_s: float = 0.0
    is_main: bool = True  # rank 0 (the one that reports)


@dataclass
class _Run:
    """What one ``fit`` call tracks besides the model: its summary, progress and bad-step streak."""

    summary: TrainSummary
    progress: Progress
    tokens_per_step: int
    bad_steps: int = 0
    steps_run: int = 0
    step_s: float = 0.0  # the last step's wall time
    t_start: float = field(default_factory=time.perf_counter)

    def finish(self, step: int) -> TrainSummary:
        self.summary.step = step
        elapsed = time.perf_counter() - self.t_start
        self.summary.tokens_per_s = self.steps_run * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        return self.summary


class Trainer:
    """Build data, model and engine from a ``Config``; ``fit()`` trains to ``cfg.train.steps``.

    ``resume``: ``"auto"`` continues from ``<out_dir>/checkpoints/latest`` when present, a path resumes
    from that checkpoint, ``None`` starts fresh (refusing to overwrite an existing run's checkpoints).
    """

    def __init__(self, cfg: Config, resume: str | Path | None = "auto", progress: bool = True) -> None:
        self.cfg = cfg
        set_threads(cfg)
        torch.manual_seed(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        # One run per out_dir (tsvd.run_lock), held by global rank 0: from here when the directory exists
        # (before `latest` is read), else from the first write, so nothing is created before the inputs
        # are checked.
        self.lock = RunLock(self.out_dir)
        if global_rank() == 0 and self.out_dir.is_dir():
            self.lock.acquire()
        try:
            self._build(resume, progress)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, resume: str | Path | None, progress: bool) -> None:
        cfg = self.cfg
        self.resume_from = find_resume(resume, self.out_dir, self.ckpt_root)
        ensure_data(cfg, progress)
        self.data = load_data(cfg.data.dir)
        set_vocab(cfg, self.data.meta.vocab_size)

        model = build_model(cfg.model)
        meta = ckpt.read_meta(self.resume_from) if self.resume_from else None
        if meta is not None:
            check_compatible(cfg, meta, self.resume_from)
            set_ranks_for_loading(model, meta.get("ranks", {}))
        dims = {n: (m.U.shape[0], m.V.shape[0]) for n, m in model.named_modules() if isinstance(m, SpectralModule)}
        factor_count = sum(m.s.numel() * (m.U.shape[0] + m.V.shape[0] + 1) for m in model.modules()
                           if isinstance(m, SpectralModule))
        other_params = sum(p.numel() for p in model.parameters()) - factor_count
        self.controller = build_controller(cfg, dims)  # shapes read before ZeRO-3 partitions them
        self.cadence = Cadence.from_config(cfg.train, self.controller.due if self.controller else None)
        self.engine = build_engine(cfg, model)
        self.model = self.engine.model
        self.sampler = BatchSampler(self.data.train, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed)
        self.val = val_batches(self.data.val, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches)
        self.step = 0
        if meta is not None:
            state = self.engine.load(self.resume_from)
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            if self.controller is not None and state.get("controller"):
                self.controller.load_state_dict(state["controller"])
        self.progress = progress and self.engine.is_main
        if self.engine.is_main:
            self.lock.acquire()
        cap = cfg.rank.max_rank if self.controller is not None else None
        self.metrics = Metrics(self.out_dir, enabled=self.engine.is_main, dims=dims, other_params=other_params,
                               max_ranks={n: min(m, k, cap or m) for n, (m, k) in dims.items()},
                               layer_cards=cfg.train.layer_cards)
        if self.engine.is_main:
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ---------------------------------------------------------------- the loop
    def fit(self, stop_at: int | None = None) -> TrainSummary:
        """Train until ``cfg.train.steps`` (or until ``stop_at``, as if interrupted there)."""
        t, when = self.cfg.train, self.cadence
        last = t.steps if stop_at is None else min(stop_at, t.steps)
        run = self._start_run()
        with self._stoppable(run) as stop:
            while self.step < last:
                stop.check(self.engine)
                n, stop.at_boundary = self.step + 1, False
                micro = [next(self.sampler) for _ in range(t.grad_accum)]
                with self._sketch(when.should_decide_ranks(n)) as sketch:
                    result = self._timed_step(run, micro, measure=when.should_log(n))
                self.step = n
                if self._record(run, result):
                    if when.should_decide_ranks(n) or when.should_log(n):  # s read as the spectrum: U, V exact
                        self.engine.retract_all(measure=when.should_log(n))
                    if when.should_decide_ranks(n):
                        self._change_ranks(sketch)
                    if when.should_log(n):
                        self._log(result, run)
                    if when.should_eval(n):
                        run.summary.val_loss = self._validate()
                    if when.should_save(n):
                        run.summary.checkpoint = str(self.save())
                stop.at_boundary = True
            self._overview()
        return run.finish(self.step)

    def _start_run(self) -> "_Run":
        t = self.cfg.train
        summary = TrainSummary(step=self.step, is_main=self.engine.is_main)
        if self.engine.is_main:
            summary.unigram_loss = unigram_loss(self.data.train, self.data.val, self.data.meta.vocab_size)
            self.metrics.scalars(self.step, {"val/unigram_loss": summary.unigram_loss})
        progress = Progress(t.steps, initial=self.step, enabled=self.progress)
        self._overview()
        return _Run(summary, progress, t.batch_size * t.seq_len * t.grad_accum)

    def _timed_step(self, run: "_Run", micro: list, measure: bool):
        t0 = time.perf_counter()
        result = self.engine.train_step(micro, lr_multiplier(self.step, self.cfg.train), measure=measure)
        run.step_s = time.perf_counter() - t0
        return result

    def _record(self, run: "_Run", result) -> bool:
        """Count the step just run (loss, progress, repairs, the bad-step streak); ``False`` when it was
        skipped. Too many bad steps in a row stop the run (``TrainingError``)."""
        run.steps_run += 1
        run.summary.train_losses.append(result.loss)
        if result.retraction.repaired:
            self.metrics.text(self.step, "retraction_repair", "orthonormality error above tolerance: "
                              "re-orthonormalized (Householder QR) " + ", ".join(result.retraction.repaired))
        if not result.skipped:
            run.bad_steps = 0
            run.progress.step(result.loss, run.tokens_per_step / run.step_s)
            return True
        run.bad_steps += 1
        why = result.reason or f"non-finite loss {result.loss} or grad norm {result.grad_norm}: step skipped"
        self.metrics.text(self.step, "bad_step", f"{why} ({run.bad_steps} in a row)")
        if run.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(f"{run.bad_steps} consecutive non-finite steps at step {self.step}; "
                                f"stopping. Last good checkpoint: {ckpt.latest_checkpoint(self.ckpt_root)}")
        return False

    @contextlib.contextmanager
    def _stoppable(self, run: "_Run"):
        """Around the loop: deferred Ctrl-C / SIGTERM with a checkpoint at the step boundary, and one
        readable line when a collective operation fails in a multi-process run."""
        stop = StopRequest(announce=self.engine.is_main)
        try:
            yield stop
        except Stopped as e:  # every rank agreed to stop here: one consistent checkpoint
            e.step, e.is_main = self.step, self.engine.is_main
            e.checkpoint = self._save_on_interrupt(True, agreed=True)
            raise
        except KeyboardInterrupt:
            self._save_on_interrupt(stop.at_boundary)
            raise
        except RuntimeError as e:
            if self.engine.world_size > 1 and is_collective_failure(e):
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TrainingError(
                    f"rank {self.engine.rank}: a collective operation failed in step {self.step + 1} ({detail}); "
                    "usually another rank died or stopped answering (see its log). Last checkpoint: "
                    f"{ckpt.latest_checkpoint(self.ckpt_root)}; run the same command again to resume from it") from e
            raise
        finally:
            stop.restore()
            run.progress.close()

    def _save_on_interrupt(self, at_boundary: bool, agreed: bool = False) -> Path | None:
        """Checkpoint an interrupted run, but only at a step boundary: a state caught inside a step (an
        optimizer update applied but not yet retracted or counted, the sampler already advanced) would not
        resume exactly. Several processes save only when they ``agreed`` to stop at this boundary (a
        checkpoint is collective); an interrupt that is not agreed leaves them at different points, and
        they resume from the last periodic checkpoint. Returns the checkpoint of this step, if any."""
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if not at_boundary or (self.engine.world_size > 1 and not agreed):
            if self.engine.is_main:
                say(f"interrupted in the middle of a step: not saving; the last checkpoint is {latest}")
            return None
        if latest is not None and latest.name == ckpt.step_dir_name(self.step):
            return latest  # already saved at this step
        if self.engine.is_main:
            say(f"stopping at step {self.step}: saving a checkpoint")
        return self.save()

    def _sketch(self, due: bool):
        if not due or self.cfg.rank.grow_directions != "gradient":
            return contextlib.nullcontext()
        from tsvd.sketch import GradientSketch

        # Sketch only the layers the coming decision is about to grow (a dry run of the plan).
        width = self.controller.sketch_width(self.step + 1, self.engine.spectra(), self._grad_sq())
        if not width:
            return contextlib.nullcontext()
        return GradientSketch(self.model, width=width, factors=self.engine.sketch_factors(list(width)),
                              generator=torch.Generator().manual_seed(self.cfg.seed + self.step))

    def _change_ranks(self, sketch) -> None:
        spectra = self.engine.spectra()
        plan = self.controller.plan(self.step, spectra, self._grad_sq())
        events = self.engine.apply_rank_plan(plan, sketch) if plan.ranks else []
        self.metrics.rank_events(self.step, events)
        if self.engine.is_main and events:
            say("rank change @ step {}: {}".format(self.step, ", ".join(f"{e.layer} {e.old}->{e.new}" for e in events)))
        signals = None
        if self.engine.is_main and events:
            r = self.cfg.rank
            signals = spectral_signals(self._layer_stats(spectra), r.policy, r.energy, r.grow_tail)
            signals |= getattr(plan, "reasons", None) or {}  # the controller's own words, when it gives them
        self._overview(events, signals)

    def _grad_sq(self) -> dict | None:
        """What the Fisher score needs (every rank calls it: a collective under ZeRO), else ``None``."""
        return self.engine.core_grad_sq() if self.cfg.rank.score == "fisher" else None

    def _overview(self, changes: list = (), signals: dict[str, str] | None = None) -> None:
        """The rank overview in TensorBoard (``Metrics.rank_overview``); every rank calls it (spectra are
        gathered collectively)."""
        spectra = self.engine.spectra()
        if self.engine.is_main and spectra:
            self.metrics.rank_overview(self.step, spectra, self._layer_stats(spectra), changes, signals)

    def _layer_stats(self, spectra: dict) -> dict[str, dict[str, float]]:
        return layer_stats(spectra, self.engine.retractor.cache, self.cfg.rank.energy, self.cfg.rank.tail_fraction)

    def _log(self, result, run: "_Run") -> None:
        spectra = self.engine.spectra()
        dt, tokens_per_step = run.step_s, run.tokens_per_step
        if not self.engine.is_main:
            return
        t = self.cfg.train
        values = {
            "train/loss": result.loss,
            "train/grad_norm": result.grad_norm,
            "train/lr": t.lr * lr_multiplier(self.step - 1, t),
            "train/spectral_lr": t.spectral_lr * lr_multiplier(self.step - 1, t),
            "perf/tokens_per_s": tokens_per_step / dt,
            "perf/step_s": dt,
            "perf/retraction_s": result.retraction.seconds,
            **self.engine.timings,
            "perf/retraction_share": result.retraction.seconds / dt if dt > 0 else 0.0,
            "spectral/fallbacks": float(len(result.retraction.fallbacks)),
            **result.retraction.scalars(),
            **memory_stats(),
        }
        self.metrics.scalars(self.step, values)
        run.progress.line(self.step, result.loss, values["train/lr"], values["perf/tokens_per_s"])
        if spectra:
            self.metrics.spectral(self.step, spectra, self._layer_stats(spectra))

    def _validate(self) -> float:
        loss = self.engine.eval_loss(self.val)
        if self.engine.is_main:
            self.metrics.scalars(self.step, {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))})
            say(f"step {self.step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50.0)):.2f})")
        return loss

    def save(self) -> Path:
        """Publish a checkpoint of the current step (atomic; see tsvd.checkpoint). A state holding a NaN
        or an infinity is never published: training stops instead (``TrainingError``)."""
        self.engine.retract_all()  # the weights are handed on: every factor exactly orthonormal
        bad = self.engine.non_finite_parameters()
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingError(f"non-finite values in {shown} at step {self.step}: this state is not saved. "
                                f"Last good checkpoint: {ckpt.latest_checkpoint(self.ckpt_root)}")
        client_state = {"step": self.step, "sampler": self.sampler.state_dict(),
                        "controller": self.controller.state_dict() if self.controller else None}
        meta = {"ranks": spectral_ranks(self.model), "config": to_dict(self.cfg),
                "engine": self.cfg.engine.kind}
        return ckpt.save_checkpoint(self.ckpt_root, self.step, meta,
                                    lambda d: self.engine.save(d, client_state),
                                    is_main=self.engine.is_main, barrier=self.engine.barrier)

    def close(self) -> None:
        try:
            self.metrics.close()
            self.engine.close()
        finally:
            self.lock.release()


def train(cfg: Config, resume: str | Path | None = "auto", progress: bool = True) -> TrainSummary:
    """Train ``cfg`` to completion (resuming when a checkpoint exists); returns a summary."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        summary = trainer.fit()
        if trainer.engine.is_main:
            summary_file = Path(cfg.out_dir) / "summary.json"
            summary_file.write_text(json.dumps(summary.__dict__ | {"train_losses": None}, indent=1))
    finally:
        trainer.close()
    return summary
