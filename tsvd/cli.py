"""``tsvd`` command line: train, prepare, inspect (and convert/export for Hugging Face models).

Mistakes in configs or inputs end with a one-line ``tsvd: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tsvd.errors import UserError

EPILOG = "Docs: README.md and docs/ in the repository. Configs: configs/*.yaml."


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=100 --set model.spectral.rank=16")


def cmd_train(args: argparse.Namespace) -> int:
    from tsvd.config import load_config
    from tsvd.trainer import TrainingError, train

    cfg = load_config(args.config, args.overrides)
    resume = None if args.fresh else (args.resume or "auto")
    try:
        summary = train(cfg, resume=resume, progress=not args.no_progress)
    except TrainingError as e:
        print(f"tsvd: training stopped: {e}", file=sys.stderr)
        return 1
    if not math.isnan(summary.val_loss):
        print(f"done: step {summary.step}, val loss {summary.val_loss:.4f} "
              f"(ppl {math.exp(min(summary.val_loss, 50)):.2f}; unigram baseline {summary.unigram_loss:.4f}), "
              f"{summary.tokens_per_s:,.0f} tokens/s, checkpoint {summary.checkpoint}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from tsvd.config import load_config
    from tsvd.data import prepare_data

    cfg = load_config(args.config, args.overrides)
    meta = prepare_data(cfg.data, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"data ready in {cfg.data.dir}: vocab {meta.vocab_size}, "
          f"{meta.train_tokens:,} train / {meta.val_tokens:,} val tokens")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tsvd.inspect import describe

    print(describe(Path(args.target), args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsvd",
        description="Train LLMs whose linear layers live as truncated-SVD factors W = U diag(s) Vᵀ.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config (resumes automatically)",
                       description="Train a model. Prepares the data first if data.dir holds none. "
                                   "Resumes from <out_dir>/checkpoints/latest when it exists.",
                       epilog="Example: tsvd train configs/tiny-cpu.yaml --set train.steps=200")
    _add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint dir (default: latest in out_dir)")
    g.add_argument("--fresh", action="store_true", help="start from scratch; refuses if out_dir has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards",
                       description="Build data.dir from data.corpus: train/load the tokenizer, tokenize once "
                                   "into train.bin / val.bin + meta.json. Reuses an identical existing dataset.",
                       epilog="Example: tsvd prepare configs/tiny-cpu.yaml --set data.vocab_size=8192")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in data.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("inspect", help="per-layer ranks, parameters and training memory of a config or checkpoint",
                       description="Describe a model without allocating it: per-layer shapes and ranks, "
                                   "parameter counts, compression, and memory to train with fp32 AdamW "
                                   "(weights + gradients + two moments = 16 bytes/parameter).",
                       epilog="Examples: tsvd inspect configs/llama3-70b.yaml; tsvd inspect runs/tiny-cpu")
    p.add_argument("target", help="a YAML config, a checkpoint directory, or a run's out_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (configs only)")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tsvd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tsvd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
