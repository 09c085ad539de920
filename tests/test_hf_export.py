"""tsvd.hf.export: factor checkpoints and tsvd training checkpoints -> Hugging Face checkpoints."""

from __future__ import annotations

import torch
from hf_common import ATOL, converted, hf_dir, load_dense, logits_of, tokens  # noqa: F401  (fixtures)

from tsvd.hf.conversion import load_converted
from tsvd.hf.export import export
from tsvd.spectral import SpectralLinear


def test_export_dense_reloads_in_transformers(hf_dir, converted, tmp_path, tokens):  # noqa: F811
    out, _ = converted
    result = export(out, tmp_path / "dense")
    assert result.kind == "dense" and (tmp_path / "dense" / "model.safetensors").is_file()
    dense = load_dense(tmp_path / "dense")
    assert not any(isinstance(m, SpectralLinear) for m in dense.modules())
    torch.testing.assert_close(logits_of(dense, tokens), logits_of(load_dense(hf_dir), tokens), rtol=0, atol=ATOL)


def test_factor_export_round_trip(converted, tmp_path):  # noqa: F811
    out, _ = converted
    result = export(out, tmp_path / "factors", factors=True)
    assert result.kind == "factors"
    a, meta_a = load_converted(out)
    b, meta_b = load_converted(tmp_path / "factors")
    assert meta_a["spectral"] == meta_b["spectral"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
