"""What training reads from a shard (tsvd/data/batches.py): sampler determinism and resume, coverage,
fixed evaluation windows, the unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsvd import UserError
from tsvd.data.batches import BatchSampler, unigram_loss, val_batches


def test_sampler_is_deterministic_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BatchSampler(tokens, 4, 16, seed=1), BatchSampler(tokens, 4, 16, seed=1)
    batches = [next(a) for _ in range(5)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one token (tokens[i] == i here)
        assert int(y.max()) < 1000
    for x, y in batches:
        x2, y2 = next(b)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    c = BatchSampler(tokens, 4, 16, seed=1)
    for _ in range(3):
        next(c)
    resumed = BatchSampler(tokens, 4, 16, seed=123)
    resumed.load_state_dict(c.state_dict())
    assert torch.equal(next(resumed)[0], batches[3][0]) and torch.equal(next(resumed)[0], batches[4][0])
    assert not torch.equal(next(BatchSampler(tokens, 4, 16, seed=2))[0], batches[0][0])
    assert not torch.equal(next(BatchSampler(tokens, 4, 16, seed=1, rank=1))[0], batches[0][0])


def test_sampler_covers_the_whole_shard():
    tokens = np.arange(20, dtype=np.uint16)
    seen = torch.cat([next(s)[1] for s in [BatchSampler(tokens, 8, 4, seed=0)] for _ in range(50)])
    assert int(seen.min()) == 1 and int(seen.max()) == 19  # first and last windows both occur


def test_val_batches_are_fixed_and_evenly_spaced():
    tokens = np.arange(1001, dtype=np.uint32)
    batches = val_batches(tokens, 2, 10, 5)
    assert len(batches) == 5 and all(x.shape == (2, 10) for x, _ in batches)
    starts = [int(x[i, 0]) for x, _ in batches for i in range(2)]
    assert starts[0] == 0 and starts[-1] == 1001 - 11
    assert np.ptp(np.diff(starts)) <= 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val_batches(tokens, 2, 10, 5)))


def test_short_shard_is_a_user_error():
    with pytest.raises(UserError, match="seq_len"):
        BatchSampler(np.arange(10, dtype=np.uint16), 2, 10, seed=0)
    with pytest.raises(UserError, match="seq_len"):
        val_batches(np.arange(10, dtype=np.uint16), 2, 10, 1)


def test_unigram_baseline():
    rng = np.random.default_rng(0)
    V = 50
    uniform = rng.integers(0, V, 200_000).astype(np.uint16)
    assert unigram_loss(uniform[:100_000], uniform[100_000:], V) == pytest.approx(math.log(V), abs=0.01)
    p = np.arange(1, V + 1) / np.arange(1, V + 1).sum()
    skewed = rng.choice(V, 200_000, p=p).astype(np.uint16)
    entropy = float(-(p * np.log(p)).sum())
    assert unigram_loss(skewed[:100_000], skewed[100_000:], V) == pytest.approx(entropy, abs=0.01)
    # add-one smoothing: a token never seen in train still has finite loss
    assert math.isfinite(unigram_loss(np.zeros(10, np.uint16), np.full(10, 7, np.uint16), V))

