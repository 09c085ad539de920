"""Worker for tests/test_deepspeed_engine.py: one rank of a short DeepSpeedEngine run.

Run by the real launcher (``deepspeed --num_gpus 2 tests/ds_worker.py SPEC.json``) or, for one
process, by plain ``python``. The spec (JSON) says what to do; every rank records what it saw after
each step — loss, grad norm, skip flag, lr, Adam step, orthonormality of the working factors and of
the fp32 master, a hash of all parameters — and rank 0 writes all ranks' records to ``spec["out"]``.
Nothing is asserted here: a failed check on one rank must not leave the other hanging in a
collective; the test asserts on the written records.

Spec keys: ``ds_config`` (path), ``steps``, ``start`` (first step index), ``save_at`` (step index
after which to save, into ``save_dir``), ``resume`` (checkpoint directory to load first), ``reload``
(after the last step, load ``save_dir`` into the same engine and train steps ``save_at + 1 …`` again,
records marked ``"replay"``), ``record_every`` (record only every k-th step and the last; default 1),
``poison``
(step whose loss rank ``world−1`` turns infinite), ``poison_s`` (step whose optimizer update leaves
an infinity in one ``s``: ``ds_common.poison_s``), ``sloppy`` (step whose Cholesky-QR results are off, so
the measured retraction must repair them: ``ds_common.sloppy_retraction``), ``rank_change`` (shrink a
layer after the last step and train one more), ``check_finite`` (at the end: ``non_finite_record``),
``sketch_growth`` (at the end: ``sketch_growth_record``), ``dtype``, ``fp16_on_cpu`` (let DeepSpeed's CPU
accelerator take fp16, which it refuses where oneDNN lacks fp16 kernels; torch's CPU kernels compute
fp16 anyway, slowly, which is enough to run the engine's fp16 logic: loss scaling, overflow skips).
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_common  # noqa: E402  (sibling module, importable when run as a script)


def param_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def factor_errors(engine) -> dict[str, float]:
    """Max orthonormality error of the fp32 masters (what the optimizer updates) and of the working
    factors, and the largest difference between a working factor and its master rounded to the working
    dtype (0: the working copy is the master's rounding); collective."""
    import deepspeed

    from tsvd.retraction import spectral_factors
    from tsvd.stiefel import orthonormality_error

    factors = list(spectral_factors(engine.model).values())
    masters = engine.masters.full(factors)
    work, master, mismatch = 0.0, 0.0, 0.0
    with deepspeed.zero.GatheredParameters(factors, modifier_rank=None, enabled=engine.stage == 3):
        for p, m in zip(factors, masters):
            work = max(work, float(orthonormality_error(p.data.float())))
            master = max(master, float(orthonormality_error(m)))
            mismatch = max(mismatch, float((m.to(p.dtype).float() - p.data.float()).abs().max()))
    return {"work": work, "master": master, "master_vs_work": mismatch}


def main(spec_path: str) -> None:
    faulthandler.enable()  # a native abort in one rank still shows where Python was
    spec = json.loads(Path(spec_path).read_text())
    import deepspeed.comm as dist

    from tsvd.engine.deepspeed_engine import DeepSpeedEngine

    if spec.get("fp16_on_cpu"):
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: True
    cfg = ds_common.make_config(spec["ds_config"], spec.get("dtype", "float32"))
    model = ds_common.tiny_model()
    engine = DeepSpeedEngine(cfg, model)
    records: list[dict] = []
    if spec.get("resume"):
        client = engine.load(Path(spec["resume"]))
        records.append({"event": "resumed", "client_state": client})
    every = spec.get("record_every", 1)
    for step in range(spec.get("start", 0), spec["steps"]):
        res = ds_common.spec_step(engine, cfg, step, spec)
        if step % every == 0 or step == spec["steps"] - 1:
            records.append(step_record(engine, step, res))
        if step == spec.get("save_at"):
            engine.save(Path(spec["save_dir"]), {"step": step + 1, "ranks": {ds_common.SHRUNK: 5}})
            records.append({"event": "saved", "dir": spec["save_dir"],
                            "hash": param_hash(engine.gather_training_state().params)})
    if spec.get("reload"):
        client = engine.load(Path(spec["save_dir"]))
        records.append({"event": "reloaded", "client_state": client})
        for step in range(spec["save_at"] + 1, spec["steps"]):
            res = ds_common.spec_step(engine, cfg, step, spec)
            records.append(dict(step_record(engine, step, res), replay=True))
    engine.model.poison = False
    if spec.get("rank_change"):
        records.append(rank_change_record(engine))
        records.append(rank_plan_record(engine, cfg, spec["steps"]))
        step = spec["steps"]
        res = engine.train_step(ds_common.batches(step, cfg), ds_common.lr_multiplier(step))
        records.append(step_record(engine, step, res))
    if spec.get("check_finite"):
        records.append(non_finite_record(engine))
    if spec.get("sketch_growth"):
        records.append(sketch_growth_record(engine, cfg, spec["steps"]))
    records.append({"event": "spectra", "spectra": {n: s.tolist() for n, s in engine.spectra().items()},
                    "grad_sq": {n: v.tolist() for n, v in engine.core_grad_sq().items()}})
    everyone = [None] * engine.world_size
    dist.all_gather_object(everyone, records)
    if engine.rank == 0:
        Path(spec["out"]).write_text(json.dumps({"world_size": engine.world_size, "ranks": everyone}))
    engine.barrier()
    engine.close()


def step_record(engine, step: int, res) -> dict:
    """What every rank saw after ``step``; hashes of the parameters are of the fp32 masters."""
    state = engine.gather_training_state()
    cores = {n for n in state.params if n.endswith(".s")}
    return {"step": step, "loss": res.loss, "grad_norm": res.grad_norm, "skipped": res.skipped, "reason": res.reason,
            "retracted": len(res.retraction.retracted), "repaired": res.retraction.repaired, "lrs": state.lrs,
            "adam_step": state.adam_step, "counters": state.counters, "ortho": factor_errors(engine),
            "hash": param_hash(state.params),
            "moments_hash": param_hash({f"{n}.{k}": t for n, m in state.moments.items() for k, t in m.items()}),
            "cores_hash": param_hash({n: state.params[n] for n in cores}),
            "cores_moments_hash": param_hash({f"{n}.{k}": t for n, m in state.moments.items() if n in cores
                                              for k, t in m.items()})}


def non_finite_record(engine) -> dict:
    """``non_finite_parameters`` on the trained model, then with an infinity in element 0 of one factor's
    master — on every rank where each holds it whole (stage 0; fp32 copies at stages 1–2), else in the one
    rank's piece that holds element 0 — then repaired."""
    clean = engine.non_finite_parameters()
    module, _, leaf = ds_common.POISONED_FACTOR.rpartition(".")
    p = getattr(engine.model.get_submodule(module), leaf)
    saved = engine.masters.full([p])[0].clone()
    poisoned_value = saved.clone()
    poisoned_value.view(-1)[0] = float("inf")
    engine.masters.write_(p, poisoned_value)
    poisoned = engine.non_finite_parameters()
    engine.masters.write_(p, saved)
    return {"event": "non_finite", "clean": clean, "poisoned": poisoned}


def sketch_growth_record(engine, cfg, step: int) -> dict:
    """One step under a ``GradientSketch`` of ``GROWN`` (factors from ``engine.sketch_factors``, as the
    trainer does), then grow it 5 → 7 along the sketched directions; returns the factors around it."""
    from tsvd.controller import RankPlan
    from tsvd.sketch import GradientSketch

    layer = ds_common.GROWN
    with GradientSketch(engine.model, width={layer: 2}, generator=torch.Generator().manual_seed(7),
                        factors=engine.sketch_factors([layer])) as sketch:
        engine.train_step(ds_common.batches(step, cfg), ds_common.lr_multiplier(step))
    usable = sketch.sketches[layer].usable()  # this rank's own half of the batch, before the sum
    before = engine.gather_training_state().params
    changes = engine.apply_rank_plan(RankPlan(step=step + 1, ranks={layer: 7}), sketch)
    after = engine.gather_training_state().params
    return {"event": "sketch_growth", "usable": usable, "changes": [c.to_dict() for c in changes],
            **{f"{k}_before": before[f"{layer}.{k}"].tolist() for k in ("U", "V")},
            **{f"{k}_after": after[f"{layer}.{k}"].tolist() for k in ("U", "V")}}


def rank_change_record(engine) -> dict:
    """Shrink one layer from rank 5 to 3 (kept columns keep their moments) and report what survived."""
    before = engine.gather_training_state()
    kept: dict[str, list[int]] = {}
    resized = [f"{ds_common.SHRUNK}.{f}" for f in ("U", "V", "s")]

    def surgery(model, optimizer_state):
        idx = model.get_submodule(ds_common.SHRUNK).truncate_(3)
        kept["idx"] = idx.tolist()
        for name in resized:
            for key, value in optimizer_state[name].items():
                optimizer_state[name][key] = value.index_select(-1, idx).contiguous()

    root = engine.model
    scale_before = getattr(engine.optimizer, "loss_scale", 1.0)
    engine.apply_rank_change(surgery)
    after = engine.gather_training_state()
    idx = torch.tensor(ds_common.broadcast_list(engine, kept.get("idx")))
    expected = {n: {k: (t.index_select(-1, idx) if n in resized else t) for k, t in m.items()}
                for n, m in before.moments.items()}
    moments_ok = all(torch.equal(after.moments[n][k], expected[n][k]) for n in expected for k in expected[n])
    params_ok = all(torch.equal(after.params[n], t.index_select(-1, idx) if n in resized else t)
                    for n, t in before.params.items())
    return {"event": "rank_change", "moments_ok": moments_ok, "params_ok": params_ok, "same_root": engine.model is root,
            "shape": list(after.params[resized[0]].shape), "adam_step": [before.adam_step, after.adam_step],
            "lrs": [before.lrs, after.lrs], "counters": [before.counters, after.counters],
            "loss_scale": [scale_before, getattr(engine.optimizer, "loss_scale", 1.0)]}


def rank_plan_record(engine, cfg, step: int) -> dict:
    """Grow one layer 5 → 7 through ``apply_rank_plan`` (random directions, ``s = 0``): the loss must not move."""
    from tsvd.controller import RankPlan

    probe = ds_common.batches(10_000, cfg)
    before = engine.eval_loss(probe)
    changes = engine.apply_rank_plan(RankPlan(step=step, ranks={ds_common.GROWN: 7}))
    after = engine.eval_loss(probe)
    shape = list(engine.gather_training_state().params[f"{ds_common.GROWN}.U"].shape)
    return {"event": "rank_plan", "changes": [c.to_dict() for c in changes], "loss": [before, after], "shape": shape}


if __name__ == "__main__":
    main(sys.argv[1])
    # Every record is written and every collective done, but the interpreter's teardown is skipped: in
    # about one launch in twenty (ZeRO-0 main run) a worker aborted there ("terminate called without an
    # active exception", exit code -6) after complete results. A core dump shows why: a gloo worker
    # thread of the process group — still alive after destroy_process_group(), something keeps a
    # reference to it — drops the final barrier's work, which holds the all_gather_object tensors whose
    # Python objects had already died; releasing them needs the GIL, the interpreter is finalizing, so
    # the thread is made to exit inside a noexcept destructor and std::terminate follows. A PyTorch race
    # at exit, not a fault of the engine; a sleep or gc.collect() would only narrow it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
