"""Hugging Face interop (tsvd.hf, `tsvd convert`, `tsvd export`) on tiny random models — no downloads.

Tolerances: a full-energy conversion stores the float64 SVD of each fp32 weight as fp32 factors, so
each projection reproduces its weight to a few ulp; the factored matmuls round differently from the
dense ones (relative ~1e-7 per op). Through two decoder layers the logits (O(1)) agree to ~1e-6;
ATOL = 1e-4 leaves headroom and is still far below what any real mistake costs: a dropped direction,
a wrong RoPE layout or a transposed weight moves the logits by O(0.1–1) here (checked below).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (after HF_HUB_OFFLINE: read at import)

from tsvd import checkpoint as ckpt  # noqa: E402
from tsvd.cli import main  # noqa: E402
from tsvd.config import Config, ModelConfig, SpectralConfig, to_dict  # noqa: E402
from tsvd.config import TrainConfig  # noqa: E402
from tsvd.errors import UserError  # noqa: E402
from tsvd.hf import (FACTORS_FILE, META_FILE, REPORT_JSON, REPORT_TXT, convert_hf, export, finetune,  # noqa: E402
                     load_converted, load_factors, perplexity, save_factors, tsvd_to_llama)
from tsvd.spectral import SpectralLinear  # noqa: E402
from tsvd.stiefel import drift, gram  # noqa: E402

ATOL = 1e-4
VOCAB = 96


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def load_dense(path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP spinning on a busy 2-core machine makes each
    small op ~100× slower (the whole file: ~20 s single-threaded vs 70 s with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (2 layers, hidden 64, GQA, tied head) saved as safetensors."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, rope_theta=500.0, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "full"
    report = convert_hf(hf_dir, out, energy=1.0, log=None)
    return out, report


def test_convert_full_energy_keeps_logits(hf_dir, converted, tokens):
    out, report = converted
    assert {p.name for p in out.iterdir()} >= {FACTORS_FILE, META_FILE, REPORT_JSON, REPORT_TXT}
    # every block projection converted, the tied output head left alone
    assert len(report) == 2 * 7 and all(r.name.startswith("model.layers.") for r in report)
    assert all(abs(r.retained_energy - 1) < 1e-6 for r in report)  # fp32 s vs the float64 norm
    meta = json.loads((out / META_FILE).read_text())
    assert meta["architecture"] == "LlamaForCausalLM" and meta["conversion"]["energy"] == 1.0
    assert meta["spectral"]["model.layers.0.mlp.up_proj"] == {"kind": "linear", "rank": 64}
    assert json.loads((out / REPORT_JSON).read_text())["total"]["layers"] == 14
    model, _ = load_converted(out)
    assert isinstance(model.model.layers[1].self_attn.k_proj, SpectralLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the reload
    ref = logits_of(load_dense(hf_dir), tokens)
    torch.testing.assert_close(logits_of(model, tokens), ref, rtol=0, atol=ATOL)


def test_convert_energy_picks_ranks_and_changes_logits(hf_dir, tmp_path, tokens):
    report = convert_hf(hf_dir, tmp_path / "e90", energy=0.9, targets=["*.mlp.*"], log=None)
    assert [r.name.rsplit(".", 1)[1] for r in report] == ["gate_proj", "up_proj", "down_proj"] * 2
    assert all(0.9 <= r.retained_energy < 1.0 and r.rank < 64 for r in report)
    model, meta = load_converted(tmp_path / "e90")
    assert {n: s["rank"] for n, s in meta["spectral"].items()} == {r.name: r.rank for r in report}
    diff = (logits_of(model, tokens) - logits_of(load_dense(hf_dir), tokens)).abs().max()
    assert diff > 10 * ATOL  # the tolerance above is meaningful: dropping 10% of the energy shows


def test_export_dense_reloads_in_transformers(hf_dir, converted, tmp_path, tokens):
    out, _ = converted
    result = export(out, tmp_path / "dense")
    assert result.kind == "dense" and (tmp_path / "dense" / "model.safetensors").is_file()
    dense = load_dense(tmp_path / "dense")
    assert not any(isinstance(m, SpectralLinear) for m in dense.modules())
    torch.testing.assert_close(logits_of(dense, tokens), logits_of(load_dense(hf_dir), tokens), rtol=0, atol=ATOL)


def test_factor_export_round_trip(converted, tmp_path, tokens):
    out, _ = converted
    result = export(out, tmp_path / "factors", factors=True)
    assert result.kind == "factors"
    a, meta_a = load_converted(out)
    b, meta_b = load_converted(tmp_path / "factors")
    assert meta_a["spectral"] == meta_b["spectral"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_factors_any_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    model[0] = SpectralLinear.from_linear(model[0], rank=5)
    save_factors(model, tmp_path, {"note": "plain module"})
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    meta = load_factors(fresh, tmp_path)
    assert meta["note"] == "plain module" and isinstance(fresh[0], SpectralLinear) and fresh[0].rank == 5
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="do not fit"):
        load_factors(nn.Sequential(nn.Linear(8, 16)), tmp_path)
    with pytest.raises(UserError, match="has a ReLU there"):
        load_factors(nn.Sequential(nn.ReLU()), tmp_path)
    with pytest.raises(UserError, match="does not have"):
        load_factors(nn.Sequential(), tmp_path)


# ------------------------------------------------------------------------------ tsvd's own model


def tsvd_checkpoint(root, tie: bool, targets: list[str], seed: int = 0):
    """A torch-engine training checkpoint (meta.json + engine_state.pt) of a random tsvd Transformer."""
    from tsvd.model import build_model

    torch.manual_seed(seed)
    spectral = SpectralConfig(targets=targets, rank=6, rank_overrides={"embed": 16} if "embed" in targets else {})
    mcfg = ModelConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=32,
                       rope_theta=321.0, norm_eps=1e-5, tie_embeddings=tie, init_std=0.2, spectral=spectral)
    cfg = Config(model=mcfg, train=TrainConfig(seq_len=16))
    model = build_model(mcfg)
    with torch.no_grad():  # non-trivial norm weights so a mapping mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ranks = {n: m.rank for n, m in model.named_modules() if hasattr(m, "rank") and hasattr(m, "s")}
    path = ckpt.save_checkpoint(root / "checkpoints", 7, {"ranks": ranks, "config": to_dict(cfg)},
                                lambda d: torch.save({"model": model.state_dict(), "optimizer": {},
                                                      "client_state": {"step": 7}}, d / "engine_state.pt"))
    return model.eval(), path


@pytest.mark.parametrize("tie,targets", [(True, ["q", "v", "gate", "down"]), (False, ["k", "o", "up", "lm_head"]),
                                         (True, ["q", "embed"])])
def test_tsvd_model_exports_to_llama(tmp_path, tie, targets):
    model, _ = tsvd_checkpoint(tmp_path / "run", tie, targets)
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    ref = logits_of(model, x)
    result = export(tmp_path / "run", tmp_path / "hf")  # a run's out_dir resolves to its latest checkpoint
    hf = load_dense(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM" and result.source == "tsvd checkpoint"
    cfg = hf.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (48, 80, 4, 2)
    assert cfg.tie_word_embeddings == tie
    torch.testing.assert_close(logits_of(hf, x), ref, rtol=0, atol=ATOL)
    # factor export of the same checkpoint keeps the spectral layers and the function
    export(tmp_path / "run", tmp_path / "factors", factors=True)
    spectral, meta = load_converted(tmp_path / "factors")
    n_linear = sum(t in targets for t in ("q", "k", "v", "o", "gate", "up", "down")) * 2 + ("lm_head" in targets)
    assert len(meta["spectral"]) == n_linear
    torch.testing.assert_close(logits_of(spectral, x), ref, rtol=0, atol=ATOL)


def test_rope_layout_matters(tmp_path):
    """The export check is sensitive to the RoPE convention: interleaving q/k rows breaks it."""
    model, _ = tsvd_checkpoint(tmp_path / "run", True, [])
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = logits_of(model, x)
    hf = tsvd_to_llama(model)  # moves the projections: model and hf share them from here on
    torch.testing.assert_close(logits_of(hf, x), ref, rtol=0, atol=ATOL)
    hd = 12
    perm = torch.arange(48).view(4, 2, hd // 2).transpose(1, 2).reshape(-1)  # split halves -> interleaved pairs
    with torch.no_grad():
        for blk in hf.model.layers:
            blk.self_attn.q_proj.weight.copy_(blk.self_attn.q_proj.weight[perm])
    assert (logits_of(hf, x) - ref).abs().max() > 100 * ATOL


# ------------------------------------------------------------------------------ fine-tuning


def test_finetune_converted_model_retracts(converted, tmp_path):
    out, _ = converted
    model, _ = load_converted(out)
    data = torch.randint(0, 8, (4000,), generator=torch.Generator().manual_seed(0))  # a tiny 8-token language
    before, _ = perplexity(model, data, seq_len=16, max_windows=8)
    train = TrainConfig(steps=12, batch_size=4, seq_len=16, lr=3e-3, spectral_lr=3e-3, core_lr=3e-3,
                        warmup_steps=2, weight_decay=0.0)
    result = finetune(model, data, train, seed=0)
    after, n = perplexity(model, data, seq_len=16, max_windows=8)
    assert len(result.losses) == 12 and n == 8 * 16
    assert after < before - 0.5
    for mod in model.modules():
        if isinstance(mod, SpectralLinear):
            for A in mod.factors():
                assert float(drift(gram(A.detach().double()))) < 1e-4


# ------------------------------------------------------------------------------ CLI


def test_cli_convert_and_export(hf_dir, tmp_path, capsys, tokens):
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
def test_cli_user_errors(hf_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, hf=hf_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err  # transformers' loading progress bars may come first
    last = err.strip().splitlines()[-1]
    assert last.startswith("tsvd: error:") and message in last and "Traceback" not in err


def test_cli_convert_flags_are_exclusive(hf_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(hf_dir), str(tmp_path / "o"), "--rank", "4", "--energy", "0.9"])
    assert e.value.code == 2
