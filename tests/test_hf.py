"""Hugging Face interop end to end (convert → fine-tune → export → reload in transformers) and the
`tsvd convert` / `tsvd export` commands, on tiny random models — no downloads. The modules' own tests
are tests/test_hf_{loading,factors,conversion,llama,export,finetune}.py; tolerances: tests/hf_common.py."""

from __future__ import annotations

import json

import pytest
import torch
from hf_common import ATOL, VOCAB, hf_dir, load_dense, logits_of, tiny_language  # noqa: F401  (fixtures)

from tsvd.cli import main
from tsvd.config import TrainConfig
from tsvd.hf import META_FILE, convert_hf, export, finetune, load_converted, save_converted


def test_convert_finetune_export_reload(hf_dir, tmp_path):  # noqa: F811
    """The fine-tuned factors survive a save, a dense export and a reload in plain transformers."""
    convert_hf(hf_dir, tmp_path / "conv", energy=0.95, log=None)
    model, meta = load_converted(tmp_path / "conv")
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    converted = logits_of(model, x)
    train = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=1, weight_decay=0.0)
    result = finetune(model, tiny_language(), train, seed=0)
    assert len(result.losses) == 4 and result.skipped == []
    tuned = logits_of(model, x)
    assert (tuned - converted).abs().max() > 10 * ATOL  # fine-tuning changed the function
    save_converted(model, tmp_path / "tuned", conversion=meta["conversion"])
    assert export(tmp_path / "tuned", tmp_path / "dense").kind == "dense"
    torch.testing.assert_close(logits_of(load_dense(tmp_path / "dense"), x), tuned, rtol=0, atol=ATOL)


def test_cli_convert_and_export(hf_dir, tmp_path, capsys):  # noqa: F811
    rc = main(["convert", str(hf_dir), str(tmp_path / "c"), "--rank", "8", "--targets", "*.mlp.*", "*.q_proj"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "total" in printed
    meta = json.loads((tmp_path / "c" / META_FILE).read_text())
    assert set(s["rank"] for s in meta["spectral"].values()) == {8} and len(meta["spectral"]) == 8
    assert main(["export", str(tmp_path / "c"), str(tmp_path / "d")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert load_dense(tmp_path / "d").config.num_hidden_layers == 2


@pytest.mark.parametrize("argv,message", [
    (["convert", "{tmp}/missing", "{tmp}/o"], "no such file or directory"),
    (["convert", "{hf}", "{tmp}/o", "--energy", "1.5"], "energy must be a number in (0, 1]"),
    (["convert", "{hf}", "{tmp}/o", "--rank", "0"], "rank must be a positive integer"),
    (["convert", "{hf}", "{tmp}/o", "--targets", "lm_head"], "tied to the input embedding"),
    (["convert", "{hf}", "{tmp}/o", "--targets", "nothing.*"], "no nn.Linear matches"),
    (["convert", "{tmp}", "{tmp}/o"], "not a Hugging Face model directory"),
    (["convert", "{hf}", "{hf}"], "exists and is not empty"),
    (["export", "{tmp}/missing", "{tmp}/o"], "no such file or directory"),
    (["export", "{hf}", "{tmp}/o"], "already a Hugging Face checkpoint"),
    (["export", "{tmp}", "{tmp}/o"], "no tsvd checkpoint here"),
])
def test_cli_user_errors(hf_dir, tmp_path, capsys, argv, message):  # noqa: F811
    argv = [a.format(tmp=tmp_path, hf=hf_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err  # transformers' loading progress bars may come first
    last = err.strip().splitlines()[-1]
    assert last.startswith("tsvd: error:") and message in last and "Traceback" not in err


def test_cli_convert_flags_are_exclusive(hf_dir, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        main(["convert", str(hf_dir), str(tmp_path / "o"), "--rank", "4", "--energy", "0.9"])
    assert e.value.code == 2
