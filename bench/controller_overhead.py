"""Rank-controller overhead: per-step time of an adaptive run vs a static run of the same model, in one
process, interleaved step by step (the order alternates every step), plus the time of one rank change.

The adaptive engine runs the recommended trainer sequence: on a decision step a ``GradientSketch`` of
the layers the controller predicts will grow (``controller.sketch_width``) is active during the step,
then ``controller.plan`` reads the spectra and ``engine.apply_rank_plan`` resizes layers and AdamW
state. After each decision the static twin is given the same ranks (untimed, random directions), so
both always run the same shapes: the difference is the controller's own cost, not the effect of a
different rank. Overhead per interval, two ways: from components (median extra time of a decision step
/ (interval × static step)), and measured (Σ adaptive / Σ static − 1 over each interval ending at a
decision; noisier on a shared machine).

    python bench/controller_overhead.py                     # tiny-cpu model, energy policy
    python bench/controller_overhead.py --write docs/results.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from tsvd.config import Config, ModelConfig, RankConfig, SpectralConfig
from tsvd.controller import RankController, RankPlan
from tsvd.engine.torch_engine import TorchEngine
from tsvd.model import build_model
from tsvd.sketch import GradientSketch
from tsvd.spectral import SpectralModule
from tsvd.surgery import apply_plan

SECTION = "## Rank controller overhead"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50, help="rank.warmup_steps")
    p.add_argument("--interval", type=int, default=50, help="rank.interval")
    p.add_argument("--policy", choices=["energy", "budget"], default="energy")
    p.add_argument("--rank", type=int, default=16, help="initial spectral rank")
    p.add_argument("--protect", type=int, default=1, help="rank.protect")
    p.add_argument("--grow-init", type=float, default=0.25, help="rank.grow_init")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--plan-cpu", action="store_true",
                   help="only time controller.plan in CPU seconds (robust on a busy machine), with and without protection")
    p.add_argument("--write", type=Path, default=None, help="update this markdown file's '" + SECTION + "' section")
    return p.parse_args(argv)


def make_config(a: argparse.Namespace) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=4, n_kv_heads=2,
                            ffn_dim=a.ffn, max_seq_len=a.seq,
                            spectral=SpectralConfig(targets=["q", "k", "v", "o", "gate", "up", "down"], rank=a.rank))
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = a.steps, a.batch, a.seq
    cfg.rank = RankConfig(policy=a.policy, warmup_steps=a.warmup, interval=a.interval, energy=0.95, grow_tail=0.05,
                          protect=a.protect, grow_init=a.grow_init)
    return cfg


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine_info() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average (1/5/15 min) at start "
            f"{load_average()}")


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def warm_up(engines: list[TorchEngine], batch) -> None:
    """Untimed: two steps per engine, then one sketched step + growth + shrink on a throwaway copy, so
    lazily initialized kernels (LAPACK QR/SVD/lstsq, fused AdamW) are not charged to the first decision."""
    for engine in engines:
        for _ in range(2):
            engine.train_step(batch, 0.0)
    model = copy.deepcopy(engines[0].model)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, SpectralModule))
    with GradientSketch(model) as sketch:
        model(*batch[0])[1].backward()
    apply_plan(model, None, RankPlan(0, {name: layer.rank + 2}), sketch)
    apply_plan(model, None, RankPlan(0, {name: layer.rank - 3}))


def run(a: argparse.Namespace) -> dict:
    cfg = make_config(a)
    torch.manual_seed(cfg.seed)
    static = TorchEngine(cfg, build_model(cfg.model))
    torch.manual_seed(cfg.seed)
    adaptive = TorchEngine(cfg, build_model(cfg.model))
    layers = {n: (m.U.shape[0], m.V.shape[0]) for n, m in adaptive.model.named_modules() if isinstance(m, SpectralModule)}
    controller = RankController(cfg.rank, layers)
    gen = torch.Generator().manual_seed(0)
    t_static, t_adapt, t_plan, t_apply, t_sketch_step, t_static_at_decision, events = [], [], [], [], [], [], []

    def adaptive_step(batch, step: int) -> float:
        t0 = time.perf_counter()
        if not controller.due(step):
            adaptive.train_step(batch, 1.0)
            return time.perf_counter() - t0
        width = controller.sketch_width(step, adaptive.spectra())  # sketch only the layers about to grow
        with GradientSketch(adaptive.model, width=width, generator=torch.Generator().manual_seed(step)) as sketch:
            adaptive.train_step(batch, 1.0)
        t_sketch_step.append(time.perf_counter() - t0)
        plan, dt = timed(lambda: controller.plan(step, adaptive.spectra()))
        t_plan.append(dt)
        changes, dt = timed(lambda: adaptive.apply_rank_plan(plan, sketch))
        if changes:
            t_apply.append(dt)
            events.append((step, len(changes), sum(c.new > c.old for c in changes), sum(c.new < c.old for c in changes)))
        total = time.perf_counter() - t0
        apply_plan(static.model, static.optimizer, RankPlan(step, plan.ranks, keep=plan.keep))  # same shapes, untimed
        return total

    def random_batch():
        x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen)
        return [(x[:, :-1], x[:, 1:])]

    warm_up([adaptive, static], random_batch())
    for step in range(1, a.steps + 1):
        batch = random_batch()
        if step % 2:
            _, ts = timed(lambda: static.train_step(batch, 1.0))
            ta = adaptive_step(batch, step)
        else:
            ta = adaptive_step(batch, step)
            _, ts = timed(lambda: static.train_step(batch, 1.0))
        t_static.append(ts)
        t_adapt.append(ta)
        if controller.due(step):
            t_static_at_decision.append(ts)

    decisions = [s for s in range(1, a.steps + 1) if controller.due(s)]
    ratios = [sum(t_adapt[d - a.interval:d]) / sum(t_static[d - a.interval:d]) - 1
              for d in decisions if d - a.interval >= 0]
    plain = [i for i in range(a.steps) if i + 1 not in decisions]
    ranks = {n: s.numel() for n, s in adaptive.spectra().items()}
    return {
        "static_median": statistics.median(t_static[i] for i in plain),
        "adaptive_median": statistics.median(t_adapt[i] for i in plain),
        "decision_step_median": statistics.median(t_adapt[d - 1] for d in decisions),
        "static_at_decision_median": statistics.median(t_static_at_decision),
        "sketch_step_median": statistics.median(t_sketch_step),
        "plan_median": statistics.median(t_plan),
        "apply_median": statistics.median(t_apply) if t_apply else float("nan"),
        "overhead_components": (statistics.median(t_adapt[d - 1] - t_static[d - 1] for d in decisions)
                                / (a.interval * statistics.median(t_static[i] for i in plain))),
        "overhead_worst_decision": (max(t_adapt[d - 1] - t_static[d - 1] for d in decisions)
                                    / (a.interval * statistics.median(t_static[i] for i in plain))),
        "overhead_median": statistics.median(ratios),
        "overhead_mean": statistics.fmean(ratios),
        "overheads": ratios,
        "events": events,
        "ranks_initial": a.rank,
        "ranks_final": (min(ranks.values()), max(ranks.values()), sum(ranks.values())),
        "n_layers": len(ranks),
    }


def report(a: argparse.Namespace, r: dict, command: str, machine: str) -> str:
    ms = lambda t: f"{1e3 * t:.1f} ms"  # noqa: E731
    changes = "; ".join(f"step {s}: {n} layers ({g} up, {d} down)" for s, n, g, d in r["events"]) or "none"
    lo, hi, total = r["ranks_final"]
    return "\n".join([
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}.",
        "",
        f"Model: tsvd.model, dim {a.dim}, {a.layers} layers, ffn {a.ffn}, vocab {a.vocab}, all 7 projections "
        f"spectral at initial rank {a.rank} ({r['n_layers']} layers); batch {a.batch}×{a.seq} random tokens; "
        f"fused AdamW + Cholesky-QR retraction; `{a.policy}` policy, decisions every {a.interval} steps after "
        f"{a.warmup}; {a.steps} steps, static and adaptive engines interleaved (order alternating), the static "
        "twin given the adaptive run's ranks after every decision (so both run identical shapes).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| step, static (median over non-decision steps) | {ms(r['static_median'])} |",
        f"| step, adaptive (median over non-decision steps) | {ms(r['adaptive_median'])} |",
        f"| decision step, adaptive: sketched step + plan + rank change (median) | {ms(r['decision_step_median'])} |",
        f"| same step, static (median) | {ms(r['static_at_decision_median'])} |",
        f"| of which: step with the gradient sketch active (median; no sketch when no layer is predicted to grow) | {ms(r['sketch_step_median'])} |",
        f"| of which: `controller.plan` (median) | {ms(r['plan_median'])} |",
        f"| of which: one rank change, `engine.apply_rank_plan` (median) | {ms(r['apply_median'])} |",
        f"| **overhead averaged over an interval**, from components: median extra time of a decision step / "
        f"({a.interval} × static step) | **{100 * r['overhead_components']:.2f}%** (worst decision: "
        f"{100 * r['overhead_worst_decision']:.2f}%) |",
        f"| overhead averaged over an interval, measured: Σ adaptive / Σ static − 1 (median of {len(r['overheads'])}) "
        f"| {100 * r['overhead_median']:+.2f}% (mean {100 * r['overhead_mean']:+.2f}%; per interval "
        + ", ".join(f"{100 * o:+.1f}%" for o in r["overheads"]) + ") |",
        "",
        f"Rank changes: {changes}. Final ranks {lo}–{hi} (total {total}, initial {a.rank * r['n_layers']}).",
        "",
        "The measured ratio carries the noise of a shared machine (identical non-decision steps of the two "
        "twins differ by about as much); the component estimate is the robust figure.",
        "",
    ])


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section of a markdown file; other sections are untouched."""
    old = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def plan_cpu(a: argparse.Namespace, reps: int = 30) -> None:
    """CPU time of one ``controller.plan`` (the decision after a growth) on the model's layers with random
    spectra, without (``protect 0``) and with protection bookkeeping; median of ``reps``."""
    cfg = make_config(a)
    layers = {n: (m.U.shape[0], m.V.shape[0]) for n, m in build_model(cfg.model, device="meta").named_modules()
              if isinstance(m, SpectralModule)}
    gen = torch.Generator().manual_seed(0)
    for protect in (0, a.protect or 1):
        rank_cfg = dataclasses.replace(cfg.rank, protect=protect)
        times = []
        for _ in range(reps):
            c = RankController(rank_cfg, layers)
            c.plan(a.warmup, {n: torch.rand(a.rank, generator=gen) for n in layers})
            spectra = {n: torch.rand(a.rank * 3 // 2, generator=gen) ** 3 for n in layers}
            t0 = time.process_time()
            c.plan(a.warmup + a.interval, spectra)
            times.append(time.process_time() - t0)
        print(f"protect {protect}: controller.plan {1e3 * statistics.median(times):.2f} ms CPU "
              f"(median of {reps}, {len(layers)} layers)")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    command = "python " + " ".join(shlex.quote(x) for x in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    machine = machine_info()
    print(machine)
    print(command)
    if a.plan_cpu:
        plan_cpu(a)
        return
    text = report(a, run(a), command, machine + f", at end {load_average()}")
    print(text)
    if a.write:
        write_section(a.write, text)


if __name__ == "__main__":
    main()
