"""How exact the retraction's Gram is on a device: the diagnostic behind ``tsvd.stiefel.gram``'s float64
accumulation on CUDA (docs/results.md, "GPU acceptance run").

Per Llama-3-70B factor shape (rank 32): a factor after an Adam-sized step, its Gram as one float32
product, as a batch of 8,192-row blocks summed, and in float64 — each Gram's largest error against
float64, the orthonormality ``‖QᵀQ − I‖_F`` its Cholesky-QR leaves, and the Grams' times. Then the
Llama-3-70B architecture for a few steps through the single-process engine (stacked retraction): the
largest orthonormality error per factor shape after each step.

    python bench/gram_accuracy.py --device cuda                    # on the GPU machine (under a minute)
    python bench/gram_accuracy.py --device cpu --layers 2 --steps 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsvd.config import load_config  # noqa: E402
from tsvd.engine.device import Stopwatch  # noqa: E402
from tsvd.engine.torch_engine import TorchEngine  # noqa: E402
from tsvd.model import build_model  # noqa: E402
from tsvd.retraction import spectral_factors  # noqa: E402
from tsvd.stiefel import householder_qr, matmul, orthonormality_error, orthonormalize  # noqa: E402

BLOCK_ROWS = 8192


def plain_gram(A: torch.Tensor) -> torch.Tensor:
    """``AᵀA`` as one product in ``A``'s dtype (what ``tsvd.stiefel.gram`` did everywhere before)."""
    return matmul(A.mT, A)


def blocked_gram(A: torch.Tensor, rows: int = BLOCK_ROWS) -> torch.Tensor:
    """``AᵀA`` as a batch of ``rows``-row blocks' Grams, summed (plus the remainder's)."""
    k = A.shape[-2] // rows
    if k < 2:
        return plain_gram(A)
    H = A[: k * rows].unflatten(0, (k, rows))
    G = torch.matmul(H.mT, H).sum(0)
    return G if k * rows == A.shape[-2] else G + plain_gram(A[k * rows:])


def float64_gram(A: torch.Tensor) -> torch.Tensor:
    D = A.double()
    return matmul(D.mT, D).to(A.dtype)


def milliseconds(fn, device: torch.device, repeats: int = 30) -> float:
    """Mean device time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    with Stopwatch(device) as clock:
        for _ in range(repeats):
            fn()
    return clock.seconds / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=80, help="layers of the 70B architecture (default 80)")
    p.add_argument("--steps", type=int, default=3, help="engine steps (default 3)")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"command: python {' '.join(sys.argv)}\ndevice: {device}, torch {torch.__version__}")
    grams = {"one float32 product": plain_gram, f"{BLOCK_ROWS}-row blocks": blocked_gram, "float64": float64_gram}
    for m in (8192, 28672, 128256):
        g = torch.Generator(device=device).manual_seed(0)
        Q0 = householder_qr(torch.randn(m, 32, device=device, dtype=torch.float64, generator=g))[0].float()
        A = (Q0 + 1e-3 * torch.randn(m, 32, device=device, generator=g).sign()).contiguous()
        exact = plain_gram(A.double())
        for name, fn in grams.items():
            G = fn(A)
            Q, _ = orthonormalize(A, "cholesky", G=G)
            print(f"{m}×32, {name}: Gram max error {float((G.double() - exact).abs().max()):.2e}, "
                  f"orthonormality {float(orthonormality_error(Q)):.2e}, {milliseconds(lambda: fn(A), device):.4f} ms",
                  flush=True)
    cfg = load_config(ROOT / "configs" / "llama3-70b.yaml",
                      [f"model.n_layers={args.layers}", "train.seq_len=512", "train.batch_size=1",
                       "model.max_seq_len=512", f"train.device={device}"])
    torch.manual_seed(0)
    engine = TorchEngine(cfg, build_model(cfg.model))
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        x = torch.randint(cfg.model.vocab_size, (1, 513), generator=g)
        engine.train_step([(x[:, :-1], x[:, 1:])], 1.0)
        worst: dict[str, tuple[float, str]] = {}
        for name, f in spectral_factors(engine.model).items():
            shape, e = "×".join(map(str, f.shape)), float(orthonormality_error(f))
            if e > worst.get(shape, (0.0, ""))[0]:
                worst[shape] = (e, name)
        print(f"70B architecture ({args.layers} layers), after step {step}: largest orthonormality error per shape: "
              + ", ".join(f"{s} {e:.1e} ({n})" for s, (e, n) in worst.items()), flush=True)


if __name__ == "__main__":
    main()
