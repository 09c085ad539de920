"""Training throughput (tokens/s) of a Llama block stack: dense vs spectral, strict vs amortized retraction.

One process, one ``TorchEngine`` per arm (the real training step: forward, backward, fused AdamW, the
guards and the retraction), all built up front and run interleaved: every round runs ``--steps`` timed
steps of each arm, in alternating order, so that load on a shared machine hits every arm alike. Arms per
width ``d``: ``dense`` (``nn.Linear`` projections), and for each rank ``d/8``, ``d/4`` (``--ranks``) the
spectral model (static rank: every block projection q, k, v, o, gate, up, down at that rank) with the
strict retraction (``retract_every=1``) and amortized (``retract_every=k`` for each ``--every``).

Reported per arm: median tokens/s over all timed steps and its spread (min–max), the retraction's share
of the step (summed retraction seconds / summed step seconds) and the load average of each round; per
spectral arm the ratio to dense, computed within each round (same load) and then the median over rounds.
Embedding and head are dense over a 256-token byte vocabulary, so the blocks dominate. Data are random
tokens (speed only); ``--json`` writes everything.

    python bench/throughput.py                                    # d 1024 and 2048, 2 layers
    python bench/throughput.py --dims 1024 --layers 1 --rounds 2 --steps 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsvd.config import Config, ModelConfig, SpectralConfig  # noqa: E402
from tsvd.engine.torch_engine import TorchEngine  # noqa: E402
from tsvd.model import build_model  # noqa: E402

TARGETS = {"d/8": 2.3, "d/4": 1.6}  # spectral / dense tokens/s at d = 2048, amortized (issue #19)
BLOCK_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def load_avg() -> float:
    return os.getloadavg()[0]


def model_config(d: int, layers: int, rank: int | None, seq: int) -> ModelConfig:
    """A Llama-3-shaped block stack: head dim 128, 4 query heads per KV head, ffn 3.5·d (multiple of 64)."""
    heads = max(1, d // 128)
    spectral = SpectralConfig(targets=BLOCK_TARGETS, rank=rank) if rank else SpectralConfig(targets=[])
    return ModelConfig(vocab_size=256, dim=d, n_layers=layers, n_heads=heads, n_kv_heads=max(1, heads // 4),
                       ffn_dim=int(3.5 * d) // 64 * 64, max_seq_len=seq, tie_embeddings=False, spectral=spectral)


def build_arm(d: int, rank: int | None, every: int, args) -> TorchEngine:
    cfg = Config()
    cfg.model = model_config(d, args.layers, rank, args.seq_len)
    t = cfg.train
    t.batch_size, t.seq_len, t.threads, t.retract_every = args.batch, args.seq_len, args.threads, every
    t.device, t.dtype = args.device, args.dtype
    t.lr = t.spectral_lr = t.core_lr = args.lr
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # init: many small QRs, which stall at thread barriers on a busy machine
    model = build_model(cfg.model)
    torch.set_num_threads(threads)
    return TorchEngine(cfg, model)


def arms_for(d: int, args) -> dict[str, tuple[int | None, int]]:
    """``{name: (rank or None for dense, retract_every)}``."""
    arms: dict[str, tuple[int | None, int]] = {"dense": (None, 1)}
    for frac in args.ranks.split(","):
        r = d // int(frac.split("/")[1])
        arms[f"r={frac} strict"] = (r, 1)
        for k in (int(v) for v in args.every.split(",")):
            arms[f"r={frac} k={k}"] = (r, k)
    return arms


def run_width(d: int, args) -> dict:
    arms = arms_for(d, args)
    engines = {name: build_arm(d, rank, every, args) for name, (rank, every) in arms.items()}
    g = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch * args.seq_len

    def batch():
        x = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g)
        return [(x[:, :-1], x[:, 1:])]

    def step(engine) -> dict:
        micro = batch()
        t0 = time.perf_counter()
        result = engine.train_step(micro, 1.0)
        r = result.retraction
        return {"step_s": time.perf_counter() - t0, "retraction_s": r.seconds, "retracted": len(r.retracted),
                "early": len(r.early), "max_drift": r.max_drift}

    for name, engine in engines.items():  # first steps: Adam state, stacks, allocator
        for _ in range(args.warmup):
            step(engine)
    rows = {name: [] for name in engines}
    rounds = []
    for rnd in range(args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(engines)[::-1]
        per_round = {}
        for name in order:
            load = load_avg()
            for _ in range(args.steps):
                rows[name].append({"round": rnd, "load": load, **step(engines[name])})
            mine = [r for r in rows[name] if r["round"] == rnd]
            per_round[name] = tokens_per_step * len(mine) / sum(r["step_s"] for r in mine)
        rounds.append(per_round)
        print(f"  d={d} round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in per_round.items())
              + f" (load {load_avg():.1f})", file=sys.stderr, flush=True)
    out = {}
    for name, (rank, every) in arms.items():
        tps = [tokens_per_step / r["step_s"] for r in rows[name]]
        out[name] = {
            "rank": rank, "retract_every": every,
            "params": sum(p.numel() for p in engines[name].model.parameters()),
            "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "retraction_share": sum(r["retraction_s"] for r in rows[name]) / sum(r["step_s"] for r in rows[name]),
            "factors": len(engines[name].retractor.factors()),
            "retracted_per_step": statistics.mean(r["retracted"] for r in rows[name]),
            "early_per_step": statistics.mean(r["early"] for r in rows[name]),
            "max_drift": max(r["max_drift"] for r in rows[name]),
            "load_avg": [r["load"] for r in rows[name][::args.steps]],
            "ratio_to_dense_per_round": [rd[name] / rd["dense"] for rd in rounds],
            "steps": rows[name],
        }
        out[name]["ratio_to_dense"] = statistics.median(out[name]["ratio_to_dense_per_round"])
    return out


def report(d: int, res: dict) -> list[str]:
    lines = [f"\nd = {d}:", "| arm | params | tokens/s median (min–max) | retraction share | vs dense (median of rounds) "
             "| factors retracted per step (early) | max drift | load avg per round |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s_median']:,.0f} ({r['tokens_per_s_min']:,.0f}–"
                     f"{r['tokens_per_s_max']:,.0f}) | {r['retraction_share']:.1%} | {r['ratio_to_dense']:.2f}× | "
                     f"{r['retracted_per_step']:.1f} of {r['factors']} ({r['early_per_step']:.1f}) | {r['max_drift']:.3f} | "
                     + " ".join(f"{x:.1f}" for x in r["load_avg"]) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="1024,2048", help="model widths d (default 1024,2048)")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks (default 2)")
    ap.add_argument("--ranks", default="d/8,d/4", help="spectral ranks as fractions of d (default d/8,d/4)")
    ap.add_argument("--every", default="4", help="amortized retract_every values (default 4)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512: 2048 tokens/step)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm and round (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="all learning rates (default 1e-4, as the 70B config; the drift per step, and so how often "
                         "the amortized mode must retract early, grows with it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="train.device: cpu, cuda or auto (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="train.dtype (default float32)")
    ap.add_argument("--json", help="write all results (every step) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}, "
          f"{args.threads} threads; {args.batch}×{args.seq_len} tokens per step, {args.layers} block(s)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = {}
    for d in (int(v) for v in args.dims.split(",")):
        results[d] = run_width(d, args)
        for line in report(d, results[d]):
            print(line, flush=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if 2048 in results:
        for frac, target in TARGETS.items():
            amortized = [r for n, r in results[2048].items() if n.startswith(f"r={frac} k=")]
            for r in amortized:
                ok = r["ratio_to_dense"] >= target
                print(f"target d=2048 rank {frac} (retract_every={r['retract_every']}) ≥ {target}× dense: "
                      f"{'met' if ok else 'MISSED'} ({r['ratio_to_dense']:.2f}×)")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
