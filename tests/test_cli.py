"""Hostile and mistaken input through the real CLI: every case gets one line ``tsvd: error: ...`` naming
the problem and exit code 2 — never a traceback — and leaves every file on disk as it was.

Each case of the table builds its inputs in its own directory (copying the shared prepared dataset and
trained run when it needs to damage them), snapshots the whole test tree (every file's bytes), runs
``tsvd.cli.main(argv)`` in this process and compares. A few cases run again as real processes
(``python -m tsvd.cli``) to prove that no traceback reaches the terminal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import tiny_raw
from killable import run_cli, write_config
from tsvd.cli import main
from tsvd.config import apply_overrides
from tsvd.engine.torch_engine import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
FAST = ("train.threads=1", "train.steps=2", "train.checkpoint_interval=1", "train.eval_interval=100")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``data/`` (a prepared byte-level dataset) and ``run/`` (a trained tiny run with checkpoints)."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "good.yaml", tiny_raw(root), *FAST)
    assert main(["train", str(config), "--no-progress"]) == 0
    assert (root / "run" / "checkpoints" / "step-00000002" / STATE_FILE).is_file()
    return root


@dataclass
class Ctx:
    world: Path  # shared, read-only for the cases: data/, run/, good.yaml
    case: Path  # this case's own directory

    def config(self, *overrides: str, raw: dict | None = None, data: Path | None = None, out: Path | None = None) -> str:
        """A config file (tiny run) in the case dir; by default on the shared data and run."""
        base = tiny_raw(self.world) if raw is None else raw
        base = apply_overrides(base, [*FAST, f"data.dir={data or self.world / 'data'}",
                                      f"out_dir={out or self.world / 'run'}"])
        return str(write_config(self.case / f"config-{len(list(self.case.glob('config-*')))}.yaml", base, *overrides))

    def copy(self, what: str) -> Path:
        """A private copy of ``data`` or ``run`` to damage."""
        dst = self.case / what
        shutil.copytree(self.world / what, dst)
        return dst


def _bad_yaml(c: Ctx) -> list[str]:
    (c.case / "bad.yaml").write_text("train: [unclosed\n")
    return ["train", str(c.case / "bad.yaml")]


def _list_yaml(c: Ctx) -> list[str]:
    (c.case / "list.yaml").write_text("- 1\n- 2\n")
    return ["train", str(c.case / "list.yaml")]


def _config_text(command: str, text: str) -> Callable[[Ctx], list[str]]:
    """``command`` on a config file holding ``text`` (run from the case dir, where the built-in defaults
    ``runs/default`` and ``data/stdlib-bpe`` would be written if the config were accepted)."""
    def make(c: Ctx) -> list[str]:
        (c.case / "c.yaml").write_text(text)
        return [command, str(c.case / "c.yaml")]
    return make


def _no_model(c: Ctx) -> list[str]:
    raw = tiny_raw(c.world)
    del raw["model"]
    return ["train", c.config(raw=raw, out=c.case / "out")]


def _unknown_top_key(c: Ctx) -> list[str]:
    raw = tiny_raw(c.world)
    raw["modle"] = {"dim": 64}
    return ["train", c.config(raw=raw)]


def _corpus(c: Ctx, entries: list[str]) -> list[str]:
    return ["train", c.config(f"data.corpus={json.dumps(entries)}", data=c.case / "newdata", out=c.case / "out")]


def _empty_file(c: Ctx) -> list[str]:
    (c.case / "empty.txt").write_text("")
    return _corpus(c, [str(c.case / "empty.txt")])


def _empty_folder(c: Ctx) -> list[str]:
    (c.case / "texts").mkdir()
    return _corpus(c, [str(c.case / "texts")])


def _damaged_data(damage: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    def make(c: Ctx) -> list[str]:
        data = c.copy("data")
        damage(data)
        return ["train", c.config(data=data, out=c.case / "out")]
    return make


def _inspect_damaged_data(c: Ctx) -> list[str]:
    data = c.copy("data")
    (data / "meta.json").write_text("{oops")
    return ["inspect", c.config("model.vocab_size=0", data=data, out=c.case / "out")]


def _deepspeed(c: Ctx, json_text: str | None, *overrides: str) -> list[str]:
    """``train`` with ``engine.kind: deepspeed`` and a JSON of this text (``None``: no such file)."""
    path = c.case / "ds.json"
    if json_text is not None:
        path.write_text(json_text)
    return ["train", c.config("engine.kind=deepspeed", f"engine.deepspeed_config={path}", *overrides,
                              out=c.case / "out")]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _out_of_range_tokens(data: Path) -> None:
    shard = data / "train.bin"
    raw = bytearray(shard.read_bytes())
    raw[100:102] = b"\xff\xff"  # token 65535 in a 257-token vocabulary
    shard.write_bytes(bytes(raw))


def _foreign_tokenizer(data: Path) -> None:
    """Replace the byte tokenizer by a BPE one with another vocabulary (meta.json still says 257)."""
    from tsvd.tokenizer import BPETokenizer

    for f in data.glob("*tokenizer*.json"):
        f.unlink()
    BPETokenizer.train(["def f(x):\n    return x + 1\n" * 50], 300, progress=False).save(data)


def _damaged_run(damage: Callable[[Path], None], *extra: str) -> Callable[[Ctx], list[str]]:
    def make(c: Ctx) -> list[str]:
        run = c.copy("run")
        damage(run / "checkpoints")
        return ["train", c.config("train.steps=3", out=run), *extra]
    return make


def _step_dir(ckpts: Path) -> Path:
    return ckpts / (ckpts / "latest").read_text().strip()


def _narrow_a_factor(ckpts: Path) -> None:
    """A checkpoint whose tensors do not match its own meta.json (a factor one column short)."""
    file = _step_dir(ckpts) / STATE_FILE
    state = torch.load(file, weights_only=True)
    name = "layers.0.attn.q.U"
    state["model"][name] = state["model"][name][:, :-1].contiguous()
    torch.save(state, file)


def _garbage_tokenizer_file(c: Ctx) -> list[str]:
    (c.case / "tok.json").write_text('{"this is": "not a tokenizer"}')
    return ["train", c.config("data.tokenizer=bpe", f"data.tokenizer_file={c.case / 'tok.json'}",
                              data=c.case / "newdata", out=c.case / "out")]


def _other_dataset_in_data_dir(c: Ctx) -> list[str]:
    data = c.copy("data")
    return ["prepare", c.config("data.max_bytes=1000", data=data)]


def _data_dir_is_a_file(c: Ctx) -> list[str]:
    (c.case / "datafile").write_text("x")
    return ["train", c.config(data=c.case / "datafile", out=c.case / "out")]


# (id, argv builder, substrings the one-line message must contain)
CASES: list[tuple[str, Callable[[Ctx], list[str]], list[str]]] = [
    # config files and overrides
    ("config-missing", lambda c: ["train", str(c.case / "nope.yaml")], ["config file not found", "nope.yaml"]),
    ("config-not-yaml", _bad_yaml, ["bad.yaml", "not valid YAML"]),
    ("config-not-a-mapping", _list_yaml, ["list.yaml", "expected a mapping"]),
    ("config-empty", _config_text("train", ""), ["c.yaml: the config is empty"]),
    ("config-only-a-comment", _config_text("train", "# model: later\n"), ["c.yaml: the config is empty"]),
    ("config-without-model", _no_model, ["no 'model' section"]),
    ("config-without-model-tiny", _config_text("train", "train:\n  steps: 5\n"), ["c.yaml: no 'model' section"]),
    ("prepare-config-empty", _config_text("prepare", ""), ["c.yaml: the config is empty"]),
    ("prepare-config-without-model", _config_text("prepare", "data:\n  tokenizer: byte\n"), ["no 'model' section"]),
    ("inspect-config-only-a-comment", _config_text("inspect", "# nothing\n"), ["c.yaml: the config is empty"]),
    ("inspect-config-without-model", _config_text("inspect", "seed: 1\n"), ["c.yaml: no 'model' section"]),
    ("unknown-key", _unknown_top_key, ["modle: unknown key"]),
    ("unknown-nested-key", lambda c: ["train", c.config("train.learning_rate=0.1")], ["train.learning_rate: unknown key"]),
    ("wrong-type-number", lambda c: ["train", c.config(), "--set", "train.lr=fast"], ["train.lr: expected a number"]),
    ("wrong-type-int", lambda c: ["train", c.config("train.steps=2.5")], ["train.steps: expected an integer"]),
    ("wrong-type-bool", lambda c: ["train", c.config("model.tie_embeddings=maybe")], ["model.tie_embeddings: expected true/false"]),
    ("wrong-type-list", lambda c: ["train", c.config("model.spectral.targets=q")], ["model.spectral.targets: expected a list"]),
    ("rank-negative", lambda c: ["train", c.config("model.spectral.rank=-4")], ["model.spectral.rank", "-4"]),
    ("rank-zero", lambda c: ["train", c.config("model.spectral.rank=0")], ["model.spectral.rank=0 is impossible"]),
    ("rank-above-min-in-out", lambda c: ["train", c.config("model.spectral.rank=33")],
     ["model.spectral.rank=33 is impossible", "need 1 ≤ model.spectral.rank ≤ 32"]),
    ("rank-override-too-big", lambda c: ["train", c.config("model.spectral.rank_overrides={up: 40}")],
     ["model.spectral.rank_overrides.up=40 is impossible", "(the up projection)"]),
    ("energy-above-1", lambda c: ["train", c.config("rank.energy=1.5")], ["rank.energy must be a number in (0, 1]"]),
    ("energy-zero", lambda c: ["train", c.config("rank.energy=0")], ["rank.energy must be a number in (0, 1]"]),
    ("energy-negative", lambda c: ["train", c.config("rank.energy=-0.2")], ["rank.energy must be a number in (0, 1]"]),
    ("energy-not-a-number", lambda c: ["train", c.config("rank.energy=high")], ["rank.energy: expected a number"]),
    ("steps-zero", lambda c: ["train", c.config("train.steps=0")], ["train.steps: must be > 0"]),
    ("seq-len-too-long", lambda c: ["train", c.config("train.seq_len=128")], ["train.seq_len: 128 exceeds"]),
    ("set-without-equals", lambda c: ["train", c.config(), "--set", "train.lr"], ["--set 'train.lr': expected key=value"]),
    ("set-into-a-value", lambda c: ["train", c.config(), "--set", "seed.x=1"], ["--set 'seed.x=1'", "not a section"]),
    ("set-bad-yaml-value", lambda c: ["train", c.config(), "--set", "train.betas=[0.9,"], ["--set 'train.betas=[0.9,'"]),
    ("device-unknown", lambda c: ["train", c.config("train.device=banana")], ["train.device: 'banana'"]),
    ("device-absent", lambda c: ["train", c.config("train.device=cuda:7")], ["train.device: 'cuda:7' is not usable"]),
    # data
    ("corpus-missing", lambda c: _corpus(c, [str(c.case / "no-such-dir")]), ["data.corpus", "no-such-dir does not exist"]),
    ("corpus-empty-file", _empty_file, ["data.corpus", "0 usable document"]),
    ("corpus-empty-folder", _empty_folder, ["data.corpus", "0 usable document"]),
    ("data-dir-is-a-file", _data_dir_is_a_file, ["data.dir", "is a file"]),
    ("data-dir-other-dataset", _other_dataset_in_data_dir, ["data.dir", "different dataset"]),
    ("shard-missing", _damaged_data(lambda d: (d / "train.bin").unlink()), ["data.dir", "train.bin missing"]),
    ("shard-truncated", _damaged_data(lambda d: _truncate(d / "train.bin")), ["data.dir", "train.bin is corrupted"]),
    ("shard-empty", _damaged_data(lambda d: (d / "val.bin").write_bytes(b"")), ["data.dir", "val.bin is corrupted"]),
    ("shard-out-of-range", _damaged_data(_out_of_range_tokens), ["train.bin is corrupted", "token id 65535"]),
    ("data-meta-corrupted", _damaged_data(lambda d: (d / "meta.json").write_text("{oops")), ["meta.json is unreadable"]),
    ("tokenizer-missing", _damaged_data(lambda d: [f.unlink() for f in d.glob("*tokenizer*.json")]), ["no tokenizer in"]),
    ("tokenizer-mismatch", _damaged_data(_foreign_tokenizer), ["the tokenizer", "does not match meta.json (vocab 257)"]),
    ("tokenizer-file-garbage", _garbage_tokenizer_file, ["data.tokenizer_file", "tok.json"]),
    ("vocab-mismatch", lambda c: ["train", c.config("model.vocab_size=300", out=c.case / "out")],
     ["model.vocab_size: 300 does not match the tokenizer"]),
    # checkpoints
    ("checkpoint-other-model", lambda c: ["train", c.config("model.dim=64")], ["model.dim", "different model"]),
    ("checkpoint-other-targets", lambda c: ["train", c.config("model.spectral.targets=[q, k]")],
     ["model.spectral.targets: differ from the checkpoint"]),
    ("fresh-over-a-run", lambda c: ["train", c.config(), "--fresh"], ["already holds a run's checkpoints"]),
    ("resume-missing", lambda c: ["train", c.config(), "--resume", str(c.case / "nowhere")], ["no tsvd checkpoint here"]),
    ("latest-dangling", _damaged_run(lambda k: (k / "latest").write_text("step-00000099")),
     ["points to step-00000099, which is missing"]),
    ("checkpoint-meta-corrupted", _damaged_run(lambda k: (_step_dir(k) / "meta.json").write_text("{")), ["meta.json: not valid JSON"]),
    ("checkpoint-state-missing", _damaged_run(lambda k: (_step_dir(k) / STATE_FILE).unlink()), [f"no {STATE_FILE}"]),
    ("checkpoint-state-truncated", _damaged_run(lambda k: _truncate(_step_dir(k) / STATE_FILE)), [STATE_FILE, "unreadable"]),
    ("checkpoint-state-not-torch", _damaged_run(lambda k: (_step_dir(k) / STATE_FILE).write_text("hello")),
     [STATE_FILE, "unreadable"]),
    ("checkpoint-state-wrong-content", _damaged_run(lambda k: torch.save({"model": {}}, _step_dir(k) / STATE_FILE)),
     [STATE_FILE, "does not fit"]),
    ("checkpoint-state-wrong-shapes", _damaged_run(_narrow_a_factor), [STATE_FILE, "does not fit", "size mismatch"]),
    # inspect / export / convert
    ("ds-config-missing", lambda c: _deepspeed(c, None), ["engine.deepspeed_config: file not found", "ds.json"]),
    ("ds-config-not-json", lambda c: _deepspeed(c, "{stage: 2"), ["ds.json: not valid JSON"]),
    ("ds-config-optimizer", lambda c: _deepspeed(c, '{"optimizer": {"type": "Adam"}}'), ["ds.json: remove 'optimizer'"]),
    ("ds-config-bad-stage", lambda c: _deepspeed(c, '{"zero_optimization": {"stage": 5}}'),
     ["zero_optimization.stage must be 0, 1, 2 or 3"]),
    ("ds-config-dtype-mismatch", lambda c: _deepspeed(c, (REPO / "configs/ds/zero2-bf16-autocast.json").read_text()),
     ["torch_autocast is on but train.dtype is float32"]),
    ("inspect-missing", lambda c: ["inspect", str(c.case / "no-run")], ["no-run: no tsvd checkpoint here"]),
    ("inspect-empty-dir", lambda c: ["inspect", str(c.case)], ["no tsvd checkpoint here"]),
    ("inspect-set-on-checkpoint", lambda c: ["inspect", str(c.world / "run"), "--set", "seed=1"], ["--set applies to configs"]),
    ("inspect-bad-config", lambda c: ["inspect", c.config("model.spectral.rank=99")], ["rank=99 is impossible"]),
    ("inspect-data-meta-corrupted", _inspect_damaged_data, ["meta.json is unreadable"]),
    ("export-missing", lambda c: ["export", str(c.case / "nothing"), str(c.case / "out")], ["nothing: no such file"]),
    ("convert-missing", lambda c: ["convert", str(c.case / "nothing"), str(c.case / "out")], ["nothing"]),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: relative path → content hash ("dir" for directories)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, tmp_path, capsys, monkeypatch, build, expected):
    monkeypatch.chdir(tmp_path)  # relative paths (the built-in out_dir and data.dir) land where the snapshot sees them
    ctx = Ctx(world, tmp_path)
    argv = build(ctx)
    before_world, before_case = snapshot(world), snapshot(tmp_path)
    capsys.readouterr()
    code = main([*argv, "--no-progress"] if argv[0] in ("train", "prepare") else argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("tsvd: error: "), err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in err + out
    assert snapshot(world) == before_world, "the shared data or run changed"
    assert snapshot(tmp_path) == before_case, "files in the case directory were created or changed"


SUBPROCESS_CASES = ["set-bad-yaml-value", "shard-truncated", "checkpoint-state-truncated", "config-empty"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_real_process_prints_no_traceback(world, tmp_path, name):
    build, expected = next(c[1:] for c in CASES if c[0] == name)
    argv = build(Ctx(world, tmp_path))
    proc = run_cli([*argv, "--no-progress"] if argv[0] in ("train", "prepare") else argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsvd: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert all(part in lines[0] for part in expected), lines[0]


def test_usage_errors_exit_2_without_traceback(capsys):
    for argv in (["frobnicate"], ["train"], ["train", "x.yaml", "--fresh", "--resume", "y"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tsvd")
