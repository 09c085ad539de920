"""What training reads from a token shard: seeded, resumable random windows (``BatchSampler``), fixed
evaluation windows (``val_batches``) and the unigram baseline a model must beat (``unigram_loss``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tsvd.errors import UserError


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise UserError(f"train.seq_len: windows of {seq_len}+1 tokens do not fit in a shard of {len(tokens)} "
                        "tokens; use a shorter seq_len or more data")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """``x = tokens[s : s+T]``, ``y = tokens[s+1 : s+T+1]`` for each start ``s``: two ``(B, T)`` int64 tensors."""
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchSampler:
    """Random windows ``(x, y)`` of shape ``(batch_size, seq_len)``; ``y`` is ``x`` shifted by one token.

    Batch ``i`` depends only on ``(seed, rank, i)``, so ``state_dict()`` is just the position and a
    resumed sampler continues with exactly the batch that would have come next. Data-parallel
    ranks pass their ``rank`` to draw different windows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0) -> None:
        _check_length(tokens, seq_len)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.step = seed, rank, 0

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.step += 1
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.rank, self.step = state["seed"], state["rank"], state["step"]


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed evaluation batches: ``n·batch_size`` windows evenly spaced over the shard."""
    _check_length(tokens, seq_len)
    starts = np.linspace(0, len(tokens) - seq_len - 1, n * batch_size).round().astype(np.int64)
    return [_windows(tokens, s, seq_len) for s in starts.reshape(n, batch_size)]


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val`` of an add-one-smoothed unigram model fit on ``train``."""
    def counts(tokens: np.ndarray) -> np.ndarray:
        c = np.zeros(vocab_size, dtype=np.int64)
        for i in range(0, len(tokens), 1 << 24):
            c += np.bincount(tokens[i:i + (1 << 24)], minlength=vocab_size)
        return c

    train_counts = counts(train_tokens) + 1
    log_p = np.log(train_counts) - np.log(train_counts.sum())
    val_counts = counts(val_tokens)
    return float(-(val_counts * log_p).sum() / val_counts.sum())
