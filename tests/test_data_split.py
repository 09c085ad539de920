"""The held-out splits (tsvd/data/split.py): by tokens, with a document floor, reproducible, spread."""

from __future__ import annotations

import numpy as np

from tsvd.data.corpus import Document
from tsvd.data.split import MIN_HELDOUT_DOCS, split_order, split_sizes


def test_split_by_tokens_with_a_document_floor():
    rng = np.random.default_rng(0)
    docs = [Document(f"d/{i:04d}.txt", "") for i in range(2000)]
    sizes = [int(x) for x in rng.lognormal(6, 1.5, size=2000)]  # heavy-tailed: a few documents hold much
    order = split_order(docs)
    assert order == split_order(docs) and sorted(order) == list(range(2000))
    side = split_sizes(sizes, order, [0.1, 0.05])
    assert side == split_sizes(sizes, order, [0.1, 0.05])  # reproducible
    total = sum(sizes)
    held = {k: sum(n for n, s in zip(sizes, side) if s == k) for k in range(3)}
    assert held[1] >= 0.1 * total and held[2] >= 0.05 * total  # at least the share of the tokens ...
    assert side.count(1) >= MIN_HELDOUT_DOCS and side.count(2) >= MIN_HELDOUT_DOCS  # ... and ≥ 50 docs
    # drawn across the corpus (hash order), not a block of neighbouring names
    val_idx = [i for i, s in enumerate(side) if s == 1]
    assert min(val_idx) < 200 and max(val_idx) > 1800
    # minimal: dropping the last document drawn for val would miss a requirement
    last = [i for i in order if side[i] == 1][-1]
    assert held[1] - sizes[last] < 0.1 * total or side.count(1) - 1 < MIN_HELDOUT_DOCS
    # val is the same with or without a test split
    assert [s == 1 for s in split_sizes(sizes, order, [0.1, 0.0])] == [s == 1 for s in side]


def test_split_document_floor_on_a_small_corpus():
    order = list(range(20))
    # 20 equal documents, val 2%: the floor wants 50 documents but stops at half the tokens
    side = split_sizes([10] * 20, order, [0.02, 0.0])
    assert side.count(1) == 10 and side.count(0) == 10
    side = split_sizes([10] * 20, order, [0.02, 0.02])  # with a test split: a quarter each
    assert side.count(1) == 5 and side.count(2) == 5 and side.count(0) == 10
    # one huge training document: val gets all but one document (the floor), train keeps one
    side = split_sizes([1000] + [1] * 9, list(range(1, 10)) + [0], [0.02, 0.0])
    assert side.count(1) == 9 and side[0] == 0
    # two documents: one each side, whatever the fraction; with a test split one each of three
    for frac in (0.001, 0.999):
        assert sorted(split_sizes([5, 5], [0, 1], [frac, 0.0])) == [0, 1]
    assert sorted(split_sizes([5, 5, 5], [2, 0, 1], [0.5, 0.5])) == [0, 1, 2]
