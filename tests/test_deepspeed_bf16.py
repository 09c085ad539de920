"""DeepSpeed's native bf16 mixed precision on CPU, ZeRO 0–3, two processes through the real launcher.

The model's parameters are bf16 working copies; the optimizer keeps fp32 masters
(``tsvd.engine.mixed_precision``). One launch of ``tests/ds_worker.py`` per stage — 8 steps with a
retraction to repair at step 1, a checkpoint after step 2, an update leaving one ``s`` infinite at step 3,
a non-finite loss on the last rank at step 4, then the checkpoint loaded into the same engine and steps
3–7 trained again, a rank change (one layer 5 → 3, another grown 5 → 7) and one more step — and one
100-step launch at ZeRO-2. The reference is ``TorchEngine`` in fp32 in this process, fed the same
global batches with the same poisoned steps.

Tolerances. The masters are retracted in fp32: orthonormal to fp32 accuracy (``ORTHO_TOL`` as in
tests/test_deepspeed_engine.py), after every step and after 100. A working factor is its master rounded
to bf16 — exactly (compared as ``master.to(bf16)``) — so its own error is bounded by the rounding: each
entry moves by at most 2⁻⁹ relative, ``‖E‖_F ≤ 2⁻⁹‖Q‖_F = 2⁻⁹√r``, and ``‖Q̃ᵀQ̃ − I‖_F ≤ 2‖E‖_F + ‖E‖_F²``
(``BF16_ORTHO_BOUND`` at the largest rank, 7). The loss: bf16 weights and activations perturb each
logit by ~2⁻⁸ relative, and the cross-entropy is computed in fp32, so a bf16 run's loss stays within
``BF16_LOSS_RTOL`` = 5e-3 relative of the fp32 run's (measured: ≤ 1e-3 over 100 steps at every stage);
a real bug (a stale master, a retraction of the rounded copy, a lost update) moves it by more within a
few steps. Everything else is exact: ranks agree bitwise, a reloaded checkpoint continues bitwise, a
rank change keeps the masters and moments of kept columns bitwise.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_common  # noqa: E402
from test_deepspeed_engine import ORTHO_TOL, REPO, event, launch, stage_config, steps_of  # noqa: E402

STEPS, SAVE_AT, POISON, POISON_S, SLOPPY = 8, 2, 4, 3, 1
LONG_STEPS = 100
SPEC = {"poison": POISON, "poison_s": POISON_S, "sloppy": SLOPPY}
BF16_LOSS_RTOL = 5e-3
_E = 2.0**-9 * math.sqrt(7)
BF16_ORTHO_BOUND = 2 * _E + _E**2


def bf16_config(stage: int, tmp: Path) -> str:
    """The shipped ``zero{stage}-bf16.json`` (DeepSpeed's ``"bf16": {"enabled": true}``); at ZeRO-3 with the
    toy model's matrices partitioned, as in tests/test_deepspeed_engine.py."""
    shipped = json.loads((REPO / "configs" / "ds" / f"zero{stage}-bf16.json").read_text())
    assert shipped["bf16"] == {"enabled": True}
    cfg = json.loads(Path(stage_config(stage, tmp)).read_text()) | {"bf16": shipped["bf16"]}
    out = tmp / f"zero{stage}-bf16.json"
    out.write_text(json.dumps(cfg))
    return str(out)


@functools.cache
def fp32_reference(steps: int, poisoned: bool = True) -> list[dict]:
    """``TorchEngine`` in fp32 (one process) on the same global batches (and poisoned steps: ``SPEC``)."""
    from tsvd.engine.torch_engine import TorchEngine

    cfg = ds_common.make_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.threads)
    try:
        engine = TorchEngine(cfg, ds_common.tiny_model())
        out = []
        for step in range(steps):
            res = ds_common.spec_step(engine, cfg, step, SPEC if poisoned else {})
            out.append({"loss": res.loss, "skipped": res.skipped, "reason": res.reason})
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda s: f"zero{s}")
def bf16_run(request, tmp_path_factory) -> tuple[int, dict]:
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"bf16-zero{stage}")
    spec = dict(SPEC, ds_config=bf16_config(stage, tmp), dtype="bfloat16", steps=STEPS, save_at=SAVE_AT,
                save_dir=str(tmp / "ckpt"), reload=True, rank_change=True, check_finite=True)
    return stage, launch(f"bf16-zero{stage}", spec, tmp)


def main_steps(run: dict, rank: int = 0) -> list[dict]:
    return [r for r in steps_of(run, rank) if not r.get("replay")][:STEPS]


def test_bf16_zero_loss_follows_the_fp32_run(bf16_run):
    _, run = bf16_run
    ref = fp32_reference(STEPS)
    got = main_steps(run)
    assert [r["skipped"] for r in got] == [r["skipped"] for r in ref]
    for g, r in zip(got, ref):
        if not r["skipped"]:
            assert math.isclose(g["loss"], r["loss"], rel_tol=BF16_LOSS_RTOL), (g["step"], g["loss"], r["loss"])
    losses = [r["loss"] for r in got if not r["skipped"]]
    assert losses[-1] < losses[0] - 0.1, losses


def test_bf16_zero_masters_orthonormal_and_working_copies_their_rounding(bf16_run):
    """After every step (repaired, skipped, resumed, after the rank change): fp32 masters orthonormal to
    fp32 accuracy; every bf16 factor exactly its master rounded, so within the bf16 rounding bound."""
    _, run = bf16_run
    for rank in range(run["world_size"]):
        for r in steps_of(run, rank):
            assert r["ortho"]["master"] <= ORTHO_TOL, (rank, r["step"], r["ortho"])
            assert r["ortho"]["master_vs_work"] == 0.0, (rank, r["step"], r["ortho"])
            assert r["ortho"]["work"] <= BF16_ORTHO_BOUND, (rank, r["step"], r["ortho"])


def test_bf16_zero_ranks_bitwise_identical(bf16_run):
    _, run = bf16_run
    first, second = steps_of(run, 0), steps_of(run, 1)
    for key in ("hash", "moments_hash", "loss"):
        assert [r[key] for r in first] == [r[key] for r in second], key
    assert event(run, "spectra", 0) == event(run, "spectra", 1)


def test_bf16_zero_non_finite_steps_are_skipped_on_every_rank(bf16_run):
    """A non-finite loss on one rank skips the step everywhere (nothing changes); an update leaving one
    ``s``'s master infinite is undone for every ``s`` (masters and moments), the factors keep theirs."""
    _, run = bf16_run
    reason = fp32_reference(STEPS)[POISON_S]["reason"]
    assert reason.startswith(f"non-finite s after the update in {ds_common.POISONED_S}:")
    for rank in range(run["world_size"]):
        steps = main_steps(run, rank)
        bad, before = steps[POISON], steps[POISON - 1]
        assert bad["skipped"] and not math.isfinite(bad["loss"])
        assert (bad["hash"], bad["moments_hash"], bad["adam_step"]) == (before["hash"], before["moments_hash"],
                                                                        before["adam_step"])
        bad, before = steps[POISON_S], steps[POISON_S - 1]
        assert bad["skipped"] and math.isfinite(bad["loss"]) and bad["reason"] == reason
        assert bad["cores_hash"] == before["cores_hash"] and bad["cores_moments_hash"] == before["cores_moments_hash"]
        assert bad["hash"] != before["hash"] and bad["adam_step"] == before["adam_step"] + 1
        assert not steps[POISON + 1]["skipped"] and math.isfinite(steps[POISON + 1]["grad_norm"])


def test_bf16_zero_repairs_the_master_retraction(bf16_run):
    """A measured retraction of the masters whose error exceeds the fp32 tolerance is repaired and
    reported on every rank."""
    from tsvd.retraction import spectral_factors

    _, run = bf16_run
    names = sorted(spectral_factors(ds_common.tiny_model()))
    for rank in range(run["world_size"]):
        steps = main_steps(run, rank)
        assert sorted(steps[SLOPPY]["repaired"]) == names
        assert all(not s["repaired"] for s in steps if s["step"] != SLOPPY)


def test_bf16_zero_reloaded_checkpoint_continues_bitwise(bf16_run):
    """The checkpoint of step 2 loaded into the trained engine: steps 3–7 again, bitwise (masters, moments,
    losses, counters)."""
    _, run = bf16_run
    assert event(run, "reloaded")["client_state"] == {"step": SAVE_AT + 1, "ranks": {ds_common.SHRUNK: 5}}
    expected = main_steps(run)[SAVE_AT + 1:]
    replay = [r for r in steps_of(run) if r.get("replay")]
    assert [r["step"] for r in replay] == [r["step"] for r in expected]
    for g, e in zip(replay, expected):
        for key in ("loss", "grad_norm", "skipped", "lrs", "adam_step", "counters", "hash", "moments_hash"):
            assert repr(g[key]) == repr(e[key]), (key, g["step"], g[key], e[key])


def test_bf16_zero_checkpoint_reads_back_the_fp32_masters(bf16_run):
    """``read_full_params`` (``tsvd export``) returns the fp32 masters the engine held when it saved."""
    from ds_worker import param_hash
    from tsvd.engine.ds_checkpoint import read_full_params

    _, run = bf16_run
    saved = event(run, "saved")
    params = read_full_params(Path(saved["dir"]))
    assert {t.dtype for t in params.values()} == {torch.float32}
    assert param_hash(params) == saved["hash"]


def test_bf16_zero_rank_change_carries_the_masters(bf16_run):
    """Shrinking keeps the kept columns' masters and moments bitwise (not their bf16 rounding); growth
    leaves the loss unchanged; the next step trains with orthonormal masters."""
    _, run = bf16_run
    for rank in range(run["world_size"]):
        change = event(run, "rank_change", rank)
        assert change["moments_ok"] and change["params_ok"] and change["same_root"]
        assert change["shape"] == [ds_common.DIM, 3] and change["adam_step"][0] == change["adam_step"][1] > 0
        assert change["counters"][0] == change["counters"][1]
        plan = event(run, "rank_plan", rank)
        assert plan["shape"] == [ds_common.DIM, 7]
        assert math.isclose(*plan["loss"], rel_tol=1e-6)
        after = steps_of(run, rank)[-1]
        assert after["step"] == STEPS and not after["skipped"] and after["ortho"]["master"] <= ORTHO_TOL


def test_bf16_zero_non_finite_masters_are_found_on_every_rank(bf16_run):
    _, run = bf16_run
    for rank in range(run["world_size"]):
        record = event(run, "non_finite", rank)
        assert record["clean"] == [] and record["poisoned"] == [ds_common.POISONED_FACTOR]


def test_bf16_zero2_hundred_steps_masters_stay_orthonormal(tmp_path):
    """100 steps at ZeRO-2 (bf16): the masters are orthonormal to fp32 accuracy throughout, the bf16
    copies are their rounding, and the loss curve stays within ``BF16_LOSS_RTOL`` of the fp32 run's."""
    run = launch("bf16-zero2-long", {"ds_config": bf16_config(2, tmp_path), "dtype": "bfloat16", "steps": LONG_STEPS,
                                      "record_every": 10}, tmp_path)
    ref = fp32_reference(LONG_STEPS, poisoned=False)
    records = steps_of(run)
    assert records[-1]["step"] == LONG_STEPS - 1 and len(records) == LONG_STEPS // 10 + 1
    for r in records:
        assert r["ortho"]["master"] <= ORTHO_TOL and r["ortho"]["master_vs_work"] == 0.0, (r["step"], r["ortho"])
        assert math.isclose(r["loss"], ref[r["step"]]["loss"], rel_tol=BF16_LOSS_RTOL), (r["step"], r["loss"])


# --------------------------------------------------------------------------------------------
# fp16 (DeepSpeed's loss scaling)

FP16_INITIAL_SCALE_POWER = 20  # 2²⁰: the first steps' scaled gradients overflow fp16, as in real runs
_E16 = 2.0**-11 * math.sqrt(7)
FP16_ORTHO_BOUND = 2 * _E16 + _E16**2


def test_fp16_is_refused_where_deepspeeds_accelerator_cannot_compute_in_it(tmp_path):
    """One line before any process group: DeepSpeed's CPU accelerator takes fp16 only where oneDNN has
    fp16 kernels (not on this project's CPUs)."""
    from deepspeed.accelerator import get_accelerator

    from tsvd.engine.deepspeed_engine import DeepSpeedEngine
    from tsvd.errors import UserError

    if get_accelerator().is_fp16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator computes in fp16 here")
    path = tmp_path / "zero2-fp16.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    with pytest.raises(UserError, match=f"^{path}: fp16 is on, but DeepSpeed's cpu accelerator cannot compute in fp16"):
        DeepSpeedEngine(ds_common.make_config(str(path)), ds_common.tiny_model())


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory) -> dict:
    """ZeRO-2 with ``"fp16": {"enabled": true}`` (dynamic loss scale from 2²⁰) on two CPU processes, with
    DeepSpeed's CPU fp16 gate opened (``ds_worker``'s ``fp16_on_cpu``; on a GPU the same engine code runs
    with CUDA's fp16 kernels): 8 steps, checkpoint after step 3, reloaded and steps 4–7 again, a rank
    change and one more step."""
    tmp = tmp_path_factory.mktemp("fp16-zero2")
    cfg = json.loads((REPO / "configs/ds/zero2.json").read_text())
    cfg["fp16"] = {"enabled": True, "initial_scale_power": FP16_INITIAL_SCALE_POWER}
    path = tmp / "zero2-fp16.json"
    path.write_text(json.dumps(cfg))
    spec = {"ds_config": str(path), "fp16_on_cpu": True, "steps": STEPS, "save_at": 3, "save_dir": str(tmp / "ckpt"),
            "reload": True, "rank_change": True, "check_finite": True}
    return launch("fp16-zero2", spec, tmp)


def test_fp16_zero2_overflowing_steps_are_skipped_with_their_reason_and_training_goes_on(fp16_run):
    steps = main_steps(fp16_run)
    first = steps[0]
    assert first["skipped"] and math.isfinite(first["loss"])
    assert first["reason"] == (f"fp16 gradients overflowed at loss scale {2.0**FP16_INITIAL_SCALE_POWER:g}: "
                               f"step skipped, scale lowered")
    trained = [r for r in steps if not r["skipped"]]
    assert len(trained) >= 3 and all(math.isfinite(r["grad_norm"]) and 0 < r["grad_norm"] < 10 for r in trained)
    assert trained[-1]["loss"] < steps[0]["loss"] - 0.1, [r["loss"] for r in steps]
    assert all(r["reason"].startswith("fp16 gradients overflowed") for r in steps if r["skipped"])


def test_fp16_zero2_masters_ranks_reload_rank_change_and_export(fp16_run):
    """The bf16 guarantees with fp16 copies: masters orthonormal, each fp16 factor its master rounded
    (2⁻¹² relative per entry, ``FP16_ORTHO_BOUND``), ranks bitwise equal, a reloaded checkpoint continues
    bitwise (loss scaler included), a rank change keeps masters, moments and the loss scale,
    ``read_full_params`` gives the fp32 masters."""
    from ds_worker import param_hash
    from tsvd.engine.ds_checkpoint import read_full_params

    run = fp16_run
    first, second = steps_of(run, 0), steps_of(run, 1)
    assert [r["hash"] for r in first] == [r["hash"] for r in second]
    for r in first:
        assert r["ortho"]["master"] <= ORTHO_TOL and r["ortho"]["master_vs_work"] == 0.0, (r["step"], r["ortho"])
        assert r["ortho"]["work"] <= FP16_ORTHO_BOUND, (r["step"], r["ortho"])
    expected = {r["step"]: r for r in main_steps(run)}
    replay = [r for r in first if r.get("replay")]
    assert [r["step"] for r in replay] == list(range(4, STEPS))
    for g in replay:
        for key in ("loss", "grad_norm", "skipped", "reason", "adam_step", "counters", "hash", "moments_hash"):
            assert repr(g[key]) == repr(expected[g["step"]][key]), (key, g["step"])
    change = event(run, "rank_change")
    assert change["moments_ok"] and change["params_ok"] and change["loss_scale"][0] == change["loss_scale"][1] < 2**20
    assert event(run, "non_finite")["poisoned"] == [ds_common.POISONED_FACTOR]
    saved = event(run, "saved")
    assert param_hash(read_full_params(Path(saved["dir"]))) == saved["hash"]
