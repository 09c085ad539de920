"""tsvd.hf.factors: the factor checkpoint format for any nn.Module (no Hugging Face needed)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tsvd.errors import UserError
from tsvd.hf.factors import (FACTORS_FILE, FORMAT, META_FILE, is_factor_checkpoint, load_factors, read_factor_meta,
                             save_factors)
from tsvd.spectral import SpectralEmbedding, SpectralLinear


class TiedNet(nn.Module):
    """A spectral embedding, a spectral projection and a head tied to a dense table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 8)
        self.table = nn.Embedding(12, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.emb(ids)))


def test_save_load_factors_any_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    model[0] = SpectralLinear.from_linear(model[0], rank=5)
    save_factors(model, tmp_path, {"note": "plain module"})
    assert is_factor_checkpoint(tmp_path)
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


def test_layout_kinds_ranks_and_tied_tensors(tmp_path):
    """Embeddings and linears both round-trip at their ranks (a loaded model resizes a spectral layer of
    another rank); a tied tensor is stored once and re-tied by the load."""
    torch.manual_seed(0)
    model = TiedNet()
    model.emb = SpectralEmbedding.from_embedding(model.emb, rank=3)
    model.proj = SpectralLinear.from_linear(model.proj, rank=4)
    save_factors(model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["format"] == FORMAT and meta["dtype"] == "float32"
    assert meta["spectral"] == {"emb": {"kind": "embedding", "rank": 3}, "proj": {"kind": "linear", "rank": 4}}
    assert meta["aliases"] == {"head.weight": "table.weight"}
    fresh = TiedNet()
    fresh.proj = SpectralLinear(8, 8, 7)  # another rank: resized in place by the load
    load_factors(fresh, tmp_path)
    assert fresh.emb.rank == 3 and fresh.proj.rank == 4 and fresh.head.weight is fresh.table.weight
    ids = torch.randint(0, 12, (2, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_read_factor_meta_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(UserError, match=f"not a tsvd factor checkpoint \\(no {META_FILE}\\)"):
        read_factor_meta(tmp_path)
    assert not is_factor_checkpoint(tmp_path)
    (tmp_path / META_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        read_factor_meta(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(UserError, match="unsupported format 'something-else'"):
        read_factor_meta(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": FORMAT, "version": 99}))
    with pytest.raises(UserError, match="unsupported format .* v99"):
        read_factor_meta(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": FORMAT, "version": 1}))
    with pytest.raises(UserError, match=f"{FACTORS_FILE} is missing"):
        read_factor_meta(tmp_path)
