"""Retraction cost. Two modes:

``--mode methods`` (default): Householder QR + sign correction (SCT) vs Cholesky-QR (tsvd's default) on
one factor. Input: a random orthonormal factor ``Q0 (rows×r)`` after one Adam-sized step,
``A = Q0 + lr·sign(ξ)`` (Adam's normalized update moves every entry by ≈ lr). Both routines get the same
``A``; timings are interleaved (hh, chol, hh, chol, ...) so background load hits both alike, and medians
are reported.

``--mode floor``: the strict retraction against its arithmetic floor at the Llama-3-70B factor shapes
(rank 32). Per shape, a set of same-shape factors is retracted by ``Retractor`` — stacked (batched:
``TorchEngine``) and factor by factor (DeepSpeed) — and the floor is the best of the two bare GEMMs a
Cholesky-QR retraction cannot avoid (Gram ``AᵀA`` and ``A·X``, ``4·m·r²`` flops, preallocated outputs,
batched or per factor), all interleaved. Ratio = retraction / floor, per factor; the model total weights
each shape by its count in the 70B model (1,124 factors).

``--mode kernels``: what a retraction *below* that floor could be built from, per 70B shape and factor:
the floor's two fp32 GEMMs through torch and through NumPy's BLAS, and a mixed-precision correction
(round the factor to bf16 once, bf16 Gram, fp32 Cholesky, bf16 product with ``R⁻¹ − I``, added to the
fp32 factor) with the orthonormality error it leaves (against a float64 Gram). Interleaved, medians.

    python bench/retraction.py --repeats 50 --threads 2
    python bench/retraction.py --mode floor --threads 1 --repeats 15
    python bench/retraction.py --mode kernels --threads 1 --repeats 15
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

from tsvd.stiefel import (REFINE_DRIFT, cholesky_r, drift, gram, householder_qr, matmul, orthonormality_error,
                          orthonormalize)

SHAPES = "8192x32,28672x32,8192x128,28672x128"  # Llama-3-70B projections at rank 32 and 128
LRS = "1e-4,1e-3"  # SCT's lr, and a 10× larger step (drift 0.07–0.37: docs/results.md)
#: rows of each rank-32 factor shape of the Llama-3-70B model and how many factors have it (80 layers:
#: 9 of 8192 rows, 2 of 1024 (k, v outputs), 3 of 28672 per layer; embedding and head: 8192 and 128256).
SHAPES_70B = {8192: 9 * 80 + 2, 1024: 2 * 80, 28672: 3 * 80, 128256: 2}
#: bytes of same-shape factors timed per shape (at least two factors)
FLOOR_SET_BYTES = 32 * 2**20


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


class _Factors(torch.nn.Module):
    """``n`` spectral factors of shape ``rows × r`` (``n/2`` square spectral layers), for ``Retractor``."""

    def __init__(self, rows: int, r: int, n: int) -> None:
        super().__init__()
        from tsvd.spectral import SpectralLinear

        self.layers = torch.nn.ModuleList(SpectralLinear(rows, rows, r) for _ in range((n + 1) // 2))


def floor_case(rows: int, r: int, lr: float, args) -> dict:
    """Per-factor milliseconds of the stacked and the per-factor retraction and of the two-GEMM floor."""
    from tsvd.retraction import Retractor, spectral_factors

    n = max(2, FLOOR_SET_BYTES // (rows * r * 4) // 2 * 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # init: many small QRs
    models = {k: _Factors(rows, r, n) for k in ("stacked", "per factor", "floor")}
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(args.seed)
    step = lr * torch.randn(rows, r, generator=g).sign()
    retractors = {"stacked": Retractor(models["stacked"], stack=True), "per factor": Retractor(models["per factor"])}
    S = torch.stack(list(spectral_factors(models["floor"]).values())).detach()
    X = torch.eye(r).expand(n, r, r).contiguous()
    G, out = torch.empty(n, r, r), torch.empty_like(S)

    def move(model) -> None:  # an Adam-sized step on every factor, outside the timed call
        with torch.no_grad():
            for p in spectral_factors(model).values():
                p.add_(step)

    def floor_batched() -> None:
        matmul(S.mT, S, out=G)
        matmul(S, X, out=out)

    def floor_each() -> None:
        for A, Gi, Xi, Oi in zip(S, G, X, out):
            matmul(A.mT, A, out=Gi)
            matmul(A, Xi, out=Oi)

    fns = {"floor batched": floor_batched, "floor per factor": floor_each}
    for name, ret in retractors.items():
        fns[name] = ret
    for _ in range(args.warmup):
        for name, fn in fns.items():
            if name in retractors:
                move(models[name])
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if name in retractors:
                move(models[name])
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) / n for k, v in times.items()}
    floor = min(ms["floor batched"], ms["floor per factor"])
    err = max(float(orthonormality_error(p)) for p in spectral_factors(models["stacked"]).values())
    return dict(rows=rows, r=r, n=n, ms=ms, floor_ms=floor, gflops=4 * rows * r * r / floor / 1e6,
                ratio_stacked=ms["stacked"] / floor, ratio_each=ms["per factor"] / floor, ortho_err=err)


def bf16_correction_(A: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Make ``A (m×r, fp32)`` orthonormal to bf16 accuracy, in place: bf16 Gram, fp32 Cholesky ``G = RᵀR``,
    then ``A += bf16(A)·(R⁻¹ − I)`` — the two large products in bf16, the correction small enough that its
    rounding matters little. ``scratch``: preallocated ``(bf16 m×r, bf16 m×r, fp32 m×r)``, as an engine
    would keep them. Returns the Gram."""
    Ab, P, Pf = scratch
    Ab.copy_(A)
    G = (Ab.mT @ Ab).float()
    _, R_inv, _ = cholesky_r(G)
    torch.mm(Ab, (R_inv - torch.eye(A.shape[1])).to(torch.bfloat16), out=P)
    A.add_(Pf.copy_(P))
    return G


def kernels_case(rows: int, r: int, lr: float, args) -> dict:
    """Per-factor milliseconds of the candidate kernels for one drifted factor, and their accuracy."""
    import numpy as np

    A = perturbed_orthonormal(rows, r, lr, args.seed)
    Ab, X = A.to(torch.bfloat16), torch.eye(r)
    G, out = torch.empty(r, r), torch.empty_like(A)
    An, Xn, Gn, On = A.numpy(), X.numpy(), G.numpy().copy(), out.numpy().copy()
    Cb = (0.01 * torch.randn(r, r)).to(torch.bfloat16)
    B = A.clone()  # the in-place candidates' own copy
    scratch = (torch.empty_like(Ab), torch.empty_like(Ab), torch.empty_like(A))
    P, Pf = scratch[1], scratch[2]
    fns = {
        "torch Gram": lambda: matmul(A.mT, A, out=G), "torch GEMM": lambda: matmul(A, X, out=out),
        "numpy Gram": lambda: np.matmul(An.T, An, out=Gn), "numpy GEMM": lambda: np.matmul(An, Xn, out=On),
        "to bf16": lambda: scratch[0].copy_(A), "bf16 Gram": lambda: Ab.mT @ Ab,
        "bf16 GEMM + add": lambda: B.add_(Pf.copy_(torch.mm(Ab, Cb, out=P))),
        "bf16 correction": lambda: bf16_correction_(B, scratch),
        "strict retraction": lambda: orthonormalize(A, "cholesky"),
    }
    times = time_interleaved(fns, args.repeats, args.warmup)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    Q = A.clone()
    Gb = bf16_correction_(Q, scratch)
    exact = gram(A.double())
    return dict(rows=rows, r=r, ms=ms, drift=float(drift(exact)),
                gram_err=float((Gb.double() - exact).abs().max()),
                err_bf16=float(orthonormality_error(Q)), err_strict=float(orthonormality_error(orthonormalize(A, "cholesky")[0])))


def main_kernels(args) -> None:
    r = args.rank
    print("| factor | drift | torch Gram + GEMM | NumPy Gram + GEMM | to bf16 | bf16 Gram | bf16 GEMM + add "
          "| bf16 correction (whole) | strict retraction | bf16 Gram max error | ortho err bf16 / strict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    total = {"torch": 0.0, "numpy": 0.0, "bf16": 0.0, "strict": 0.0}
    for rows in SHAPES_70B:
        c = kernels_case(rows, r, args.lr, args)
        ms = c["ms"]
        print(f"| {rows}×{r} | {c['drift']:.1e} | {ms['torch Gram']:.3f} + {ms['torch GEMM']:.3f} | "
              f"{ms['numpy Gram']:.3f} + {ms['numpy GEMM']:.3f} | {ms['to bf16']:.3f} | {ms['bf16 Gram']:.3f} | "
              f"{ms['bf16 GEMM + add']:.3f} | {ms['bf16 correction']:.3f} | {ms['strict retraction']:.3f} | "
              f"{c['gram_err']:.1e} | {c['err_bf16']:.1e} / {c['err_strict']:.1e} |", flush=True)
        n = SHAPES_70B[rows]
        total["torch"] += n * (ms["torch Gram"] + ms["torch GEMM"])
        total["numpy"] += n * (ms["numpy Gram"] + ms["numpy GEMM"])
        total["bf16"] += n * ms["bf16 correction"]
        total["strict"] += n * ms["strict retraction"]
    t = total["torch"]
    print(f"\n70B model ({sum(SHAPES_70B.values())} factors), weighted by shape counts (ms, / torch fp32 floor): "
          f"torch floor {t:.0f}; NumPy floor {total['numpy']:.0f} ({total['numpy'] / t:.2f}×); "
          f"bf16 correction {total['bf16']:.0f} ({total['bf16'] / t:.2f}×); "
          f"strict retraction, one factor at a time {total['strict']:.0f} ({total['strict'] / t:.2f}×)")


def peak_gflops(repeats: int = 5) -> float:
    """Best-of fp32 GEMM throughput of this machine (2048² · 2048), for reference."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main_floor(args) -> None:
    rows_list = [int(s.lower().split("x")[0]) for s in args.shapes.split(",")] if args.shapes != SHAPES else list(SHAPES_70B)
    r = args.rank
    print(f"peak fp32 GEMM (2048³, best of 5): {peak_gflops():.1f} GFLOPS\n")
    print("| factor | factors timed | floor: Gram + GEMM (ms/factor, GFLOPS) | floor batched / per factor (ms) "
          "| stacked retraction (ms) | ratio | per-factor retraction (ms) | ratio | ortho err |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = {"floor": 0.0, "stacked": 0.0, "per factor": 0.0}
    for rows in rows_list:
        c = floor_case(rows, r, args.lr, args)
        ms = c["ms"]
        print(f"| {rows}×{r} | {c['n']} | {c['floor_ms']:.3f} ({c['gflops']:.0f}) | {ms['floor batched']:.3f} / "
              f"{ms['floor per factor']:.3f} | {ms['stacked']:.3f} | {c['ratio_stacked']:.2f}× | {ms['per factor']:.3f} | "
              f"{c['ratio_each']:.2f}× | {c['ortho_err']:.1e} |", flush=True)
        count = SHAPES_70B.get(rows, 0)
        total["floor"] += count * c["floor_ms"]
        total["stacked"] += count * ms["stacked"]
        total["per factor"] += count * ms["per factor"]
    if total["floor"]:
        print(f"\n70B model ({sum(SHAPES_70B.values())} factors), weighted by shape counts: floor {total['floor']:.0f} ms, "
              f"stacked {total['stacked']:.0f} ms ({total['stacked'] / total['floor']:.2f}×), per factor "
              f"{total['per factor']:.0f} ms ({total['per factor'] / total['floor']:.2f}×); target ≤ 1.3×")


def main_methods(args) -> None:
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    print("| shape | lr | drift ‖AᵀA−I‖_F | tsvd path | Householder+sign (ms) | Cholesky-QR (ms) | speed-up "
          "| ortho err HH | ortho err chol | max abs(Q_HH − Q_chol) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows, r in shapes:
        for lr in lrs:
            c = run_case(rows, r, lr, args)
            print(f"| {c['shape']} | {c['lr']:.0e} | {c['drift']:.2e} | {c['path']} | {c['hh_ms']:.2f} | "
                  f"{c['chol_ms']:.2f} | {c['speedup']:.1f}× | {c['hh_err']:.1e} | {c['chol_err']:.1e} | "
                  f"{c['diff']:.1e} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50, help="timed calls per routine and case (default 50)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--shapes", default=SHAPES, help=f"comma-separated ROWSxRANK (default {SHAPES})")
    p.add_argument("--lrs", default=LRS, help=f"comma-separated Adam step sizes (default {LRS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("methods", "floor", "kernels"), default="methods",
                   help="methods: Householder vs Cholesky-QR per shape; floor: strict retraction vs its arithmetic "
                   "floor; kernels: what a retraction below that floor could be built from (other BLAS, bf16)")
    p.add_argument("--rank", type=int, default=32, help="--mode floor/kernels: factor rank (default 32)")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="--mode floor/kernels: Adam-sized step before each call (default 1e-4)")
    args = p.parse_args()
    if args.mode == "kernels" and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        # NumPy's BLAS (loaded with torch) reads its thread count once, at load: start again with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads)})
    torch.set_num_threads(args.threads)
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; python {platform.python_version()}")
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    inputs = {
        "methods": "orthonormal Q0 + lr·sign(noise), fp32; {repeats} interleaved repeats, median per call",
        "floor": "orthonormal factors + {lr:g}·sign(noise) before each call, fp32; {repeats} interleaved repeats, "
                 "median per call divided by the factors per call",
        "kernels": "an orthonormal factor + {lr:g}·sign(noise), fp32; {repeats} interleaved repeats, median per call "
                   "(ms per factor)",
    }
    print("input: " + inputs[args.mode].format(lr=args.lr, repeats=args.repeats) + "\n")
    {"methods": main_methods, "floor": main_floor, "kernels": main_kernels}[args.mode](args)
    print(f"\nload average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

if __name__ == "__main__":
    main()
