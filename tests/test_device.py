"""tsvd.engine.device: train.device resolution, bad values as one-line errors, and a CPU path that makes
no CUDA call (each CUDA entry point is replaced by one that fails the test)."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from conftest import tiny_raw
from tsvd.cli import main
from tsvd.config import apply_overrides
from tsvd.engine.device import Stopwatch, cuda_memory_stats, exact_fp32_matmul, resolve_device, set_tf32
from tsvd.engine.torch_engine import TorchEngine
from tsvd.errors import UserError
from tsvd.metrics import memory_stats, read_jsonl
from tsvd.model import build_model

CUDA_ENTRY_POINTS = ("synchronize", "is_available", "device_count", "max_memory_allocated",
                     "max_memory_reserved", "memory_stats", "current_device", "set_device", "Event")


@pytest.fixture
def no_cuda_calls(monkeypatch):
    """Every CUDA entry point tsvd could reach fails the test when called; TF32 flags must not change."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.cuda.{name} called on the CPU path")
        return call

    for name in CUDA_ENTRY_POINTS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_device_names_resolve(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("name", ["banana", "gpu", "cuda:x", "CPU", "cuda:", ""])
def test_malformed_device_is_a_user_error(name):
    with pytest.raises(UserError, match=r"train.device: .* is not a device; expected auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cuda_without_cuda_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        resolve_device("cuda")
    assert "train.device: 'cuda' is not usable here" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"'cuda:1' is not usable here: this machine has 1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("override,expected", [
    ("train.device=cuda", "train.device: 'cuda' is not usable here"),
    ("train.device=tpu", "train.device: 'tpu' is not a device"),
    ("train.tf32=sometimes", "train.tf32: expected true/false"),
])
def test_cli_bad_device_settings_are_one_line_exit_2(tmp_path, capsys, override, expected):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(apply_overrides(tiny_raw(tmp_path), [override])))
    code = main(["train", str(config), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_cpu_training_makes_no_cuda_call(tiny_config, no_cuda_calls):
    """A CPU step (TF32 asked for: meaningless on the CPU, so ignored), a full retraction and the memory
    record: no synchronisation, no CUDA query; the engine still reports forward/backward and retraction
    times, and the memory record has no CUDA keys."""
    cfg = tiny_config("train.tf32=true", "train.retract_every=2", "model.vocab_size=256")
    engine = TorchEngine(cfg, build_model(cfg.model))
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randint(256, (2, 8), generator=g), torch.randint(256, (2, 8), generator=g))]
    for _ in range(2):
        result = engine.train_step(batch, 1.0, measure=True)
    assert not result.skipped
    assert set(engine.timings) == {"perf/forward_backward_s"} and engine.timings["perf/forward_backward_s"] > 0
    assert result.retraction.seconds > 0
    engine.retract_all(measure=True)
    assert not any("device" in key for key in memory_stats())


def test_cpu_helpers_are_plain(no_cuda_calls):
    cpu = torch.device("cpu")
    set_tf32(cpu, True)  # flags untouched (checked by the fixture)
    with exact_fp32_matmul(cpu), Stopwatch(cpu) as clock:
        time.sleep(0.01)
    assert not clock.cuda and clock.seconds >= 0.01


def test_cuda_memory_stats_need_cuda_to_have_been_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: pytest.fail("queried CUDA"))
    assert cuda_memory_stats() == {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4 * 2**30)
    assert cuda_memory_stats() == {"memory/device_max_allocated_gb": 3.0, "memory/device_max_reserved_gb": 4.0}
    assert memory_stats()["memory/device_max_reserved_gb"] == 4.0


def test_training_log_has_forward_backward_time(tmp_path, no_cuda_calls):
    raw = apply_overrides(tiny_raw(tmp_path), ["train.steps=4", "train.log_interval=2", "train.eval_interval=4",
                                               "train.checkpoint_interval=4"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--no-progress"]) == 0
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "perf/step_s" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(0 < r["perf/forward_backward_s"] < r["perf/step_s"] for r in logged)
