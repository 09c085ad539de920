"""Starting a run (tsvd/trainer/start.py): where it resumes from, whether the checkpoint fits the config,
the vocabulary, data prepared by rank 0 only."""

import pytest

from tsvd.errors import UserError
from tsvd.trainer import Trainer, train
from tsvd.trainer.start import check_compatible, ensure_data, set_vocab


def test_fresh_refuses_to_clobber_a_run(tiny_config):
    cfg = tiny_config("train.steps=10")
    train(cfg, progress=False)
    with pytest.raises(UserError, match="already holds a run's checkpoints"):
        Trainer(tiny_config("train.steps=10"), resume=None, progress=False)


def test_checkpoint_from_a_different_model_is_refused(tiny_config):
    train(tiny_config("train.steps=10"), progress=False)
    with pytest.raises(UserError, match="model.dim"):
        Trainer(tiny_config("train.steps=10", "model.dim=64"), progress=False)


def test_vocab_mismatch_is_a_user_error(tiny_config):
    with pytest.raises(UserError, match="model.vocab_size"):
        Trainer(tiny_config("model.vocab_size=300"), progress=False)


def test_vocab_is_taken_from_the_tokenizer_or_must_match(tiny_config):
    cfg = tiny_config()
    set_vocab(cfg, 257)
    assert cfg.model.vocab_size == 257
    set_vocab(cfg, 257)  # equal: fine
    with pytest.raises(UserError, match=r"model.vocab_size: 257 does not match the tokenizer .* \(300\)"):
        set_vocab(cfg, 300)


def test_architecture_keys_and_targets_are_compared(tiny_config):
    cfg = tiny_config("model.vocab_size=257")
    saved = {"config": {"model": {"dim": 32, "n_layers": 2, "vocab_size": 257,
                                  "spectral": {"targets": ["down", "up", "gate", "o", "v", "k", "q"]}}}}
    check_compatible(cfg, saved, "ckpt")  # same architecture, targets in another order
    with pytest.raises(UserError, match="model.n_layers: the checkpoint ckpt was trained with 3"):
        check_compatible(cfg, {"config": {"model": {**saved["config"]["model"], "n_layers": 3}}}, "ckpt")
    with pytest.raises(UserError, match="model.spectral.targets: differ"):
        check_compatible(cfg, {"config": {"model": {"spectral": {"targets": ["q"]}}}}, "ckpt")


def test_other_ranks_wait_for_rank_0_to_prepare_the_data(tiny_config, monkeypatch):
    cfg = tiny_config("engine.timeout_s=1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("tsvd.trainer.start.DATA_WAIT_S", 0)
    with pytest.raises(UserError, match="was not prepared by rank 0 in time"):
        ensure_data(cfg, progress=False)
    monkeypatch.setenv("RANK", "0")
    ensure_data(cfg, progress=False)
    ensure_data(cfg, progress=False)  # prepared: nothing to do
    monkeypatch.setenv("RANK", "1")
    ensure_data(cfg, progress=False)  # rank 1 finds it at once
