"""The held-out splits: documents → train / val / test, by tokens, with a floor on documents.

Documents are visited in the order of a hash of their names (reproducible, spread across the corpus,
independent of the machine's paths); the first ones go to ``val`` until it holds at least
``val_fraction`` of the tokens and at least ``MIN_HELDOUT_DOCS`` documents, the next ones likewise to
``test`` (``test_fraction > 0``), the rest to ``train``. Never a document on two sides.
"""

from __future__ import annotations

import hashlib

from tsvd.data.corpus import Document

MIN_HELDOUT_DOCS = 50  # a held-out split gets at least this many documents (all but one on a small corpus) ...
HELDOUT_FLOOR_CAP = 0.5  # ... unless that would give the held-out splits together more than this share of the tokens


def _unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) from a document name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_order(docs: list[Document]) -> list[int]:
    """Indices of ``docs`` in the order held-out documents are drawn: by a hash of the name."""
    return sorted(range(len(docs)), key=lambda i: (_unit_hash(docs[i].name), docs[i].name))


def split_sizes(sizes: list[int], order: list[int], fractions: list[float]) -> list[int]:
    """Assign documents to held-out splits by size: returns ``side[i]`` = 0 (train) or ``j + 1`` (split ``j``).

    ``sizes[i]``: document ``i``'s tokens (or bytes); ``order``: the visiting order (``split_order``);
    ``fractions[j]``: split ``j``'s share (0 = no such split). Split ``j`` takes the next documents in
    ``order`` until it holds ``≥ fractions[j]`` of the total and ``≥ MIN_HELDOUT_DOCS`` documents — fewer
    documents when the floor would give it more than its part of ``HELDOUT_FLOOR_CAP`` of the total
    (shared equally by the held-out splits), or when the corpus is too small (one document is always
    left for train and for each later split).
    """
    total, side, pos = sum(sizes), [0] * len(sizes), 0
    active = [j for j, f in enumerate(fractions) if f > 0]
    cap = HELDOUT_FLOOR_CAP * total / max(1, len(active))
    for k, j in enumerate(active):
        spare = len(order) - pos - 1 - (len(active) - k - 1)  # documents this split may take
        held, count = 0, 0
        while count < spare and (held < fractions[j] * total or
                                 (count < MIN_HELDOUT_DOCS and held < cap) or count == 0):
            i = order[pos]
            side[i], held, count, pos = j + 1, held + sizes[i], count + 1, pos + 1
    return side
