"""Progress output: a live bar on a terminal, plain lines (no carriage returns) in a log file."""

import re
import subprocess
import sys

from conftest import tiny_raw
from killable import REPO, child_env, write_config
from tsvd.progress import Progress, clock

LINE = re.compile(r"^step (\d+)/(\d+) \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| [\d,]+ tok/s \| "
                  r"elapsed \d+:\d\d \| ETA (\d+:\d\d|\?)$")


def test_clock():
    assert [clock(s) for s in (0, 59.4, 61, 3600 + 62)] == ["0:00", "0:59", "1:01", "1:01:02"]


def test_plain_mode_prints_one_line_per_call_and_no_bar(capsys):
    progress = Progress(total=10, initial=4, live=False)
    for step in (5, 6):
        progress.step(loss=3.0, tokens_per_s=1000.0)
        progress.line(step, loss=3.0, lr=1e-3, tokens_per_s=1234.5)
    progress.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and all(LINE.match(x) for x in lines), lines
    assert lines[0].startswith("step 5/10 | loss 3.0000 | lr 1.00e-03 | 1,234 tok/s")
    assert "\r" not in out + err


def test_disabled_progress_prints_nothing(capsys):
    progress = Progress(total=10, enabled=False, live=False)
    progress.step(loss=3.0, tokens_per_s=1.0)
    progress.line(1, loss=3.0, lr=1e-3, tokens_per_s=1.0)
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_a_run_logged_to_a_file_has_plain_lines_and_no_carriage_returns(tmp_path):
    """``tsvd train > log 2>&1``: one progress line per log interval (and at the last step), the
    validation lines, and no ``\\r`` frame."""
    config = write_config(tmp_path / "run.yaml", tiny_raw(tmp_path), "train.steps=12", "train.log_interval=4",
                          "train.eval_interval=6", "rank.policy=energy", "rank.warmup_steps=5", "rank.interval=5")
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "tsvd.cli", "train", str(config)], cwd=REPO, env=child_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert text.count("\r") == 0, text[-3000:]
    steps = [int(m.group(1)) for m in map(LINE.match, text.splitlines()) if m]
    assert steps == [4, 8, 12], text
    assert "step 6: val loss" in text and "step 12: val loss" in text
