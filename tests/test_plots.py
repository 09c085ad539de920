"""Rank heatmap from a run's ranks.jsonl: reading the format, the matrix behind the picture, a PNG out."""

from __future__ import annotations

import json
import math

import pytest

from tsvd.plots import load_rank_history, rank_heatmap, rank_matrix

HISTORY = [
    {"step": 0, "ranks": {"layers.0.attn.q": 32, "layers.0.attn.k": 32}},
    {"step": 100, "ranks": {"layers.0.attn.q": 20, "layers.0.attn.k": 48}},
    {"step": 200, "ranks": {"layers.0.attn.q": 24, "layers.0.attn.k": 40, "layers.0.mlp.down": 16}},
    {"step": 100, "ranks": {"layers.0.attn.q": 22, "layers.0.attn.k": 48}},  # a resumed run re-logs step 100
]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")


def test_rank_matrix_orders_layers_and_steps(tmp_path):
    write_jsonl(tmp_path / "ranks.jsonl", HISTORY)
    layers, steps, R = rank_matrix(load_rank_history(tmp_path / "ranks.jsonl"))
    assert layers == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.mlp.down"]  # model order, as written
    assert steps == [0, 100, 200]
    assert R[0].tolist() == [32, 22, 24]  # the later record of step 100 wins
    assert R[1].tolist() == [32, 48, 40]
    assert math.isnan(R[2, 0]) and R[2, 2] == 16


def test_heatmap_png_from_file_and_from_records(tmp_path):
    write_jsonl(tmp_path / "ranks.jsonl", HISTORY)
    for source, out in ((tmp_path / "ranks.jsonl", tmp_path / "a.png"), (HISTORY, tmp_path / "sub" / "b.png")):
        assert rank_heatmap(source, out) == out
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "ranks": [32]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_rank_history(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="empty"):
        rank_heatmap([], tmp_path / "x.png")
