"""``tsvd convert --params-ratio --calibration``: a tiny random Llama end to end, and its bad inputs.

Each bad input is one ``tsvd: error:`` line, exit code 2, and nothing written.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from hf_common import ATOL, VOCAB, hf_dir, load_dense, logits_of  # noqa: F401  (fixtures)
from tsvd import SpectralLinear
from tsvd.cli import main
from tsvd.hf import export, load_converted

WORDS = [f"w{i}" for i in range(VOCAB - 1)]


@pytest.fixture(scope="module")
def llama_with_tokenizer(hf_dir, tmp_path_factory):
    """``hf_dir`` plus a word-level tokenizer over ``WORDS`` (ids 1..95; 0 is unknown)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("hf-tok") / "tiny-llama"
    shutil.copytree(hf_dir, path)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return path


def one_error_line(capsys) -> str:
    """The one ``tsvd: error:`` line on stderr (transformers' loading progress bars may precede it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tsvd:")]
    assert len(lines) == 1 and lines[0].startswith("tsvd: error:") and "Traceback" not in err, err
    return lines[0]


def words(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


@pytest.mark.parametrize("sequential", [False, True])
def test_calibrated_convert_cli_end_to_end(llama_with_tokenizer, tmp_path, capsys, monkeypatch, sequential):
    import tsvd.convert

    text = tmp_path / "calib.txt"
    text.write_text(words(3000))
    out = tmp_path / "out"
    graded, collect = [], tsvd.convert.collect_output_gradients
    monkeypatch.setattr(tsvd.convert, "collect_output_gradients",
                        lambda model, layers, batches, *a, **k: graded.extend(b.shape for b in batches) or
                        collect(model, layers, batches, *a, **k))
    rc = main(["convert", str(llama_with_tokenizer), str(out), "--targets", "*.mlp.*", "--params-ratio", "0.5",
               "--calibration", str(text), "--calibration-tokens", "1024", "--sensitivity-tokens", "512"] +
              ["--sequential"] * sequential)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "calibration: 1,024 tokens" in printed and "loss-aware ranks" in printed
    assert sum("model.layers.1.mlp.down_proj" in line for line in printed.splitlines()) >= 2  # progress lines
    assert ("sequential stage 4/4" in printed) == sequential
    report = json.loads((out / "report.json").read_text())
    assert report["conversion"]["params_ratio"] == 0.5 and report["conversion"]["calibration"] == str(text)
    assert report["conversion"]["sequential"] is sequential and report["conversion"]["sensitivity_tokens"] == 512
    assert "calibration batch 1/1:" in printed  # a progress line per calibration batch
    assert graded == [(1, 513)]  # the gradient pass: the first 512 tokens (one window), not a whole batch
    total = report["total"]
    assert total["layers"] == 6 and total["spectral_params"] <= total["dense_params"] // 2
    assert total["dense_params"] // 2 - total["spectral_params"] < 64 + 96 + 1  # within one rank
    model, _ = load_converted(out)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, SpectralLinear)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(layer.rank), rtol=0, atol=1e-5)
    # exported dense, reloaded in transformers: the same logits as the factors
    x = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    export(out, tmp_path / "hf", overwrite=False)
    torch.testing.assert_close(logits_of(load_dense(tmp_path / "hf"), x), logits_of(model, x), rtol=0, atol=ATOL)


def test_calibrated_factors_beat_plain_svd_on_the_calibration_text(llama_with_tokenizer, tmp_path):
    from tsvd.calibration import next_token_loss
    from tsvd.hf.conversion import calibration_windows
    from tsvd.hf.loading import load_tokenizer

    text = tmp_path / "calib.txt"
    text.write_text(words(3000, seed=1))
    losses = {}
    for name, extra in (("plain", []), ("calibrated", ["--calibration", str(text), "--calibration-tokens", "1024"])):
        assert main(["convert", str(llama_with_tokenizer), str(tmp_path / name), "--targets", "model.layers.*",
                     "--rank", "8", *extra]) == 0
        model, _ = load_converted(tmp_path / name)
        windows = calibration_windows(text, load_tokenizer(llama_with_tokenizer), 1024)
        with torch.no_grad():
            losses[name] = sum(float(next_token_loss(model, w)) for w in windows)
    dense = load_dense(llama_with_tokenizer)
    with torch.no_grad():
        base = sum(float(next_token_loss(dense, w)) for w in windows)
    assert losses["calibrated"] - base < 0.5 * (losses["plain"] - base)


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("empty", ["--params-ratio", "0.5", "--calibration", "{empty}"], "is empty"),
        ("blank", ["--params-ratio", "0.5", "--calibration", "{blank}"], "has no text"),
        ("short", ["--params-ratio", "0.5", "--calibration", "{short}"], "is too short: 20 tokens, need at least 513"),
        ("missing", ["--params-ratio", "0.5", "--calibration", "{missing}"], "does not exist"),
        ("ratio-high", ["--params-ratio", "1.5", "--calibration", "{good}"], r"params ratio must be a number in \(0, 1\]"),
        ("ratio-zero", ["--params-ratio", "0", "--calibration", "{good}"], r"params ratio must be a number in \(0, 1\]"),
        ("nothing", ["--params-ratio", "0.5", "--calibration", "{good}", "--targets", "*.nope"], "no nn.Linear matches"),
        ("energy", ["--energy", "0.9", "--calibration", "{good}"], "not --energy"),
        ("tokens", ["--params-ratio", "0.5", "--calibration", "{good}", "--calibration-tokens", "0"],
         "calibration tokens must be a positive integer"),
        ("sequential", ["--params-ratio", "0.5", "--sequential"], "--sequential needs --calibration"),
        ("sensitivity", ["--params-ratio", "0.5", "--calibration", "{good}", "--sensitivity-tokens", "-1"],
         "sensitivity tokens must be a positive integer"),
    ],
)
def test_bad_calibrated_convert_is_one_line_exit_2_nothing_written(llama_with_tokenizer, tmp_path, capsys, case,
                                                                    extra, message):
    files = {"empty": "", "blank": "  \n\n ", "short": words(20), "good": words(2000)}
    paths = {k: tmp_path / f"{k}.txt" for k in files}
    for k, t in files.items():
        paths[k].write_text(t)
    paths["missing"] = tmp_path / "missing.txt"
    out = tmp_path / "out"
    argv = ["convert", str(llama_with_tokenizer), str(out), *[a.format(**paths) for a in extra]]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_model_type_is_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "odd"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["NoSuch"]}))
    (tmp_path / "calib.txt").write_text(words(2000))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--params-ratio", "0.8", "--calibration",
                 str(tmp_path / "calib.txt")]) == 2
    one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_calibration_from_a_prepared_dataset_is_its_text_in_the_models_tokens(llama_with_tokenizer, tmp_path):
    from tsvd.config import DataConfig
    from tsvd.data import load_data, prepare_data
    from tsvd.hf.conversion import calibration_windows
    from tsvd.hf.loading import load_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):  # enough documents for the validation split's floor
        (corpus / f"d{i:02d}.txt").write_text(words(40, seed=i) + "\n")
    data = tmp_path / "data"
    prepare_data(DataConfig(dir=str(data), corpus=[str(corpus)], tokenizer="byte", val_fraction=0.1), progress=False)
    tok = load_tokenizer(llama_with_tokenizer)
    windows = calibration_windows(data, tok, n_tokens=300, seq_len=100, batch_size=2)
    ds = load_data(data)
    expected = tok(ds.tokenizer.decode(ds.train.tolist()), add_special_tokens=False)["input_ids"]
    got = torch.cat([w[:, :-1].reshape(-1) for w in windows]).tolist()
    assert len(got) == 300 and got == expected[:300]


def test_sequential_calibration_fits_each_layer_to_the_inputs_of_the_truncated_model():
    """After ``spectralize(sequential=True)`` every layer is the whitened optimum for the inputs the
    *converted* model feeds it (earlier layers already truncated), not the dense model's inputs; the
    result is deterministic."""
    from torch import nn

    from tsvd import spectralize
    from tsvd.calibration import collect_moments
    from tsvd.whitening import whitened_svd

    def mlp(d: int) -> nn.Module:
        return nn.Sequential(nn.Linear(d, 3 * d), nn.Tanh(), nn.Linear(3 * d, d))

    torch.manual_seed(0)
    dense = nn.Sequential(mlp(8), nn.Tanh(), mlp(8))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 8, generator=g) for _ in range(3)]
    loss_fn = lambda m, x: m(x).square().mean()  # noqa: E731
    names = ["0.0", "0.2", "2.0", "2.2"]

    def convert(sequential: bool) -> nn.Module:
        model = copy.deepcopy(dense)
        report = spectralize(model, ["*.*"], rank=3, calibration=xs, loss_fn=loss_fn, sequential=sequential)
        assert [r.name for r in report] == names and all(r.rank == 3 for r in report)
        return model

    seq, oneshot = convert(True), convert(False)
    final = collect_moments(seq, {n: seq.get_submodule(n) for n in names}, xs, loss_fn)
    first = collect_moments(dense, {n: dense.get_submodule(n) for n in names}, xs, loss_fn)
    for n in names:
        expected = whitened_svd(dense.get_submodule(n).weight, final.moment(n)).weight(3).float()
        torch.testing.assert_close(seq.get_submodule(n).to_linear().weight, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final.moment("0.0"), first.moment("0.0"), rtol=0, atol=0)  # the first layer: same inputs
    assert not torch.allclose(final.moment("2.2"), first.moment("2.2"), rtol=1e-2)  # later: truncated inputs
    assert not torch.allclose(seq.get_submodule("2.2").to_linear().weight,
                              oneshot.get_submodule("2.2").to_linear().weight, rtol=1e-3, atol=1e-4)
    again = convert(True)
    assert all(torch.equal(a, b) for a, b in zip(seq.state_dict().values(), again.state_dict().values()))


def test_sequential_needs_calibration():
    from torch import nn

    from tsvd import UserError, spectralize
    with pytest.raises(UserError, match="sequential=True needs calibration="):
        spectralize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["*"], rank=2, sequential=True)


def test_sequential_calibration_of_a_hf_llama_replays_blocks_with_the_same_result(hf_dir, monkeypatch):
    """On a Llama (decoder layers in a ModuleList, rotary tables and a cache passed as keywords) replaying
    the cached block inputs gives the factors of the full, stopped passes, with fewer model passes."""
    import tsvd.convert
    from tsvd import spectralize
    from tsvd.calibration import token_windows

    windows = token_windows(torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(2)), 24, 96, 2)
    passes = []

    def convert(replay: bool):
        model = load_dense(hf_dir)
        model.register_forward_pre_hook(lambda *a: passes.append(replay))
        if not replay:
            monkeypatch.setattr(tsvd.convert, "find_blocks", lambda *a: None)
        spectralize(model, ["*.mlp.*", "*.self_attn.*"], rank=5, calibration=windows, sequential=True)
        monkeypatch.undo()
        return model

    replayed, full = convert(True), convert(False)
    assert passes.count(True) == 1 + len(windows) < passes.count(False)
    names = [n for n, m in full.named_modules() if isinstance(m, SpectralLinear)]
    assert len(names) == 14
    for n in names:
        torch.testing.assert_close(replayed.get_submodule(n).to_linear().weight, full.get_submodule(n).to_linear().weight,
                                   rtol=1e-4, atol=1e-5)
