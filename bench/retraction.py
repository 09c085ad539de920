"""Retraction cost: Householder QR + sign correction (SCT) vs Cholesky-QR (tsvd's default).

Input: a random orthonormal factor ``Q0 (rows×r)`` after one Adam-sized step, ``A = Q0 + lr·sign(ξ)``
(Adam's normalized update moves every entry by ≈ lr). Both routines get the same ``A``; timings are
interleaved (hh, chol, hh, chol, ...) so background load hits both alike, and medians are reported.

    python bench/retraction.py --repeats 50 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from tsvd.stiefel import REFINE_DRIFT, drift, gram, householder_qr, orthonormality_error, orthonormalize

SHAPES = "8192x32,28672x32,8192x128,28672x128"  # Llama-3-70B projections at rank 32 and 128
LRS = "1e-4,1e-3"  # SCT's lr, and a 10× larger step (drift 0.07–0.37: docs/results.md)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def perturbed_orthonormal(rows: int, r: int, lr: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q0 = householder_qr(torch.randn(rows, r, generator=g))[0]
    return (Q0 + lr * torch.randn(rows, r, generator=g).sign()).contiguous()


def time_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each function, measured in alternation."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def run_case(rows: int, r: int, lr: float, args) -> dict:
    A = perturbed_orthonormal(rows, r, lr, args.seed)
    d = float(drift(gram(A.double())))
    Qh = householder_qr(A)[0]
    Qc, info = orthonormalize(A, "cholesky")
    path = "Householder fallback" if bool(info.householder) else ("CholeskyQR2" if d > REFINE_DRIFT else "CholeskyQR")
    times = time_interleaved(
        {"householder": lambda: householder_qr(A), "cholesky": lambda: orthonormalize(A, "cholesky")},
        args.repeats, args.warmup,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(
        shape=f"{rows}×{r}", lr=lr, drift=d, path=path,
        hh_ms=1e3 * med["householder"], chol_ms=1e3 * med["cholesky"],
        hh_spread=1e3 * (max(times["householder"]) - min(times["householder"])),
        speedup=med["householder"] / med["cholesky"],
        hh_err=float(orthonormality_error(Qh)), chol_err=float(orthonormality_error(Qc)),
        diff=float((Qh - Qc).abs().max()),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50, help="timed calls per routine and case (default 50)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--shapes", default=SHAPES, help=f"comma-separated ROWSxRANK (default {SHAPES})")
    p.add_argument("--lrs", default=LRS, help=f"comma-separated Adam step sizes (default {LRS})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; python {platform.python_version()}")
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"input: orthonormal Q0 + lr·sign(noise), fp32; {args.repeats} interleaved repeats, median per call\n")
    print("| shape | lr | drift ‖AᵀA−I‖_F | tsvd path | Householder+sign (ms) | Cholesky-QR (ms) | speed-up "
          "| ortho err HH | ortho err chol | max abs(Q_HH − Q_chol) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows, r in shapes:
        for lr in lrs:
            c = run_case(rows, r, lr, args)
            print(f"| {c['shape']} | {c['lr']:.0e} | {c['drift']:.2e} | {c['path']} | {c['hh_ms']:.2f} | "
                  f"{c['chol_ms']:.2f} | {c['speedup']:.1f}× | {c['hh_err']:.1e} | {c['chol_err']:.1e} | "
                  f"{c['diff']:.1e} |", flush=True)
    print(f"\nload average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
