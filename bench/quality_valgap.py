"""Issue 16 item 6: is the validation split representative? After the README's training run, compare
the checkpoint's loss on the validation windows with its loss on as many training windows.

    python bench/quality_valgap.py                      # trains configs/tiny-cpu.yaml into runs/valgap (resumes)
    python bench/quality_valgap.py --run runs/tiny-cpu  # an existing run directory

Both losses are measured on ``train.eval_batches`` batches of evenly spaced windows (``tsvd.data.val_batches``)
of the run's own split, with the final checkpoint; the acceptance bound is |gap| ≤ 0.15 nats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny-cpu.yaml", help="config to train (default: the README's)")
    ap.add_argument("--run", help="evaluate this finished run directory instead of training one")
    ap.add_argument("--out", default="runs/valgap", help="run directory for the training run")
    args = ap.parse_args(argv)
    print(f"{platform.platform()}, {os.cpu_count()} cores, load average {os.getloadavg()}", flush=True)
    rdir = Path(args.run or args.out)
    if not args.run:
        subprocess.run([sys.executable, "-m", "tsvd.cli", "train", args.config, "--no-progress", "--set",
                        f"out_dir={rdir}", "--set", "train.threads=1"], cwd=ROOT, check=True)
    import yaml

    from quality_long import evaluate

    cfg = yaml.safe_load((rdir / "config.yaml").read_text())
    out = evaluate(rdir, n_batches=cfg["train"]["eval_batches"])
    gap = out["val_loss"] - out["train_loss"]
    out |= {"gap": gap, "run": str(rdir)}
    (rdir / "valgap.json").write_text(json.dumps(out, indent=1))
    print(f"step {out['step']}: val loss {out['val_loss']:.4f}, loss on {out['batches']}×{out['batch_size']} "
          f"training windows {out['train_loss']:.4f}, gap {gap:+.4f} nats ({'within' if abs(gap) <= 0.15 else 'OUTSIDE'} "
          "the 0.15 bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
