"""One full training step of the Llama-3-70B architecture on CPU: tsvd vs an SCT-style path.

The model is tsvd's own decoder built from ``configs/llama3-70b.yaml`` (80 layers, d 8192, ffn 28672,
64 query / 8 KV heads, causal softmax attention with RoPE, vocab 128256; every projection, the
embedding and the LM head spectral at rank 32). No dense weight is ever materialized. Each path runs
in a fresh subprocess, so the peak RSS printed (``ru_maxrss``, measured, not estimated) is its own:

- ``tsvd``: fused AdamW applied block by block during backward (``bench/step_in_backward.py``: the
  gradients of one block at a time, freed right after its update), then the cached Cholesky-QR
  retraction of every factor;
- ``tsvd-engine``: the same optimizer and retraction run after backward, as ``TorchEngine`` does
  (all gradients coexist; freed with ``zero_grad(set_to_none=True)`` before the retraction);
- ``sct``: SCT's recipe on the same model — init ``s = 1``, foreach AdamW, Householder QR with sign
  correction of every factor after the step.

Batch 1 × ``--seq-len`` tokens of real text (the UTF-8 bytes of a standard-library source file, one
new window per step). Times are medians over the steps after the first (the first mostly measures
first-touch allocation of gradients and Adam state). ``--layers 8`` is a quick smoke run.

    python bench/llama70b_step.py                       # full 80 layers, 3 steps per path
    python bench/llama70b_step.py --layers 8 --steps 3  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("tsvd", "tsvd-engine", "sct")
PHASES = ("forward", "backward", "optimizer", "retraction", "step")
TARGETS = {"peak_rss_gb": 7.2, "retraction_share": 0.10, "step_ratio_vs_sct": 0.4}


# ------------------------------------------------------------------------------------------------
# child: one path, one process


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB = 1e9 bytes (the unit of the 7.2 GB target
    and of SCT's "7,235.5 MB"); Linux reports ``ru_maxrss`` in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def text_tokens() -> list[int]:
    """Real text: the UTF-8 bytes of a standard-library module (tokens < 256 ≪ vocab)."""
    import inspect

    from tsvd.tokenizer import ByteTokenizer

    return ByteTokenizer().encode(Path(inspect.__file__).read_text(encoding="utf-8"))


def max_orthonormality_error(model) -> float:
    """``max ‖FᵀF − I‖_F`` over every spectral factor, in float64."""
    from tsvd.retraction import spectral_factors
    from tsvd.stiefel import orthonormality_error

    return max(float(orthonormality_error(p.detach())) for p in spectral_factors(model).values())


def run_path(args: argparse.Namespace) -> dict:
    import torch

    from tsvd.config import load_config
    from tsvd.model import build_model, count_params
    from step_in_backward import StepInBackward  # bench/, on sys.path when this file runs as a script
    from tsvd.optim import build_adamw, param_groups, set_lr
    from tsvd.retraction import Retractor, spectral_factors
    from tsvd.stiefel import householder_qr

    torch.manual_seed(0)
    path = args.child
    overrides = [f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch}"]
    if args.layers:
        overrides.append(f"model.n_layers={args.layers}")
    if args.rank:
        overrides.append(f"model.spectral.rank={args.rank}")
    overrides += args.set
    if path == "sct":
        overrides.append("model.spectral.init=sct")
    cfg = load_config(args.config, overrides)
    t = cfg.train

    # Init runs ~1,100 small Householder QRs (random orthonormal factors). With 2 OpenMP threads on a
    # loaded 2-core machine each QR stalls at thread barriers (the times are in docs/results.md, "Model
    # init"); one thread is as fast on a quiet machine and far faster on a busy one.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = build_model(cfg.model)
    init_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    rss_init = peak_rss_gb()
    factors = spectral_factors(model)

    stepper = optimizer = retractor = None
    if path == "tsvd":
        stepper = StepInBackward(model, t, "cpu", t.retraction, t.lazy_tol)
        stepper.set_lr(1.0)
    elif path == "tsvd-engine":
        optimizer = build_adamw(model, t, "cpu")
        retractor = Retractor(model, t.retraction, t.lazy_tol, every=t.retract_every, stack=True)
    else:  # SCT: the default-style AdamW with multi-tensor (foreach) kernels
        optimizer = torch.optim.AdamW(param_groups(model, t), betas=tuple(t.betas), eps=t.eps, foreach=True)

    tokens = torch.tensor(text_tokens(), dtype=torch.long)
    span = args.batch * args.seq_len + 1
    rows: list[dict] = []
    model.train()
    for step in range(args.steps):
        window = tokens[step * span:(step + 1) * span]
        x = window[:-1].view(args.batch, args.seq_len)
        y = window[1:].view(args.batch, args.seq_len)
        row: dict = {}
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t1 = time.perf_counter()
        if stepper is not None:
            stepper.optimizer_seconds = 0.0
        loss.backward()
        t2 = time.perf_counter()
        if stepper is not None:  # AdamW ran inside backward, block by block
            report = stepper.finish()
            t4 = time.perf_counter()
            row.update(optimizer=stepper.optimizer_seconds, backward=t2 - t1 - stepper.optimizer_seconds,
                       retraction=t4 - t2, fallbacks=len(report.fallbacks))
        else:
            set_lr(optimizer, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if retractor is not None:
                row["fallbacks"] = len(retractor.after_step().fallbacks)
            else:  # SCT: Householder QR + sign correction of every factor, written back in place
                with torch.no_grad():
                    for p in factors.values():
                        p.copy_(householder_qr(p)[0])
            t4 = time.perf_counter()
            row.update(backward=t2 - t1, optimizer=t3 - t2, retraction=t4 - t3)
        row.update(step=step + 1, forward=t1 - t0, total=t4 - t0, loss=float(loss.detach()), rss_gb=peak_rss_gb(),
                   page_faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
        rows.append(row)
        print(f"  [{path}] step {step + 1}: " + ", ".join(
            f"{k} {row[k]:.3f} s" for k in ("forward", "backward", "optimizer", "retraction", "total"))
            + f", loss {row['loss']:.3f}, peak RSS {row['rss_gb']:.2f} GB, {row['page_faults']} page faults",
            file=sys.stderr, flush=True)

    ortho_error = max_orthonormality_error(model)  # after the last step (amortized: some factors not yet retracted)
    final = stepper.retractor if stepper is not None else retractor
    if final is not None:
        final.retract_all()
    counts = count_params(model)
    return {
        "path": path,
        "params": counts["total"],
        "spectral_params": counts["spectral"],
        "factors": len(factors),
        "init_s": init_s,
        "rss_after_init_gb": rss_init,
        "peak_rss_gb": peak_rss_gb(),
        "ortho_error": ortho_error,
        "ortho_error_exact": max_orthonormality_error(model),  # after retract_all
        "steps": rows,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def combine(runs: list[dict]) -> dict:
    """One path over its runs: per-phase medians over every steady-state step (each run's first step
    is skipped), the largest peak RSS and orthonormality error, the median init time."""
    steady = [row for r in runs for row in (r["steps"][1:] or r["steps"])]
    med = {k: statistics.median(row[k] for row in steady) for k in ("forward", "backward", "optimizer", "retraction")}
    med["step"] = statistics.median(row["total"] for row in steady)
    out = dict(runs[-1], runs=runs, steady_steps=len(steady), median=med, retraction_share=med["retraction"] / med["step"],
               retraction_share_mean=sum(row["retraction"] for row in steady) / sum(row["total"] for row in steady))
    out.update(peak_rss_gb=max(r["peak_rss_gb"] for r in runs), ortho_error=max(r["ortho_error"] for r in runs),
               ortho_error_exact=max(r["ortho_error_exact"] for r in runs),
               init_s=statistics.median(r["init_s"] for r in runs))
    out.pop("steps")
    return out


# ------------------------------------------------------------------------------------------------
# parent: machine info, one subprocess per path, the side-by-side table


def machine_info() -> dict:
    import psutil
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": psutil.virtual_memory().total / 1e9,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def child_command(args: argparse.Namespace, path: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--config", args.config,
           "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.rank:
        cmd += ["--rank", str(args.rank)]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def run_child(args: argparse.Namespace, path: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(child_command(args, path), env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"path {path!r} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    lines = []
    first = next(iter(results.values()))
    lines.append(f"model: {first['params']:,} params ({first['spectral_params']:,} spectral), "
                 f"{first['factors']} factors; batch {args.batch} x {args.seq_len} tokens; {args.repeat} run(s) per "
                 f"path, medians over steps 2..{args.steps} of each run (each column its own median); GB = 1e9 bytes")
    head = f"{'path':<12}" + "".join(f"{p:>12}" for p in PHASES) + f"{'retr.share':>11}{'peak RSS':>10}" \
           f"{'ortho err':>11}{'init':>8}"
    lines += [head, "-" * len(head)]
    for name, r in results.items():
        m = r["median"]
        lines.append(f"{name:<12}" + "".join(f"{m[p]:>11.3f}s" for p in PHASES)
                     + f"{r['retraction_share']:>10.1%} {r['peak_rss_gb']:>7.2f}GB {r['ortho_error']:>10.1e}"
                     f"{r['init_s']:>7.1f}s")
    for name, r in results.items():  # train.retract_every > 1: some factors wait for their turn
        lines.append(f"{name}: retraction {r['retraction_share_mean']:.1%} of the mean step; orthonormality error "
                     f"after the last step {r['ortho_error']:.1e}, after an exact retraction {r['ortho_error_exact']:.1e}")
    if "sct" in results:
        sct = results["sct"]["median"]
        for name, r in results.items():
            if name == "sct":
                continue
            m = r["median"]
            lines.append(f"{name} / sct: step {m['step'] / sct['step']:.3f}x, retraction "
                         f"{m['retraction'] / sct['retraction']:.3f}x, optimizer {m['optimizer'] / sct['optimizer']:.3f}x, "
                         f"peak RSS {r['peak_rss_gb'] / results['sct']['peak_rss_gb']:.3f}x")
    if "tsvd" in results:
        r = results["tsvd"]
        checks = [("peak RSS ≤ 7.2 GB", r["peak_rss_gb"] <= TARGETS["peak_rss_gb"], f"{r['peak_rss_gb']:.2f} GB"),
                  ("retraction ≤ 10% of step", r["retraction_share"] <= TARGETS["retraction_share"],
                   f"{r['retraction_share']:.1%}")]
        if "sct" in results:
            ratio = r["median"]["step"] / results["sct"]["median"]["step"]
            checks.append(("step ≤ 0.4x SCT-style", ratio <= TARGETS["step_ratio_vs_sct"], f"{ratio:.3f}x"))
        for what, ok, value in checks:
            lines.append(f"target {what}: {'met' if ok else 'MISSED'} ({value})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "llama3-70b.yaml"))
    ap.add_argument("--layers", type=int, default=0, help="override model.n_layers (0: the config's 80)")
    ap.add_argument("--rank", type=int, default=0, help="override model.spectral.rank (0: the config's)")
    ap.add_argument("--seq-len", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="steps per path; medians skip the first")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=1, help="fresh runs per path, interleaved across paths")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override, e.g. --set model.dim=256 (repeatable)")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_path(args)))
        return

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {unknown}; choose from {PATHS}")
    info = machine_info()
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']:.1f} GB RAM; "
          f"python {info['python']}, torch {info['torch']}, {args.threads} threads; {info['platform']}")
    print(f"load average at start: {load_avg()}", flush=True)
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for rep in range(args.repeat):  # interleaved (ABC CBA …) so that load drifts hit every path alike
        for path in paths if rep % 2 == 0 else paths[::-1]:
            start = time.perf_counter()
            run = run_child(args, path)
            run["load_avg"] = load_avg()
            runs[path].append(run)
            print(f"  {path}: done in {time.perf_counter() - start:.0f} s (load average {run['load_avg']})", flush=True)
    print(f"load average at end: {load_avg()}")
    results = {p: combine(rs) for p, rs in runs.items()}
    for line in report(results, args):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
