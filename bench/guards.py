"""Cost of the reliability guards at the Llama-3-70B architecture, next to what they guard, in one run.

The model is ``configs/llama3-70b.yaml`` (every projection, the embedding and the head spectral at
rank 32: 452M parameters) in a ``TorchEngine``, with AdamW state created by one step. Timed, each as
the median of ``--repeat`` runs:

- ``guard``: what ``TorchEngine.train_step`` adds to a good step for the non-finite ``s`` guard —
  ``CoreSnapshot.take`` of every ``s`` with its Adam state, and ``finite_flags`` over every ``s``;
- ``retraction``: one full retraction of every factor (``engine.retractor``), as after every step;
- ``pre-save check``: ``engine.non_finite_parameters()``, run before every checkpoint (one ``aminmax``
  pass per tensor), and the obvious alternative, ``isfinite(p).all()`` per parameter;
- ``save``: ``engine.save`` of the same state (model + AdamW, ``torch.save``) into ``--dir``.

Ratios: guard / retraction (per step) and pre-save check / save (per checkpoint).

    python bench/guards.py                    # full 80 layers
    python bench/guards.py --layers 8         # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tsvd.config import load_config
from tsvd.engine.core_guard import CoreSnapshot, finite_flags
from tsvd.engine.torch_engine import TorchEngine
from tsvd.model import build_model
from tsvd.spectral import SpectralModule

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the config's 80)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement (median reported)")
    p.add_argument("--save-repeat", type=int, default=2, help="timed checkpoint writes (they are slow)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    return p.parse_args(argv)


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    cfg = load_config(ROOT / "configs" / "llama3-70b.yaml")
    if a.layers:
        cfg.model.n_layers = a.layers
    cfg.train.device = "cpu"
    t0 = time.perf_counter()
    engine = TorchEngine(cfg, build_model(cfg.model))
    for p in engine.model.parameters():  # one AdamW step with small gradients: Adam state exists
        p.grad = torch.full_like(p, 1e-3)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    cores = [m.s for m in engine.model.modules() if isinstance(m, SpectralModule)]
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"model: {cfg.model.n_layers} layers, {params:,} parameters, {len(cores)} spectral layers "
          f"(built in {time.perf_counter() - t0:.0f} s)")

    def guard() -> None:
        CoreSnapshot.take(cores, engine.optimizer)
        finite_flags(cores).tolist()

    root = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        def save() -> None:
            target = root / "ckpt"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            engine.save(target, {"step": 1})

        rows = {
            "guard (per step)": median_time(guard, a.repeat),
            "retraction (per step)": median_time(lambda: engine.retractor(), a.repeat),
            "pre-save check (per checkpoint)": median_time(engine.non_finite_parameters, a.repeat),
            "pre-save check with isfinite(p).all()": median_time(
                lambda: [bool(torch.isfinite(p).all()) for p in engine.model.parameters()], a.repeat),
            "save (per checkpoint)": median_time(save, a.save_repeat),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert engine.non_finite_parameters() == []
    print("\n| measurement | median s |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.4f} |")
    print(f"\nguard / retraction: {rows['guard (per step)'] / rows['retraction (per step)']:.4f}")
    print(f"pre-save check / save: {rows['pre-save check (per checkpoint)'] / rows['save (per checkpoint)']:.4f}")
    print(f"isfinite(p).all() / aminmax check: "
          f"{rows['pre-save check with isfinite(p).all()'] / rows['pre-save check (per checkpoint)']:.1f}")


if __name__ == "__main__":
    main()
