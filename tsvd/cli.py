"""``tsvd`` command line: train, prepare, inspect, report (and convert/export for Hugging Face models).

Mistakes in configs or inputs end with a one-line ``tsvd: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tsvd.errors import UserError

EPILOG = "Docs: README.md and docs/ in the repository. Configs: configs/*.yaml."


def _add_overrides(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value (repeatable{note}), e.g. --set train.steps=100 "
                        "--set model.spectral.rank=16")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny-cpu.yaml")
    _add_overrides(p)


def cmd_train(args: argparse.Namespace) -> int:
    from tsvd.config import load_config
    from tsvd.trainer import STOPPED_EXIT_CODE, Stopped, TrainingError, train

    cfg = load_config(args.config, args.overrides)
    resume = None if args.fresh else (args.resume or "auto")
    try:
        summary = train(cfg, resume=resume, progress=not args.no_progress)
    except TrainingError as e:
        print(f"tsvd: training stopped: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # SIGINT / SIGTERM: every rank stopped at one step boundary with a checkpoint
        if e.is_main:
            print(f"tsvd: stopped at step {e.step} on {e.signal_name} with checkpoint {e.checkpoint}; "
                  "run the same command again to resume", file=sys.stderr)
        return STOPPED_EXIT_CODE
    if summary.is_main and not math.isnan(summary.val_loss):
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


def cmd_convert(args: argparse.Namespace) -> int:
    from tsvd.hf import convert_hf

    sized = any(x is not None for x in (args.rank, args.params_ratio, args.budget))
    energy = None if sized else (0.95 if args.energy is None else args.energy)
    convert_hf(args.src, args.out_dir, energy=energy, rank=args.rank, params_ratio=args.params_ratio,
               budget=args.budget, calibration=args.calibration, calibration_tokens=args.calibration_tokens,
               sensitivity_tokens=args.sensitivity_tokens, sequential=args.sequential, targets=args.targets,
               exclude=args.exclude, overwrite=args.overwrite)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tsvd.hf import export

    r = export(args.src, args.out_dir, factors=args.factors, overwrite=args.overwrite)
    print(f"exported {r.source} {args.src} as {r.kind} {r.architecture} ({r.params:,} params) -> {r.out_dir}")
    for note in r.notes:
        print(f"note: {note}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tsvd.report import write_report

    png, text = write_report(args.run_dir, args.out)
    print(text)
    print(f"picture: {png}")
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
    _add_overrides(p, note="; configs only")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a Hugging Face causal LM (dir or .gguf) to spectral factors",
                       description="Load a local Hugging Face causal-LM directory (safetensors/bin) or .gguf file, "
                                   "replace the targeted nn.Linear layers by truncated-SVD factors and write a factor "
                                   "checkpoint (factors.safetensors, tsvd_factors.json, report.json/.txt, tokenizer). "
                                   "Needs the 'hf' extra. See docs/hf.md.",
                       epilog="Examples: tsvd convert ./SmolLM2-135M ./smollm2-e95 --energy 0.95 --targets 'model.layers.*'; "
                              "tsvd convert ./SmolLM2-135M ./smollm2-mlp80 --targets '*.mlp.*' --params-ratio 0.8 "
                              "--calibration notes.txt")
    p.add_argument("src", help="Hugging Face model directory or .gguf file")
    p.add_argument("out_dir", help="directory for the factor checkpoint")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--energy", type=float, help="per-layer rank keeping this fraction of Σ s² (default 0.95)")
    g.add_argument("--rank", type=int, help="fixed rank for every layer (capped at min(in, out))")
    g.add_argument("--params-ratio", type=float, metavar="R", help="the targeted layers' factors hold this fraction "
                   "of their dense parameters, in (0, 1]; with --calibration ranks follow the model's loss")
    g.add_argument("--budget", type=int, metavar="N", help="the targeted layers' factors hold N parameters")
    p.add_argument("--calibration", metavar="FILE", help="text file (or prepared tsvd dataset dir): activation-aware "
                   "factors, optimal on these inputs; with --params-ratio/--budget optimal for the model's loss to second order, "
                   "with loss-aware ranks (see docs/hf.md)")
    p.add_argument("--calibration-tokens", type=int, default=32768, metavar="N",
                   help="calibration tokens to use (default 32768)")
    p.add_argument("--sensitivity-tokens", type=int, default=2048, metavar="N",
                   help="calibration tokens of the gradient pass that measures the loss's curvature for the factors "
                   "and the ranks of --params-ratio/--budget (default 2048)")
    p.add_argument("--sequential", action="store_true", help="with --calibration: fit each layer's factors to the "
                   "inputs of the model whose earlier layers are already converted (a few more calibration passes; "
                   "holds the calibration tokens' hidden states)")
    p.add_argument("--targets", nargs="+", metavar="GLOB", help="module-name globs to convert (default: every "
                   "nn.Linear except the output head)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="module-name globs to keep dense")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty out_dir")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a factor or training checkpoint as a Hugging Face checkpoint",
                       description="Materialize dense weights and write a Hugging Face checkpoint (config.json + "
                                   "model.safetensors) from a factor checkpoint (tsvd convert) or from a tsvd "
                                   "training checkpoint / run out_dir of either engine, DeepSpeed at any ZeRO stage included "
                                   "(as LlamaForCausalLM). --factors keeps the "
                                   "factors instead (compact factor checkpoint). Needs the 'hf' extra.",
                       epilog="Examples: tsvd export ./smollm2-e95 ./smollm2-e95-hf; tsvd export runs/tiny-cpu ./tiny-hf")
    p.add_argument("src", help="factor checkpoint dir, tsvd checkpoint dir, or a run's out_dir")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--factors", action="store_true", help="keep U, s, V (factor checkpoint) instead of dense weights")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty out_dir")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="a run's picture (report.png) and text summary; also while it runs",
                       description="Read a run's out_dir (config.yaml, metrics.jsonl, ranks.jsonl; torch or DeepSpeed, "
                                   "finished or still going) and write one picture: train and val loss vs tokens, "
                                   "ranks over time (layers x steps), parameters / dense vs step, retraction share "
                                   "of the step time. Prints final train and val loss and perplexity, tokens, "
                                   "training FLOPs, wall time and the final ranks per projection type.",
                       epilog="Example: tsvd report runs/tsvd-adaptive  (writes runs/tsvd-adaptive/report.png)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's out_dir")
    p.add_argument("--out", metavar="PNG", help="where to write the picture (default RUN_DIR/report.png)")
    p.set_defaults(func=cmd_report)
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
