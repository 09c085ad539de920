"""Issue 14, T3: do grown directions survive, and do final ranks differ between projection types?

Trains a config (default ``configs/tsvd-adaptive.yaml``) in this process, stopping after every rank
decision to read the controller's record of when each column of each layer was added
(``RankController.born``). A direction added at decision ``d`` *survives* if it is still there after the
decision at ``d + 2·interval`` (decisions whose ``d + 2·interval`` is past the last decision are not
counted). Also reported: survival after ``3·interval`` and the final ranks per projection type.

    python bench/quality_t3.py                                   # the shipped config
    python bench/quality_t3.py --set rank.protect=0 --set rank.grow_init=0 --out runs/t3-legacy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def survival(snapshots: dict[int, dict[str, list[int]]], interval: int, later: int) -> tuple[int, int]:
    """``(added, still present after later·interval)`` over decisions with a snapshot that far on."""
    added = present = 0
    for d, born in snapshots.items():
        if d + later * interval not in snapshots:
            continue
        after = snapshots[d + later * interval]
        for layer, cols in born.items():
            added += cols.count(d)
            present += after.get(layer, []).count(d)
    return added, present


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tsvd-adaptive.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default="runs/t3", help="run directory (replaced)")
    args = ap.parse_args(argv)

    import torch

    from tsvd.config import load_config
    from tsvd.trainer import Trainer

    cfg = load_config(args.config, args.set + [f"out_dir={args.out}"])
    if cfg.rank.policy == "static":
        print("quality_t3: the config's rank.policy is static: nothing to measure", file=sys.stderr)
        return 2
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    print(f"{platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()}", flush=True)
    print("command: python bench/quality_t3.py " + " ".join(argv if argv is not None else sys.argv[1:]), flush=True)
    trainer = Trainer(cfg, resume=None, progress=False)
    r, t0 = cfg.rank, time.time()
    decisions = [s for s in range(1, cfg.train.steps + 1) if trainer.controller.due(s)]
    snapshots: dict[int, dict[str, list[int]]] = {}
    try:
        val_loss = float("nan")  # the last evaluation's (the final decision may be the last step)
        for d in decisions:
            reached = trainer.fit(stop_at=d)
            val_loss = reached.val_loss if math.isfinite(reached.val_loss) else val_loss
            snapshots[d] = {k: list(v) for k, v in trainer.controller.born.items()}
            grown = sum(v.count(d) for v in snapshots[d].values())
            print(f"step {d}: {grown} directions added, total rank "
                  f"{sum(s.numel() for s in trainer.engine.spectra().values())} ({time.time() - t0:.0f} s)", flush=True)
        summary = trainer.fit()
        val_loss = summary.val_loss if math.isfinite(summary.val_loss) else val_loss
        ranks = {n: s.numel() for n, s in trainer.engine.spectra().items()}
    finally:
        trainer.close()
    by_type: dict[str, list[int]] = {}
    for n, k in ranks.items():
        by_type.setdefault(n.rsplit(".", 1)[-1], []).append(k)
    added2, kept2 = survival(snapshots, r.interval, 2)
    added3, kept3 = survival(snapshots, r.interval, 3)
    result = {
        "config": args.config, "overrides": args.set, "decisions": decisions,
        "survival_2_intervals": kept2 / added2 if added2 else None, "added_counted_2": added2, "present_2": kept2,
        "survival_3_intervals": kept3 / added3 if added3 else None, "added_counted_3": added3, "present_3": kept3,
        "final_ranks_by_type": {k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for k, v in by_type.items()},
        "final_val_loss": val_loss, "final_ranks": ranks, "born": snapshots,
    }
    Path(args.out, "t3.json").write_text(json.dumps(result, indent=1))
    print(f"survival after 2 intervals: {kept2}/{added2} = {result['survival_2_intervals']}; "
          f"after 3: {kept3}/{added3} = {result['survival_3_intervals']}")
    print("final ranks by type: " + ", ".join(f"{k} {v['mean']:.1f} [{v['min']}-{v['max']}]"
                                               for k, v in result["final_ranks_by_type"].items()))
    print(f"final val loss {val_loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
