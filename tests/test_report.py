"""``tsvd report RUN_DIR``: the picture and the summary of a finished, an unfinished and a DeepSpeed run."""

from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import tiny_raw
from killable import REPO, child_env, run_cli, write_config
from tsvd.cli import main
from tsvd.metrics import read_jsonl
from tsvd.report import read_run, training_flops, write_report
from tsvd.trainer import Trainer, train

PNG = b"\x89PNG\r\n\x1a\n"
ADAPTIVE = ("train.steps=12", "train.log_interval=3", "train.eval_interval=6", "train.checkpoint_interval=100",
            "rank.policy=energy", "rank.warmup_steps=5", "rank.interval=5", "rank.energy=0.9")


def test_report_of_a_finished_run(tiny_config, capsys):
    cfg = tiny_config(*ADAPTIVE)
    summary = train(cfg, progress=False)
    capsys.readouterr()
    assert main(["report", cfg.out_dir]) == 0
    out = capsys.readouterr().out
    png = f"{cfg.out_dir}/report.png"
    assert open(png, "rb").read(8) == PNG and f"picture: {png}" in out

    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    assert f"step 12 of 12\n" in out
    last = summary.train_losses[-1]
    assert f"train loss {last:.4f} (ppl {math.exp(last):.2f}) at step 12" in out
    assert f"val loss   {summary.val_loss:.4f} (ppl {math.exp(summary.val_loss):.2f}) at step 12" in out
    assert f"tokens {12 * tokens_per_step:,};" in out and "wall time" in out and "unknown" not in out
    final = read_jsonl(f"{cfg.out_dir}/ranks.jsonl")[-1]["ranks"]
    q = [final[f"layers.{i}.attn.q"] for i in range(2)]
    assert f"q {sum(q) / 2:.1f} ({min(q)}–{max(q)})" in out


def test_flops_by_hand_for_static_ranks(tiny_config):
    """Rank 8 everywhere: N = Σ r·(m+n) over the 2 × 7 projections + the tied head (vocab × dim)."""
    cfg = tiny_config("train.steps=4", "train.log_interval=2", "train.eval_interval=100")
    train(cfg, progress=False)
    run = read_run(cfg.out_dir)
    vocab, d, T = run.cfg.model.vocab_size, 32, cfg.train.seq_len
    shapes = {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32), "gate": (64, 32), "up": (64, 32),
              "down": (32, 64)}
    n = 2 * sum(8 * (m + k) for m, k in shapes.values()) + vocab * d
    per_token = 6 * n + 12 * 2 * T * d
    assert training_flops(run) == 4 * cfg.train.batch_size * T * per_token


def test_report_of_a_run_still_going(tiny_config, capsys):
    """Stopped mid-way (as a live run looks) with a half-written last line: the report still works."""
    cfg = tiny_config(*ADAPTIVE)
    trainer = Trainer(cfg, progress=False)
    trainer.fit(stop_at=7)
    trainer.close()
    with open(f"{cfg.out_dir}/metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')
    png, text = write_report(cfg.out_dir, f"{cfg.out_dir}/now.png")
    assert open(png, "rb").read(8) == PNG
    assert "step 7 of 12 (not finished" in text and "at step 6\n" in text  # val at step 6


@pytest.mark.parametrize("case", ["missing", "empty", "no-steps"])
def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    if case != "missing":
        run_dir.mkdir()
    if case == "no-steps":
        write_config(run_dir / "config.yaml", tiny_raw(tmp_path))
        (run_dir / "metrics.jsonl").write_text('{"step": 0, "val/unigram_loss": 3.0}\n')
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tsvd: error: RUN_DIR: "), err
    assert not (run_dir / "report.png").exists()


def test_help_says_what_it_writes():
    proc = run_cli(["report", "--help"])
    assert proc.returncode == 0 and "report.png" in proc.stdout and "DeepSpeed" in proc.stdout


def test_report_of_a_deepspeed_run(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed")
    config = write_config(tmp_path / "ds.yaml", tiny_raw(tmp_path), *ADAPTIVE, "train.steps=6", "engine.kind=deepspeed",
                          f"engine.deepspeed_config={REPO / 'configs' / 'ds' / 'zero1.json'}")
    env = child_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = run_cli(["train", str(config), "--no-progress"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["report", str(tmp_path / "run")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 6 of 6" in proc.stdout and "final ranks" in proc.stdout
    assert (tmp_path / "run" / "report.png").read_bytes()[:8] == PNG
