"""Run configuration: dataclasses loaded from YAML and validated at load time.

Every mistake a user can make in a config (unknown key, wrong type, impossible value) raises
``UserError`` naming the dotted key, e.g. ``train.lr: expected a number, got 'fast'``. Overrides
from the command line use the same path syntax: ``--set train.lr=1e-3``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from tsvd.errors import UserError, read_document
from tsvd.spectral import check_rank
from tsvd.spectrum import check_energy

SPECTRAL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "embed")


@dataclass
class SpectralConfig:
    """Which projections are spectral and at what initial rank (or, for conversions, energy)."""

    targets: list[str] = field(default_factory=list)  # subset of SPECTRAL_TARGETS; [] = dense model
    rank: int = 32
    # target -> rank (e.g. embed: 64), or one layer's projection by module name ("layers.2.attn.q": 5), which wins
    rank_overrides: dict[str, int] = field(default_factory=dict)
    init: Literal["scaled", "sct"] = "scaled"


@dataclass
class ModelConfig:
    """A Llama-style decoder. ``vocab_size: 0`` means "take it from the prepared data"."""

    vocab_size: int = 0
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 688
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    spectral: SpectralConfig = field(default_factory=SpectralConfig)


@dataclass
class DataConfig:
    """Where the token shards live and how to build them if they do not exist yet."""

    dir: str = "data/stdlib-bpe"
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])  # "stdlib" or files/folders
    tokenizer: Literal["byte", "bpe"] = "bpe"
    tokenizer_file: Optional[str] = None  # an existing tokenizer.json (skips training)
    vocab_size: int = 4096  # BPE vocabulary to train
    val_fraction: float = 0.02  # share of the tokens held out for validation (at least 50 documents)
    test_fraction: float = 0.0  # share of the tokens held out as a test split (test.bin; 0 = none)
    max_bytes: int = 0  # cap on corpus bytes read (0 = no cap)


@dataclass
class RankConfig:
    """Rank controller (see tsvd.controller). ``static`` is SCT's fixed rank."""

    policy: Literal["static", "energy", "budget"] = "static"
    warmup_steps: int = 100
    interval: int = 100
    energy: float = 0.99  # shrink to the smallest rank keeping this fraction
    grow_tail: float = 0.02  # grow when the smallest directions still hold more than this share
    tail_fraction: float = 0.1  # the "smallest directions": this fraction of the rank
    growth_factor: float = 1.5
    min_rank: int = 4
    max_rank: int = 256
    max_shrink: float = 0.5  # at most this fraction of the rank dropped per decision
    hysteresis: float = 0.05  # ignore changes smaller than this fraction of the rank
    budget_params: int = 0  # budget policy: total spectral parameters (0 = the initial count)
    score: Literal["energy", "fisher"] = "energy"  # budget policy: what a direction is worth (tsvd.controller)
    grow_directions: Literal["gradient", "random"] = "gradient"
    protect: int = 0  # a new direction cannot be dropped for this many decisions (0: no shrink right after growth)
    grow_init: float = 0.0  # |s| of the strongest new direction, × the layer's weakest |s|, against the gradient
    budget_growth: float = 1.0  # budget policy: the budget ramps linearly to this × the initial one by stop_step
    stop_step: int = 0  # no decisions from this step on (a final phase at fixed ranks; 0 = never stop)


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3  # dense parameters (embeddings, norms, dense projections)
    spectral_lr: float = 3e-3  # spectral factors U, V
    core_lr: float = 3e-3  # spectral cores s
    weight_decay: float = 0.1
    spectral_weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    retraction: Literal["cholesky", "householder"] = "cholesky"
    lazy_tol: Optional[float] = None
    retract_every: int = 1  # retract each factor once every k steps (1 = after every step; tsvd.retraction)
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 250
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    device: str = "cpu"  # auto | cpu | cuda | cuda:N (auto: CUDA when present; tsvd.engine.device)
    dtype: Literal["float32", "bfloat16"] = "float32"
    tf32: bool = False  # TF32 matmuls for the model's float32 work on CUDA (never the retraction's)
    threads: int = 0  # torch threads (0 = all cores / ranks)
    layer_cards: str = "auto"  # per-layer TensorBoard cards: all | none | every:K (blocks) | auto (≤ 8 blocks)


@dataclass
class EngineConfig:
    kind: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: Optional[str] = None  # JSON file (configs/ds/zero*.json)
    timeout_s: int = 600  # process-group timeout


@dataclass
class Config:
    seed: int = 0
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# --------------------------------------------------------------------------------------------
# Loading: a small typed walker over dataclass fields (names the key on every error).


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug in this module, not user input


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise UserError(f"{where}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key}: must be {'≥ 0' if allow_zero else '> 0'}, got {value}")


BLOCK_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
LAYER_TARGET = re.compile(r"layers\.(\d+)\.(attn|mlp)\.(\w+)")


def layer_target(layer: int, target: str) -> str:
    """Module name of projection ``target`` in block ``layer`` (``layers.2.attn.q``); paired with
    ``LAYER_TARGET``, which parses it."""
    return f"layers.{layer}.{BLOCK_OF[target]}.{target}"


def initial_rank(m: ModelConfig, target: str, layer: int | None = None) -> tuple[int, str]:
    """``(rank, config key it comes from)`` of the spectral projection ``target`` (in block ``layer``: a
    per-layer override first)."""
    sp = m.spectral
    name = layer_target(layer, target) if layer is not None and target in BLOCK_OF else None
    if name in sp.rank_overrides:
        return sp.rank_overrides[name], f"model.spectral.rank_overrides.{name}"
    if target in sp.rank_overrides:
        return sp.rank_overrides[target], f"model.spectral.rank_overrides.{target}"
    return sp.rank, "model.spectral.rank"


def check_model(m: ModelConfig) -> None:
    """The rules of a model config: sizes, heads, spectral targets and their ranks. The ranks of ``embed``
    and ``lm_head`` depend on the vocabulary and are checked once it is known (``vocab_size > 0``;
    ``tsvd.model`` applies these rules again when it builds a model with the data's vocabulary)."""
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.vocab_size", m.vocab_size, allow_zero=True)
    if m.dim % m.n_heads:
        raise UserError(f"model.dim: {m.dim} is not divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_kv_heads: {m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise UserError(f"model.dim: head dim {m.dim // m.n_heads} must be even for RoPE")
    sp = m.spectral
    per_layer = {}  # module-name overrides -> their target
    for name in sp.rank_overrides:
        match = LAYER_TARGET.fullmatch(name)
        if match is None:
            continue
        layer, tgt = int(match[1]), match[3]
        if tgt not in BLOCK_OF or BLOCK_OF[tgt] != match[2] or layer >= m.n_layers or tgt not in sp.targets:
            raise UserError(f"model.spectral.rank_overrides: {name!r} is not a spectral projection of this model "
                            f"(layers.<0..{m.n_layers - 1}>.attn.<q|k|v|o> or layers.<i>.mlp.<gate|up|down>, "
                            "its target in model.spectral.targets)")
        per_layer[name] = tgt
    for tgt in list(sp.targets) + [n for n in sp.rank_overrides if n not in per_layer]:
        if tgt not in SPECTRAL_TARGETS:
            raise UserError(f"model.spectral.targets: unknown target {tgt!r} (valid: {', '.join(SPECTRAL_TARGETS)})")
    if m.tie_embeddings and "lm_head" in sp.targets:
        raise UserError("model.spectral.targets: 'lm_head' cannot be spectral with model.tie_embeddings: true "
                        "(the head is the embedding; target 'embed' instead)")
    shapes = layer_shapes(m)
    for tgt in sp.targets:
        if m.vocab_size == 0 and tgt in ("lm_head", "embed"):
            continue
        rank, key = initial_rank(m, tgt)
        try:
            check_rank(rank, *shapes[tgt], key)
        except UserError as e:
            raise UserError(f"{e} (the {tgt} projection)") from None
    for name, tgt in per_layer.items():
        check_rank(sp.rank_overrides[name], *shapes[tgt], f"model.spectral.rank_overrides.{name}")


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express. Returns ``cfg``."""
    m, t, r, sp = cfg.model, cfg.train, cfg.rank, cfg.model.spectral
    check_model(m)
    for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                "checkpoint_interval", "max_bad_steps"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("lr", "spectral_lr", "core_lr", "eps"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("weight_decay", "spectral_weight_decay", "grad_clip", "warmup_steps", "threads"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise UserError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise UserError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if t.seq_len > m.max_seq_len:
        raise UserError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.lazy_tol is not None:
        _positive("train.lazy_tol", t.lazy_tol)
    if not re.fullmatch(r"all|none|auto|every:[1-9][0-9]*", t.layer_cards):
        raise UserError(f"train.layer_cards: expected all, none, auto or every:K with K ≥ 1, got {t.layer_cards!r}")
    _positive("train.retract_every", t.retract_every)
    if t.retract_every > 1 and t.lazy_tol is not None:
        raise UserError("train.retract_every and train.lazy_tol: choose one way of skipping retractions, not both")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction: must be in (0, 1), got {cfg.data.val_fraction}")
    if not 0.0 <= cfg.data.test_fraction < 1.0 - cfg.data.val_fraction:
        raise UserError(f"data.test_fraction: must be in [0, 1 - val_fraction), got {cfg.data.test_fraction}")
    if cfg.data.tokenizer == "byte" and cfg.data.tokenizer_file is not None:
        raise UserError("data.tokenizer_file: only used with data.tokenizer: bpe")
    if cfg.data.tokenizer == "bpe" and cfg.data.tokenizer_file is None and not 256 < cfg.data.vocab_size <= 1 << 20:
        raise UserError(f"data.vocab_size: a BPE vocabulary needs 256 < size ≤ 1048576, got {cfg.data.vocab_size}")
    _positive("data.max_bytes", cfg.data.max_bytes, allow_zero=True)
    if not cfg.data.corpus:
        raise UserError("data.corpus: empty; give 'stdlib' or text files/folders")
    check_energy(r.energy, "rank.energy")
    for key in ("grow_tail", "tail_fraction", "max_shrink", "hysteresis"):
        v = getattr(r, key)
        if not 0.0 <= v < 1.0:
            raise UserError(f"rank.{key}: must be in [0, 1), got {v}")
    if r.growth_factor <= 1.0:
        raise UserError(f"rank.growth_factor: must be > 1, got {r.growth_factor}")
    _positive("rank.min_rank", r.min_rank)
    if r.max_rank < r.min_rank:
        raise UserError(f"rank.max_rank: {r.max_rank} is below rank.min_rank={r.min_rank}")
    _positive("rank.interval", r.interval)
    _positive("rank.warmup_steps", r.warmup_steps, allow_zero=True)
    _positive("rank.budget_params", r.budget_params, allow_zero=True)
    for key in ("protect", "grow_init", "stop_step"):
        _positive(f"rank.{key}", getattr(r, key), allow_zero=True)
    _positive("rank.budget_growth", r.budget_growth)
    if r.budget_growth != 1.0 and r.stop_step <= r.warmup_steps:
        raise UserError(f"rank.stop_step: a budget ramp (budget_growth {r.budget_growth}) needs stop_step > "
                        f"rank.warmup_steps={r.warmup_steps}, got {r.stop_step}")
    if r.score == "fisher" and r.policy != "budget":
        raise UserError(f"rank.score: 'fisher' ranks directions for the budget policy; rank.policy is {r.policy!r}")
    if r.policy != "static" and not sp.targets:
        raise UserError(f"rank.policy: {r.policy!r} needs spectral layers, but model.spectral.targets is empty")
    if cfg.engine.kind == "deepspeed" and not cfg.engine.deepspeed_config:
        raise UserError("engine.deepspeed_config: required when engine.kind is 'deepspeed'")
    _positive("engine.timeout_s", cfg.engine.timeout_s)
    return cfg


def layer_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """``target -> (out, in)`` of each projection kind (``embed`` as ``(vocab, dim)``)."""
    head_dim = m.dim // m.n_heads
    return {
        "q": (m.n_heads * head_dim, m.dim),
        "k": (m.n_kv_heads * head_dim, m.dim),
        "v": (m.n_kv_heads * head_dim, m.dim),
        "o": (m.dim, m.n_heads * head_dim),
        "gate": (m.ffn_dim, m.dim),
        "up": (m.ffn_dim, m.dim),
        "down": (m.dim, m.ffn_dim),
        "lm_head": (m.vocab_size, m.dim),
        "embed": (m.vocab_size, m.dim),
    }


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.strip().split("."), value


# mappings whose keys may hold dots: in ``--set`` the rest of the path after them is one key
# (``model.spectral.rank_overrides.layers.2.attn.q=5``)
DOTTED_KEY_MAPPINGS = (("model", "spectral", "rank_overrides"),)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        path, value = _parse_override(item)
        for mapping in DOTTED_KEY_MAPPINGS:
            if tuple(path[:len(mapping)]) == mapping and len(path) > len(mapping) + 1:
                path = list(mapping) + [".".join(path[len(mapping):])]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def _check_mapping(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"config: expected a mapping at the top level, got {type(raw).__name__}")


def config_from_dict(raw: dict) -> Config:
    """A validated ``Config`` from a raw mapping (keys left out take their defaults)."""
    _check_mapping({} if raw is None else raw)
    return validate(_build(Config, raw or {}))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override and validate a YAML config — with its DeepSpeed JSON, when it names one. Errors name
    the file and the key.

    A config file must state its model: an empty file (or one holding only comments) and a file
    without a ``model`` section (after ``overrides``) are refused rather than run on built-in defaults."""
    path = Path(path)
    raw = read_document(path, "YAML", f"config file not found: {path}")
    try:
        if raw is None:
            raise UserError("the config is empty (nothing but comments or blank lines); "
                            "start from one in configs/, e.g. configs/tiny-cpu.yaml")
        _check_mapping(raw)
        raw = apply_overrides(raw, list(overrides))
        if "model" not in raw:
            raise UserError("no 'model' section: a config states the model it trains "
                            "(see configs/tiny-cpu.yaml); built-in defaults are not used in its place")
        cfg = config_from_dict(raw)
        if cfg.engine.kind == "deepspeed":  # the JSON too (splitting the batch over ranks is checked at launch)
            from tsvd.engine.ds_config import resolve_ds_config

            resolve_ds_config(cfg, world_size=1)
        return cfg
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
