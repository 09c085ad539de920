"""Config loading: defaults, overrides, and one clear error (naming the key) per mistake."""

from pathlib import Path

import pytest
import yaml

from tsvd.config import Config, apply_overrides, config_from_dict, load_config
from tsvd.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_and_number_strings():
    cfg = config_from_dict({"train": {"lr": "1e-3"}})
    assert cfg.train.lr == 1e-3 and cfg.model.spectral.targets == []


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["train.steps=7", "model.spectral.targets=[q, up]", "train.lazy_tol=null"])
    cfg = config_from_dict(raw)
    assert cfg.train.steps == 7 and cfg.model.spectral.targets == ["q", "up"] and cfg.train.lazy_tol is None


BAD = [
    ({"modle": {}}, "modle: unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"steps": 1.5}}, "train.steps: expected an integer"),
    ({"train": {"steps": 0}}, "train.steps: must be > 0"),
    ({"train": {"lr": -1}}, "train.lr: must be > 0"),
    ({"train": {"betas": [0.9]}}, "train.betas"),
    ({"train": {"retraction": "svd"}}, "train.retraction: expected one of"),
    ({"train": {"seq_len": 4096}}, "train.seq_len: 4096 exceeds model.max_seq_len"),
    ({"model": {"dim": 250, "n_heads": 4}}, "model.dim"),
    ({"model": {"n_kv_heads": 3}}, "model.n_kv_heads"),
    ({"model": {"tie_embeddings": "yes"}}, "model.tie_embeddings: expected true/false"),
    ({"model": {"spectral": {"targets": ["q"], "rank": 0}}}, "model.spectral.rank=0 is impossible"),
    ({"model": {"spectral": {"targets": ["q"], "rank": -3}}}, "model.spectral.rank"),
    ({"model": {"spectral": {"targets": ["q"], "rank": 999}}}, "model.spectral.rank=999 is impossible for a 256×256 weight"),
    ({"model": {"spectral": {"targets": ["qq"]}}}, "model.spectral.targets: unknown target 'qq'"),
    ({"model": {"spectral": {"targets": ["lm_head"]}}}, "'lm_head' cannot be spectral with model.tie_embeddings: true"),
    ({"model": {"vocab_size": 64, "spectral": {"targets": ["embed"], "rank": 65}}}, "(the embed projection)"),
    ({"model": {"spectral": {"targets": ["up"], "rank_overrides": {"up": 5000}}}}, "model.spectral.rank_overrides.up"),
    ({"model": {"spectral": {"targets": "q"}}}, "model.spectral.targets: expected a list"),
    ({"rank": {"energy": 1.5}}, "rank.energy must be a number in (0, 1]"),
    ({"rank": {"energy": 0}}, "rank.energy must be a number in (0, 1]"),
    ({"rank": {"policy": "magic"}}, "rank.policy: expected one of"),
    ({"rank": {"policy": "energy"}}, "rank.policy: 'energy' needs spectral layers"),
    ({"rank": {"min_rank": 8, "max_rank": 4}}, "rank.max_rank"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction"),
    ({"data": {"corpus": []}}, "data.corpus: empty"),
    ({"data": {"vocab_size": 100}}, "data.vocab_size"),
    ({"data": {"tokenizer": "byte", "tokenizer_file": "tok.json"}}, "data.tokenizer_file: only used with data.tokenizer: bpe"),
    ({"engine": {"kind": "deepspeed"}}, "engine.deepspeed_config: required"),
    ([1, 2], "config: expected a mapping"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"model": {"dim": 64}, "train": {"lr": "x"}}))
    with pytest.raises(UserError, match=r"wrong.yaml: train.lr"):
        load_config(wrong)


def test_a_per_layer_rank_override_is_one_key():
    """Module names hold dots: ``--set`` keeps everything after ``rank_overrides`` as one key."""
    raw = apply_overrides({}, ["model.spectral.rank_overrides.layers.2.attn.q=5", "model.spectral.rank_overrides.up=3"])
    assert raw["model"]["spectral"]["rank_overrides"] == {"layers.2.attn.q": 5, "up": 3}


def test_bad_override_syntax():
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(UserError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=1"])


@pytest.mark.parametrize("text,message", [
    ("", "the config is empty"),
    ("\n\n", "the config is empty"),
    ("# a comment and nothing else\n", "the config is empty"),
    ("train:\n  steps: 10\n", "no 'model' section"),
    ("- 1\n- 2\n", "expected a mapping at the top level, got list"),
    ("0\n", "expected a mapping at the top level, got int"),
], ids=["empty", "blank-lines", "only-a-comment", "no-model", "list", "scalar"])
def test_a_config_file_must_state_its_model(tmp_path, text, message):
    """An empty file, a comment, or a file without ``model`` is a mistake, not a request for the defaults."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_model_section_from_overrides_or_empty_counts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\n")
    assert load_config(path, ["model.dim=64"]).model.dim == 64
    path.write_text("model: {}\n")
    assert load_config(path).model == Config().model  # stated explicitly: the defaults are chosen
