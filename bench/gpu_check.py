"""The GPU acceptance run: one command, one GPU, at most about 8 minutes on an H100/H200-class device.

Sections (``--sections``; all by default), each recorded in ``OUT/gpu_check.json`` as soon as it ends
(a crash keeps what was done) and summarised in a table at the end:

- ``tests``: ``pytest -m gpu`` (spectral layer forward/backward, retraction with TF32 on, rank surgery,
  the torch engine in float32 and bf16 with resume, the DeepSpeed engine) on the device;
- ``throughput``: tokens/s of a Llama block stack, dense vs spectral at rank d/8 and d/4 (strict and
  ``retract_every=4``), float32 and bf16 autocast, with the retraction's share of the step
  (``bench/throughput.py``'s interleaved rounds);
- ``retraction``: Cholesky-QR vs Householder QR at the Llama-3-70B factor shapes (``bench/retraction.py``'s
  shapes and inputs), device-synchronised medians, and the orthonormality each reaches;
- ``llama70b``: training steps of the Llama-3-70B architecture (``configs/llama3-70b.yaml``, rank 32) with
  as many of its 80 layers as fit (halving on out-of-memory), step time and peak CUDA memory;
- ``deepspeed``: ``launch/multi_gpu.sh`` with one process at ZeRO-2 in bf16: the loss falls over the first
  half, and a second launch resumes from its checkpoint and finishes.

``--cpu`` runs the same code at small sizes on the CPU (well under 3 minutes on a quiet machine;
``pytest -m gpu`` then runs with ``TSVD_GPU_TESTS_DEVICE=cpu``). Exit status 1 when a check fails.

    python bench/gpu_check.py --out runs/gpu-check               # on the GPU machine
    python bench/gpu_check.py --cpu --out /tmp/gpu-check         # the same code paths, small, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import throughput  # noqa: E402
from llama70b_step import machine_info  # noqa: E402
from retraction import SHAPES, perturbed_orthonormal  # noqa: E402
from tsvd.config import load_config  # noqa: E402
from tsvd.engine.device import Stopwatch  # noqa: E402
from tsvd.engine.torch_engine import TorchEngine  # noqa: E402
from tsvd.metrics import read_jsonl  # noqa: E402
from tsvd.model import build_model, count_params  # noqa: E402
from tsvd.retraction import spectral_factors  # noqa: E402
from tsvd.stiefel import householder_qr, orthonormality_error, orthonormalize  # noqa: E402

SECTIONS = ("tests", "throughput", "retraction", "llama70b", "deepspeed")
#: the DeepSpeed config of the launch check (ZeRO-2, bf16)
DS_BF16_ZERO2 = "configs/ds/zero2-bf16.json"
SIZES = {
    "gpu": dict(dims=[2048, 4096], layers=4, batch=4, seq_len=1024, rounds=3, steps=3, warmup=2,
                shapes=SHAPES, repeats=20, llama_layers=80, llama_seq=512, llama_steps=3, llama_overrides=[],
                ds_steps=40, ds_model=dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, rank=32)),
    "cpu": dict(dims=[64, 128], layers=1, batch=2, seq_len=32, rounds=1, steps=1, warmup=1,
                shapes="512x8,1024x16", repeats=3, llama_layers=2, llama_seq=16, llama_steps=2,
                llama_overrides=["model.dim=128", "model.n_heads=4", "model.n_kv_heads=1", "model.ffn_dim=448",
                                 "model.vocab_size=512", "model.spectral.rank=8"],
                ds_steps=12, ds_model=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, rank=8)),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Sections: each returns a JSON-able dict with "ok" (the check passed) and "seconds".


def check_tests(size: dict, device: torch.device, out: Path) -> dict:
    env = dict(os.environ, TSVD_GPU_TESTS_DEVICE=device.type)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout.splitlines()[-1]
                                                if proc.stdout.strip() else "")}
    return {"ok": proc.returncode == 0 and counts.get("passed", 0) > 0, "command": shlex.join(cmd), **counts,
            "returncode": proc.returncode}


def check_throughput(size: dict, device: torch.device, out: Path) -> dict:
    res: dict = {}
    for dtype in ("float32", "bfloat16"):
        for d in size["dims"]:
            args = Namespace(layers=size["layers"], ranks="d/8,d/4", every="4", batch=size["batch"],
                             seq_len=size["seq_len"], rounds=size["rounds"], steps=size["steps"],
                             warmup=size["warmup"], threads=torch.get_num_threads(), lr=1e-4, seed=0,
                             device=str(device), dtype=dtype)
            arms = throughput.run_width(d, args)
            res[f"d={d} {dtype}"] = {name: {k: a[k] for k in ("rank", "retract_every", "params", "tokens_per_s_median",
                                                           "tokens_per_s_min", "tokens_per_s_max", "retraction_share",
                                                           "ratio_to_dense")} for name, a in arms.items()}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"ok": True, "tokens_per_step": size["batch"] * size["seq_len"], "layers": size["layers"], "widths": res}


def check_retraction(size: dict, device: torch.device, out: Path) -> dict:
    cases = []
    for shape in size["shapes"].split(","):
        rows, r = (int(v) for v in shape.split("x"))
        A = perturbed_orthonormal(rows, r, 1e-4, seed=0).to(device)
        fns = {"householder": lambda: householder_qr(A)[0], "cholesky": lambda: orthonormalize(A, "cholesky")[0]}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for i in range(size["repeats"] + 1):  # interleaved; the first call of each is warm-up
            for name, fn in fns.items():
                with Stopwatch(device) as clock:
                    fn()
                if i:
                    times[name].append(clock.seconds)
        errors = {name: float(orthonormality_error(fn())) for name, fn in fns.items()}
        med = {name: statistics.median(t) for name, t in times.items()}
        cases.append({"shape": f"{rows}x{r}", "householder_ms": 1e3 * med["householder"],
                      "cholesky_ms": 1e3 * med["cholesky"], "speedup": med["householder"] / med["cholesky"],
                      "householder_error": errors["householder"], "cholesky_error": errors["cholesky"]})
    return {"ok": all(max(c["householder_error"], c["cholesky_error"]) <= 1e-5 for c in cases), "cases": cases}


def _llama_steps(size: dict, device: torch.device, layers: int) -> dict:
    overrides = [f"model.n_layers={layers}", f"train.seq_len={size['llama_seq']}", "train.batch_size=1",
                 f"model.max_seq_len={size['llama_seq']}", f"train.device={device}", *size["llama_overrides"]]
    cfg = load_config(ROOT / "configs" / "llama3-70b.yaml", overrides)
    torch.manual_seed(0)
    engine = TorchEngine(cfg, build_model(cfg.model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(size["llama_steps"]):
        x = torch.randint(cfg.model.vocab_size, (1, size["llama_seq"] + 1), generator=g)
        with Stopwatch(device) as clock:
            result = engine.train_step([(x[:, :-1], x[:, 1:])], 1.0)
        rows.append({"step_s": clock.seconds, "forward_backward_s": engine.timings["perf/forward_backward_s"],
                     "retraction_s": result.retraction.seconds, "loss": result.loss})
    out = {"layers": layers, "params": count_params(engine.model)["total"], "seq_len": size["llama_seq"],
           "step_s_median": statistics.median(r["step_s"] for r in rows[1:] or rows), "steps": rows,
           "ortho_error": max(float(orthonormality_error(p)) for p in spectral_factors(engine.model).values())}
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        import resource

        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def check_llama70b(size: dict, device: torch.device, out: Path) -> dict:
    layers, tried = size["llama_layers"], []
    while layers >= 1:
        try:
            res = _llama_steps(size, device, layers)
            break
        except torch.cuda.OutOfMemoryError:
            tried.append(layers)
            say(f"  llama70b: {layers} layers do not fit; trying {layers // 2}")
            layers //= 2
            torch.cuda.empty_cache()
    else:
        return {"ok": False, "did_not_fit": tried}
    return {"ok": res["ortho_error"] <= 1e-5 and all(map(lambda r: r["loss"] == r["loss"], res["steps"])),
            "did_not_fit": tried, **res}


def check_deepspeed(size: dict, device: torch.device, out: Path) -> dict:
    """Two launches of ``launch/multi_gpu.sh`` (one process, ZeRO-2, bf16): the first trains half the
    steps and checkpoints; the second, with the full step count, resumes from that checkpoint."""
    m, half = size["ds_model"], size["ds_steps"] // 2
    raw = {"seed": 0, "out_dir": str(out / "ds-run"),
           "model": {"vocab_size": 0, "dim": m["dim"], "n_layers": m["n_layers"], "n_heads": m["n_heads"],
                     "n_kv_heads": m["n_kv_heads"], "ffn_dim": m["ffn_dim"], "max_seq_len": 64,
                     "spectral": {"targets": ["q", "k", "v", "o", "gate", "up", "down"], "rank": m["rank"]}},
           "data": {"dir": str(out / "ds-data"), "corpus": ["stdlib"], "tokenizer": "byte", "max_bytes": 300_000},
           "train": {"steps": half, "batch_size": 8, "seq_len": 64, "lr": 1e-2, "spectral_lr": 1e-2, "core_lr": 1e-2,
                     "warmup_steps": 2, "eval_interval": half, "eval_batches": 2, "log_interval": 1,
                     "checkpoint_interval": half, "device": device.type}}
    config = out / "ds-run.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, NUM_GPUS="1", DS_CONFIG=DS_BF16_ZERO2, DS_ACCELERATOR=device.type,
               PYTHON=sys.executable, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    runs = []
    for steps in (half, size["ds_steps"]):
        cmd = ["bash", "launch/multi_gpu.sh", str(config), "--no-progress", "--set", f"train.steps={steps}",
               "--set", "train.dtype=bfloat16"]
        with open(out / f"deepspeed-{steps}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        runs.append({"command": shlex.join(cmd), "returncode": rc})
        if rc != 0:
            return {"ok": False, "config": DS_BF16_ZERO2, "runs": runs}
    losses = {r["step"]: r["train/loss"] for r in read_jsonl(out / "ds-run" / "metrics.jsonl") if "train/loss" in r}
    first = statistics.mean(losses[s] for s in range(1, 4))
    before = statistics.mean(losses[s] for s in range(half - 2, half + 1))
    resumed = sorted(s for s in losses if s > half)
    return {"ok": before < first and resumed == list(range(half + 1, size["ds_steps"] + 1)), "config": DS_BF16_ZERO2,
            "loss_first_steps": first, "loss_before_resume": before, "loss_last": losses[max(losses)],
            "resumed_steps": [resumed[0], resumed[-1]] if resumed else [], "runs": runs}


CHECKS = {"tests": check_tests, "throughput": check_throughput, "retraction": check_retraction,
          "llama70b": check_llama70b, "deepspeed": check_deepspeed}


# --------------------------------------------------------------------------------------------
# Summary


def table(results: dict) -> list[str]:
    lines = ["| check | result | key figures |", "|---|---|---|"]
    for name, r in results["sections"].items():
        verdict = "PASS" if r.get("ok") else "FAIL"
        if name == "throughput" and "error" not in r:
            for width, arms in r["widths"].items():
                lines.append(f"| throughput {width} | {verdict} | dense {arms['dense']['tokens_per_s_median']:,.0f} tok/s; "
                             + ", ".join(f"{n} {v['ratio_to_dense']:.2f}× (retraction {v['retraction_share']:.0%})"
                                         for n, v in arms.items() if n != "dense") + " |")
            continue
        if name == "tests":
            fig = f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped"
        elif name == "retraction":
            fig = "; ".join(f"{c['shape']}: cholesky {c['cholesky_ms']:.3f} ms vs householder {c['householder_ms']:.3f} ms "
                            f"({c['speedup']:.1f}×), error ≤ {max(c['cholesky_error'], c['householder_error']):.1e}"
                            for c in r.get("cases", []))
        elif name == "llama70b":
            mem = (f"peak {r['peak_allocated_gb']:.1f} GB allocated / {r['peak_reserved_gb']:.1f} GB reserved"
                   if "peak_allocated_gb" in r else f"peak RSS {r.get('peak_rss_gb', 0):.2f} GB")
            fig = (f"{r.get('layers')} layers ({r.get('params', 0) / 1e6:,.1f}M params), step {r.get('step_s_median', 0):.3f} s, "
                   f"{mem}, ortho error {r.get('ortho_error', float('nan')):.1e}")
        elif name == "deepspeed":
            fig = (f"{r['config']}: loss {r.get('loss_first_steps', float('nan')):.3f} → {r.get('loss_before_resume', float('nan')):.3f}"
                   f" → {r.get('loss_last', float('nan')):.3f}, resumed steps {r.get('resumed_steps')}")
        else:
            fig = ""
        if "error" in r:
            fig = r["error"]
        lines.append(f"| {name} ({r.get('seconds', 0):.0f} s) | {verdict} | {fig} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and the logs (created)")
    ap.add_argument("--cpu", action="store_true", help="small sizes on the CPU (the same code paths)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS]:
        ap.error(f"--sections: unknown {', '.join(unknown)} (valid: {', '.join(SECTIONS)})")
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device here; --cpu runs the small CPU version")
    device = torch.device("cpu" if args.cpu else "cuda")
    size = SIZES["cpu" if args.cpu else "gpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    results = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "device": str(device),
               "machine": info, "load_avg_start": os.getloadavg(), "sections": {}}
    say(f"command: {results['command']}\nmachine: {info}")
    t_start = time.perf_counter()
    for name in sections:
        say(f"{name} ...")
        t0 = time.perf_counter()
        try:
            res = CHECKS[name](size, device, out)
        except Exception as e:  # recorded, the remaining sections still run
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        res["seconds"] = time.perf_counter() - t0
        results["sections"][name] = res
        results["seconds"] = time.perf_counter() - t_start
        results["load_avg_end"] = os.getloadavg()
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        say(f"{name}: {'PASS' if res['ok'] else 'FAIL'} in {res['seconds']:.0f} s")
    print(f"command: {results['command']}")
    print(f"machine: {info.get('gpu', info['cpu'])}, torch {info['torch']}, python {platform.python_version()}; "
          f"load average {results['load_avg_start'][0]:.2f} → {results['load_avg_end'][0]:.2f}; "
          f"total {results['seconds']:.0f} s")
    print("\n".join(table(results)))
    print(f"JSON: {out / 'gpu_check.json'}")
    return 0 if all(r["ok"] for r in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
