"""tsvd.hf.conversion: HF causal LM -> factor checkpoint -> HF model with spectral layers (tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_common import ATOL, converted, hf_dir, load_dense, logits_of, tokens  # noqa: F401  (fixtures)

from tsvd.errors import UserError
from tsvd.hf.conversion import REPORT_JSON, REPORT_TXT, choose_targets, convert_hf, load_converted
from tsvd.hf.factors import FACTORS_FILE, META_FILE
from tsvd.hf.loading import load_hf_model
from tsvd.spectral import SpectralLinear


def test_convert_full_energy_keeps_logits(hf_dir, converted, tokens):  # noqa: F811
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


def test_convert_energy_picks_ranks_and_changes_logits(hf_dir, tmp_path, tokens):  # noqa: F811
    report = convert_hf(hf_dir, tmp_path / "e90", energy=0.9, targets=["*.mlp.*"], log=None)
    assert [r.name.rsplit(".", 1)[1] for r in report] == ["gate_proj", "up_proj", "down_proj"] * 2
    assert all(0.9 <= r.retained_energy < 1.0 and r.rank < 64 for r in report)
    model, meta = load_converted(tmp_path / "e90")
    assert {n: s["rank"] for n, s in meta["spectral"].items()} == {r.name: r.rank for r in report}
    diff = (logits_of(model, tokens) - logits_of(load_dense(hf_dir), tokens)).abs().max()
    assert diff > 10 * ATOL  # the tolerance above is meaningful: dropping 10% of the energy shows


def test_choose_targets_leaves_the_tied_head_alone(hf_dir):  # noqa: F811
    model, _ = load_hf_model(hf_dir, with_tokenizer=False)
    assert choose_targets(model, None, ["*.k_proj"]) == (["*"], ["*.k_proj", "lm_head"])
    assert choose_targets(model, ["*.mlp.*"], []) == (["*.mlp.*"], [])
    with pytest.raises(UserError, match="lm_head is tied to the input embedding .* add --exclude lm_head"):
        choose_targets(model, ["*"], [])


def test_load_converted_refuses_a_plain_module_checkpoint(tmp_path):
    from tsvd.hf.factors import save_factors

    save_factors(torch.nn.Sequential(SpectralLinear(4, 4, 2)), tmp_path)
    with pytest.raises(UserError, match="non-Hugging Face module; use load_factors"):
        load_converted(tmp_path)
