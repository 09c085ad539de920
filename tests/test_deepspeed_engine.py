"""DeepSpeedEngine on CPU: ZeRO 0–3 through the real ``deepspeed`` launcher, two processes (gloo).

Each ZeRO stage gets two short launches of ``tests/ds_worker.py`` (shared by all tests of that stage):
a main run — 6 steps with a sloppy retraction to repair at step 1, a checkpoint after step 2, an
update that leaves one ``s`` infinite at step 3, a non-finite loss on the last rank at step 4, a rank
change (one layer 5 → 3) after step 5 and one more step — and a resumed run from the checkpoint.
Every rank records each step; the tests below assert on the records. The single-process reference is
``TorchEngine`` in this process, fed the same global batches. Two more launches: the worker without a
launcher (one process), and the real trainer CLI through ``launch/multi_gpu.sh`` (ZeRO-3, bf16).

Tolerances. Ranks must agree *bitwise* (hashes of all parameters and Adam moments), and a resumed run
must reproduce the uninterrupted one bitwise (same processes, same threads, same reduction order).
Two processes vs one: each rank averages its half of the batch and the halves are averaged by the
all-reduce, so gradients differ from the one-process mean by rounding (~1e-7 relative); Adam divides
by √v and six steps amplify that to ~1e-6 in the loss. ``LOSS_RTOL = 1e-4`` leaves two orders of
magnitude of headroom; a real bug (a wrong lr, a missed retraction, a stale master) moves the loss
by 1e-3 or more within two steps. Orthonormality: fp32 Cholesky-QR leaves ~5e-7; we require 1e-5.

Hygiene: every launch gets a free port and its own process group (killed whole on timeout), a 60 s
process-group timeout, ``TORCH_EXTENSIONS_DIR`` in a temporary directory that must stay empty (no
DeepSpeed JIT build), and ``/dev/shm/deepspeed_*`` files it created are removed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_common  # noqa: E402
from killable import child_env, kill_tree  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ds_worker.py"
STEPS, SAVE_AT, POISON = 6, 2, 4
SLOPPY, POISON_S = 1, 3  # a retraction to repair at step 1, an update making one s infinite at step 3
LOSS_RTOL = 1e-4
ORTHO_TOL = 1e-5
LAUNCH_TIMEOUT_S = 300
TIMINGS: dict[str, float] = {}
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------
# Launching


def shm_files() -> set[Path]:
    return set(Path("/dev/shm").glob("deepspeed_*")) if Path("/dev/shm").is_dir() else set()


def run_job(name: str, cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` from the repository root in its own process group (killed whole on timeout) with the
    test hygiene described above; fails with the log's tail on a non-zero exit or a timeout."""
    ext_dir = tmp / "torch_extensions"
    full_env = child_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ext_dir),
                         PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                         **(env or {}))
    for var in LAUNCH_VARS:  # this process may itself run under a launcher
        full_env.pop(var, None)
    shm_before, log = shm_files(), tmp / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
        finally:
            for f in shm_files() - shm_before:
                f.unlink(missing_ok=True)
    TIMINGS[name] = time.perf_counter() - t0
    tail = "\n".join(log.read_text().splitlines()[-40:])
    assert rc is not None, f"{name}: timed out after {LAUNCH_TIMEOUT_S} s\n{tail}"
    assert rc == 0, f"{name}: exit code {rc}\n{tail}"
    assert not ext_dir.exists() or not any(ext_dir.iterdir()), f"{name}: DeepSpeed JIT-built an op in {ext_dir}"


def launch(name: str, spec: dict, tmp: Path, nproc: int = 2) -> dict:
    """Run the worker on ``nproc`` ranks (``deepspeed`` launcher; plain ``python``, no launcher, for 1)
    and return the records rank 0 wrote."""
    from tsvd.distributed import free_port

    spec = dict(spec, out=str(tmp / f"{name}.json"))
    spec_file = tmp / f"{name}-spec.json"
    spec_file.write_text(json.dumps(spec))
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(spec_file)]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--no_local_rank", "--master_port", str(free_port()),
               str(WORKER), str(spec_file)]
    run_job(name, cmd, tmp)
    return json.loads(Path(spec["out"]).read_text())


def steps_of(run: dict, rank: int = 0) -> list[dict]:
    return [r for r in run["ranks"][rank] if "step" in r]


def event(run: dict, name: str, rank: int = 0) -> dict:
    return next(r for r in run["ranks"][rank] if r.get("event") == name)


def stage_config(stage: int, tmp: Path) -> str:
    """The shipped JSON; for ZeRO-3 with ``stage3_param_persistence_threshold: 10``, so that this toy
    model's matrices are really partitioned (the odd-size padding path is exercised) while the ``s``
    vectors (5 and 7 values) stay persistent — full on every rank besides their partition — as small
    parameters do at real sizes with the default threshold."""
    path = REPO / "configs" / "ds" / f"zero{stage}.json"
    if stage != 3:
        return str(path)
    cfg = json.loads(path.read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 10
    out = tmp / "zero3-partition-matrices.json"
    out.write_text(json.dumps(cfg))
    return str(out)


@pytest.fixture(scope="module", autouse=True)
def report_launch_times():
    """After the module: how long each launch took (shown with ``pytest -s``)."""
    yield
    print("\n" + "\n".join(f"{name}: {seconds:.1f} s" for name, seconds in TIMINGS.items()))


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda s: f"zero{s}")
def stage_runs(request, tmp_path_factory) -> tuple[int, dict, dict]:
    """(stage, main run, resumed run) — launched once per stage for all tests below."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    common = {"ds_config": stage_config(stage, tmp), "steps": STEPS, "poison": POISON, "poison_s": POISON_S,
              "sloppy": SLOPPY}
    main = launch(f"zero{stage}-main", dict(common, save_at=SAVE_AT, save_dir=str(tmp / "ckpt"), rank_change=True,
                                            check_finite=True), tmp)
    resumed = launch(f"zero{stage}-resume", dict(common, resume=str(tmp / "ckpt"), start=SAVE_AT + 1), tmp)
    return stage, main, resumed


@functools.cache
def reference() -> list[dict]:
    """``TorchEngine`` (one process) on the same global batches, with the same poisoned steps and the same
    sloppy retraction."""
    return reference_run()[0]


@functools.cache
def reference_run() -> tuple[list[dict], dict[str, torch.Tensor]]:
    """``reference()``'s steps and, after the last, ``TorchEngine.core_grad_sq()``."""
    from tsvd.engine.torch_engine import TorchEngine

    cfg = ds_common.make_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.threads)  # as each worker rank: same kernels, same rounding
    try:
        engine = TorchEngine(cfg, ds_common.tiny_model())
        out = []
        spec = {"poison": POISON, "poison_s": POISON_S, "sloppy": SLOPPY}
        for step in range(STEPS):
            res = ds_common.spec_step(engine, cfg, step, spec)
            out.append({"loss": res.loss, "grad_norm": res.grad_norm, "skipped": res.skipped, "reason": res.reason,
                        "repaired": res.retraction.repaired})
        grad_sq = engine.core_grad_sq()
    finally:
        torch.set_num_threads(threads)
    return out, grad_sq


# --------------------------------------------------------------------------------------------
# Per stage


def test_loss_decreases(stage_runs):
    _, main, _ = stage_runs
    losses = [r["loss"] for r in steps_of(main) if not r["skipped"]]
    assert losses[-1] < losses[0] - 0.1, losses


def test_factors_orthonormal_on_every_rank_after_every_step(stage_runs):
    stage, main, _ = stage_runs
    for rank in range(main["world_size"]):
        for r in steps_of(main, rank):
            assert r["ortho"]["work"] <= ORTHO_TOL, (rank, r["step"], r["ortho"])
            if stage > 0:  # the fp32 master the optimizer updates holds the same orthonormal factors
                assert r["ortho"]["master"] <= ORTHO_TOL, (rank, r["step"], r["ortho"])
                assert r["ortho"]["master_vs_work"] == 0.0, (rank, r["step"], r["ortho"])


def test_ranks_bitwise_identical(stage_runs):
    _, main, resumed = stage_runs
    for run in (main, resumed):
        assert run["world_size"] == 2
        first, second = steps_of(run, 0), steps_of(run, 1)
        assert [r["hash"] for r in first] == [r["hash"] for r in second]
        assert [r["moments_hash"] for r in first] == [r["moments_hash"] for r in second]
        assert [r["loss"] for r in first] == [r["loss"] for r in second]
        assert event(run, "spectra", 0) == event(run, "spectra", 1)


def test_core_grad_sq_is_adams_second_moment_of_s_on_every_rank(stage_runs):
    """``DeepSpeedEngine.core_grad_sq`` (the Fisher score's input) after the resumed run's last step: the
    same on both ranks, and ``TorchEngine``'s after the same steps (tolerance as the gradient norm's: the
    squared gradients of two runs that agree to ~1e-6 in the loss)."""
    _, _, resumed = stage_runs
    assert event(resumed, "spectra", 0)["grad_sq"] == event(resumed, "spectra", 1)["grad_sq"]
    got, want = event(resumed, "spectra", 0)["grad_sq"], reference_run()[1]
    assert got.keys() == want.keys()
    for name, v in want.items():
        assert float(v.sum()) > 0, name
        assert torch.allclose(torch.tensor(got[name]), v, rtol=1e-3, atol=1e-3 * float(v.max())), name


def test_two_processes_match_one_process_reference(stage_runs):
    _, main, _ = stage_runs
    ref = reference()
    got = steps_of(main)[:STEPS]
    assert [r["skipped"] for r in got] == [r["skipped"] for r in ref]
    for g, r in zip(got, ref):
        if not r["skipped"]:
            assert math.isclose(g["loss"], r["loss"], rel_tol=LOSS_RTOL), (g["step"], g["loss"], r["loss"])
            assert math.isclose(g["grad_norm"], r["grad_norm"], rel_tol=1e-3), (g["step"], g["grad_norm"], r["grad_norm"])


def test_nonfinite_loss_on_one_rank_skips_the_step_everywhere(stage_runs):
    _, main, _ = stage_runs
    for rank in range(main["world_size"]):
        steps = steps_of(main, rank)
        bad, before = steps[POISON], steps[POISON - 1]
        assert bad["skipped"] and not math.isfinite(bad["loss"])
        assert bad["hash"] == before["hash"] and bad["moments_hash"] == before["moments_hash"]
        assert bad["adam_step"] == before["adam_step"]
        assert not steps[POISON + 1]["skipped"]


def test_non_finite_s_after_the_update_is_discarded_on_every_rank(stage_runs):
    """One rank's fp32 master of one ``s`` turns infinite in the update (ZeRO 1–3: only the rank holding
    it): every rank skips the step alike — every ``s`` and its moments as before, the factors updated and
    orthonormal, AdamW's step count advanced — and names the layer, as ``TorchEngine`` does."""
    _, main, _ = stage_runs
    expected = reference()[POISON_S]["reason"]
    assert expected.startswith(f"non-finite s after the update in {ds_common.POISONED_S}:")
    for rank in range(main["world_size"]):
        steps = steps_of(main, rank)
        bad, before = steps[POISON_S], steps[POISON_S - 1]
        assert bad["skipped"] and math.isfinite(bad["loss"]) and bad["reason"] == expected
        assert bad["cores_hash"] == before["cores_hash"] and bad["cores_moments_hash"] == before["cores_moments_hash"]
        assert bad["hash"] != before["hash"] and bad["moments_hash"] != before["moments_hash"]
        assert bad["adam_step"] == before["adam_step"] + 1
        assert bad["ortho"]["work"] <= ORTHO_TOL and bad["ortho"]["master"] <= ORTHO_TOL


def test_repairs_are_reported_on_every_rank(stage_runs):
    """A measured retraction whose error exceeds the tolerance is repaired by the factor's owner, and every
    rank's report lists every repaired factor (the trainer logs them), as ``TorchEngine``'s does."""
    _, main, _ = stage_runs
    from tsvd.retraction import spectral_factors

    names = sorted(spectral_factors(ds_common.tiny_model()))
    assert sorted(reference()[SLOPPY]["repaired"]) == names
    for rank in range(main["world_size"]):
        step = steps_of(main, rank)[SLOPPY]
        assert sorted(step["repaired"]) == names
        assert step["ortho"]["work"] <= ORTHO_TOL and step["ortho"]["master"] <= ORTHO_TOL
        assert all(not s["repaired"] for s in steps_of(main, rank) if s["step"] != SLOPPY)


def test_non_finite_parameters_are_found_on_every_rank(stage_runs):
    """The check run before every checkpoint: nothing after training; one infinity in one factor — at
    ZeRO-3 in one rank's partition only — is named on every rank."""
    _, main, _ = stage_runs
    for rank in range(main["world_size"]):
        record = event(main, "non_finite", rank)
        assert record["clean"] == [] and record["poisoned"] == [ds_common.POISONED_FACTOR]


def test_checkpoint_reads_back_full_parameters_without_an_engine(stage_runs):
    """``read_full_params`` (what ``tsvd export`` uses) returns, bitwise, the parameters the engine held
    when it saved — at ZeRO-3 reassembled from both ranks' fp32 partitions (odd sizes padded)."""
    from ds_worker import param_hash
    from tsvd.engine.ds_checkpoint import read_full_params

    _, main, _ = stage_runs
    saved = event(main, "saved")
    assert param_hash(read_full_params(Path(saved["dir"]))) == saved["hash"]


def test_resume_reproduces_the_uninterrupted_run_bitwise(stage_runs):
    _, main, resumed = stage_runs
    assert event(resumed, "resumed")["client_state"] == {"step": SAVE_AT + 1, "ranks": {ds_common.SHRUNK: 5}}
    expected = steps_of(main)[SAVE_AT + 1:STEPS]
    got = steps_of(resumed)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for key in ("step", "loss", "grad_norm", "skipped", "lrs", "adam_step", "counters", "hash", "moments_hash"):
            assert repr(g[key]) == repr(e[key]), (key, g["step"], g[key], e[key])  # repr: nan == nan


def test_rank_change_keeps_moments_and_counters_and_growth_keeps_the_loss(stage_runs):
    _, main, _ = stage_runs
    for rank in range(main["world_size"]):
        change = event(main, "rank_change", rank)
        assert change["moments_ok"] and change["params_ok"] and change["same_root"]
        assert change["shape"] == [ds_common.DIM, 3]
        assert change["adam_step"][0] == change["adam_step"][1] > 0
        assert change["lrs"][0] == change["lrs"][1]
        assert change["counters"][0] == change["counters"][1]
        plan = event(main, "rank_plan", rank)
        assert plan == event(main, "rank_plan", 0)  # same changes, losses and shapes on every rank
        assert [(c["layer"], c["old"], c["new"]) for c in plan["changes"]] == [(ds_common.GROWN, 5, 7)]
        assert plan["shape"] == [ds_common.DIM, 7]
        assert math.isclose(*plan["loss"], rel_tol=1e-6)  # new directions have s = 0: W unchanged
        after = steps_of(main, rank)[-1]
        assert after["step"] == STEPS and not after["skipped"] and math.isfinite(after["loss"])
        assert after["adam_step"] == change["adam_step"][1] + 1
        assert after["ortho"]["work"] <= ORTHO_TOL


# --------------------------------------------------------------------------------------------
# Other launches


def test_single_process_without_launcher_equals_torch_engine(tmp_path):
    """``python worker.py`` (no launcher, world size 1, ZeRO-0) follows ``TorchEngine`` bitwise."""
    run = launch("single", {"ds_config": str(REPO / "configs/ds/zero0.json"), "steps": STEPS, "poison": POISON,
                            "poison_s": POISON_S, "sloppy": SLOPPY}, tmp_path, nproc=1)
    assert run["world_size"] == 1
    got = [(r["loss"], r["grad_norm"], r["skipped"]) for r in steps_of(run)]
    want = [(r["loss"], r["grad_norm"], r["skipped"]) for r in reference()]
    assert repr(got) == repr(want)  # repr: nan == nan


def test_gradient_growth_under_zero3_matches_zero1(tmp_path):
    """Gradient-sketch growth at ZeRO-3 (factors gathered by ``engine.sketch_factors``) adds, up to
    rounding, the directions ZeRO-1 adds: the projectors onto the two new spans differ by ≤ 1e-3 (the
    runs agree to ~1e-6; see LOSS_RTOL). The random fallback's span is far from both (> 0.5): the
    comparison can tell sketched directions from random ones."""
    from tsvd.sketch import random_directions

    runs = {stage: launch(f"sketch-zero{stage}", {"ds_config": stage_config(stage, tmp_path), "steps": 2,
                                                  "sketch_growth": True}, tmp_path) for stage in (1, 3)}
    grown = {}
    for stage, run in runs.items():
        records = [event(run, "sketch_growth", rank) for rank in range(run["world_size"])]
        assert all(r["usable"] for r in records), stage
        assert all(r == records[0] | {"usable": r["usable"]} for r in records), stage  # same result on every rank
        assert [(c["layer"], c["old"], c["new"]) for c in records[0]["changes"]] == [(ds_common.GROWN, 5, 7)]
        U, V = (torch.tensor(records[0][f"{k}_after"]) for k in ("U", "V"))
        for F in (U, V):
            assert (F.T @ F - torch.eye(7)).norm() <= ORTHO_TOL, stage
        grown[stage] = (U[:, 5:], V[:, 5:], torch.tensor(records[0]["U_before"]), torch.tensor(records[0]["V_before"]))

    def distance(A: torch.Tensor, B: torch.Tensor) -> float:
        return float((A @ A.T - B @ B.T).norm())

    (U1, V1, U_old, V_old), (U3, V3, _, _) = grown[1], grown[3]
    assert distance(U1, U3) <= 1e-3 and distance(V1, V3) <= 1e-3
    U_rand, V_rand = random_directions(U_old, V_old, 2, torch.Generator().manual_seed(ds_common.make_config().seed
                                                                                      * 1_000_003 + 3))
    assert distance(U_rand, U1) > 0.5 and distance(V_rand, V1) > 0.5


@pytest.fixture(scope="module")
def cli_zero3_run(tmp_path_factory) -> Path:
    """``launch/multi_gpu.sh`` → ``deepspeed`` → ``python -m tsvd.cli train``: the trainer on 2 CPU
    processes with the shipped ``zero3-bf16.json`` (bf16 autocast; tiny parameters stay unpartitioned,
    the persistence path), 4 steps with checkpoints at 2 and 4; returns the run's out_dir."""
    from conftest import tiny_raw
    from killable import write_config
    from tsvd.distributed import free_port

    tmp = tmp_path_factory.mktemp("cli-zero3")
    raw = tiny_raw(tmp)
    config = write_config(tmp / "tiny.yaml", raw, "train.steps=4", "train.checkpoint_interval=2",
                          "train.eval_interval=2", "train.log_interval=2")
    run_job("cli-prepare", [sys.executable, "-m", "tsvd.cli", "prepare", str(config), "--no-progress"], tmp)
    run_job("cli-zero3-bf16", ["bash", "launch/multi_gpu.sh", str(config), "--no-progress",
                               "--set", "engine.timeout_s=60"], tmp,
            env={"NUM_GPUS": "2", "ZERO": "3", "BF16": "1", "MASTER_PORT": str(free_port())})
    return Path(raw["out_dir"])


def test_cli_through_launch_script_bf16_zero3(cli_zero3_run):
    """The launched trainer learns and writes checkpoints that load with ``weights_only=True``."""
    from tsvd.engine.ds_checkpoint import read_client_state

    run = cli_zero3_run
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "checkpoints/step-00000004/meta.json").read_text())
    assert summary["step"] == 4 and summary["val_loss"] < math.log(meta["config"]["model"]["vocab_size"]), summary
    assert meta["engine"] == "deepspeed" and set(meta["ranks"].values()) == {8}
    assert read_client_state(run / "checkpoints/step-00000004")["step"] == 4


def test_export_of_a_deepspeed_run(cli_zero3_run, tmp_path):
    """``tsvd export`` of a ZeRO-3 run (tied embeddings): a ``LlamaForCausalLM`` whose logits are the tsvd
    model's, rebuilt from the reassembled checkpoint (fp32; ATOL as in tests/hf_common.py)."""
    transformers = pytest.importorskip("transformers")
    from tsvd.cli import main
    from tsvd.engine.ds_checkpoint import read_full_params
    from tsvd.hf import load_tsvd_checkpoint

    model, meta = load_tsvd_checkpoint(cli_zero3_run)
    assert meta["step"] == 4 and meta["config"]["model"]["tie_embeddings"]
    params = read_full_params(cli_zero3_run / "checkpoints/step-00000004")
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert main(["export", str(cli_zero3_run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    x = torch.randint(0, meta["config"]["model"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x)[0], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Pure helpers (no processes)


def test_assign_owners_balances_cost_deterministically():
    from tsvd.engine.retraction_owners import assign_owners

    costs = {"a": 8, "b": 7, "c": 6, "d": 5, "e": 4}
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(dict(reversed(costs.items())), 2)
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(2)]
    assert max(loads) - min(loads) <= max(costs.values())  # greedy bound: off by at most one item
    assert set(assign_owners(costs, 1).values()) == {0}


def test_skeleton_materializes_a_plain_copy_with_new_values():
    from tsvd.engine.zero_params import materialize, meta_skeleton

    model = ds_common.tiny_model()
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    values = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    copy = materialize(skeleton, values)
    assert all(torch.equal(p, values[n]) for n, p in copy.named_parameters())
    assert torch.equal(copy.rope_cos, model.rope_cos)
    x = torch.zeros(1, 3, dtype=torch.long)
    assert copy(x, x)[1].isfinite()


def test_chunks_by_bytes_bound_each_gather_and_keep_the_order():
    from tsvd.engine.zero_params import chunks_by_bytes

    sizes = [4, 4, 10, 1, 1, 1]  # fp32 elements: 16, 16, 40, 4, 4, 4 bytes
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate(sizes)]
    chunks = [[name for name, _ in c] for c in chunks_by_bytes(params, limit=32)]
    assert chunks == [["p0", "p1"], ["p2"], ["p3", "p4", "p5"]]  # a parameter over the limit goes alone
