"""A prepared dataset on disk (tsvd/data/shards.py): missing and corrupted datasets are named errors."""

from __future__ import annotations

import numpy as np
import pytest
from data_common import cfg_for, corpus  # noqa: F401  (fixtures)

from tsvd import UserError
from tsvd.data import load_data, prepare_data


def test_corrupted_shards_are_detected(tmp_path, corpus):  # noqa: F811
    prepare_data(cfg_for(tmp_path, corpus), progress=False)
    shard = tmp_path / "ds" / "train.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-1])  # not a multiple of the dtype size
    with pytest.raises(UserError, match="corrupted"):
        load_data(tmp_path / "ds")
    shard.write_bytes(good + b"\0\0")  # one token too many
    with pytest.raises(UserError, match="corrupted"):
        load_data(tmp_path / "ds")
    shard.write_bytes(np.full(len(good) // 2, 999, dtype=np.uint16).tobytes())  # ids beyond the vocabulary
    with pytest.raises(UserError, match="vocab_size"):
        load_data(tmp_path / "ds")
    (tmp_path / "ds" / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match="unreadable"):
        load_data(tmp_path / "ds")


def test_missing_dataset_says_how_to_build_it(tmp_path, corpus):  # noqa: F811
    with pytest.raises(UserError, match=r"data\.dir.*tsvd prepare"):
        load_data(tmp_path / "nowhere")
    prepare_data(cfg_for(tmp_path, corpus), progress=False)
    (tmp_path / "ds" / "val.bin").unlink()
    with pytest.raises(UserError, match=r"data\.dir: val\.bin missing.*tsvd prepare"):
        load_data(tmp_path / "ds")
