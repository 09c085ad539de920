"""tsvd.hf.finetune: fine-tuning a converted model takes TorchEngine's training step (guards included)."""

from __future__ import annotations

import math

import pytest
import torch
from hf_common import converted, hf_dir, tiny_language  # noqa: F401  (fixtures)

from tsvd.config import TrainConfig
from tsvd.hf.conversion import load_converted
from tsvd.hf.factors import FACTORS_FILE, save_factors
from tsvd.hf.finetune import FineTuner, finetune, perplexity, sample_batch
from tsvd.spectral import SpectralLinear
from tsvd.stiefel import drift, gram


def max_drift(model: torch.nn.Module) -> float:
    return max(float(drift(gram(A.detach().double()))) for m in model.modules() if isinstance(m, SpectralLinear)
               for A in m.factors())


def test_finetune_converted_model_retracts(converted):  # noqa: F811
    out, _ = converted
    model, _ = load_converted(out)
    data = tiny_language()
    before, _ = perplexity(model, data, seq_len=16, max_windows=8)
    train = TrainConfig(steps=12, batch_size=4, seq_len=16, lr=3e-3, spectral_lr=3e-3, core_lr=3e-3,
                        warmup_steps=2, weight_decay=0.0)
    result = finetune(model, data, train, seed=0)
    after, n = perplexity(model, data, seq_len=16, max_windows=8)
    assert len(result.losses) == 12 and n == 8 * 16 and result.skipped == []
    assert after < before - 0.5
    assert max_drift(model) < 1e-4


def test_amortized_finetune_hands_back_exactly_orthonormal_factors(converted, tmp_path):  # noqa: F811
    """With ``train.retract_every=4`` the last steps leave factors off the manifold (checked on a
    ``FineTuner`` run of the same steps); ``finetune`` retracts them all before it returns, so the
    saved factors are exactly orthonormal. Tolerance: the factors are fp32, where a Cholesky-QR
    retraction leaves ~1e-6 (test_stiefel.py) and 1e-5 is the repair threshold (``repair_tolerance``)."""
    from safetensors.torch import load_file

    out, _ = converted
    data = tiny_language()
    train = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=3e-3, spectral_lr=3e-3, core_lr=3e-3,
                        warmup_steps=0, weight_decay=0.0, retract_every=4)
    model, _ = load_converted(out)
    tuner, gen = FineTuner(model, train), torch.Generator().manual_seed(0)
    for _ in range(train.steps):
        tuner.step([sample_batch(data, train.batch_size, train.seq_len, gen)])
    assert tuner.engine.retractor.stale() and max_drift(model) > 1e-3  # left for later by the schedule

    model, _ = load_converted(out)
    result = finetune(model, data, train, seed=0)
    assert len(result.losses) == 6 and not model.training
    saved = load_file(str(save_factors(model, tmp_path / "tuned") / FACTORS_FILE))
    factors = [t for n, t in saved.items() if n.endswith((".U", ".V"))]
    assert factors and all(t.dtype == torch.float32 for t in factors)
    assert max(float(drift(gram(t.double()))) for t in factors) <= 1e-5


@pytest.mark.parametrize("poison", ["U", "s"])
def test_non_finite_gradient_skips_the_step_without_retracting(converted, poison):  # noqa: F811
    """A NaN gradient (on a factor or on a core) skips the step: no AdamW update and no retraction, so
    every parameter and the optimizer state stay bitwise as they were; the next step trains and retracts."""
    out, _ = converted
    model, _ = load_converted(out)
    data = tiny_language()
    tuner = FineTuner(model, TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=0, weight_decay=0.0))
    gen = torch.Generator().manual_seed(0)
    tuner.step([sample_batch(data, 2, 16, gen)])  # AdamW state exists from here on
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():  # off the manifold: any retraction would move U
        layer.U.add_(1e-3 * torch.randn(layer.U.shape, generator=torch.Generator().manual_seed(1)))
    assert max_drift(model) > 1e-4
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in tuner.engine.optimizer.state_dict()["state"].items()}

    hook = getattr(layer, poison).register_hook(lambda g: torch.full_like(g, math.nan))
    loss, retraction_s, _ = tuner.step([sample_batch(data, 2, 16, gen)])
    hook.remove()
    assert tuner.skipped == [2] and math.isfinite(loss) and retraction_s == 0.0
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    after = tuner.engine.optimizer.state_dict()["state"]
    assert after.keys() == state.keys()
    assert all(torch.equal(after[i][k], v) for i, s in state.items() for k, v in s.items())

    tuner.step([sample_batch(data, 2, 16, gen)])
    assert tuner.skipped == [2] and not torch.equal(layer.U, params["model.layers.0.mlp.up_proj.U"])
    assert max_drift(model) < 1e-4


def test_non_finite_core_update_is_discarded(converted):  # noqa: F811
    """The engine's core guard also covers fine-tuning: an update that makes an s non-finite is undone
    (s keeps its value), the step counts as skipped, and the factors are still retracted."""
    out, _ = converted
    model, _ = load_converted(out)
    data = tiny_language()
    tuner = FineTuner(model, TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0, weight_decay=0.0))
    layer = model.model.layers[1].self_attn.v_proj
    s_before = layer.s.detach().clone()
    opt = tuner.engine.optimizer
    step = opt.step

    def poisoned_step(*args, **kwargs):
        result = step(*args, **kwargs)
        with torch.no_grad():
            layer.s[0] = math.inf
        return result

    opt.step = poisoned_step
    tuner.step([sample_batch(data, 2, 16, torch.Generator().manual_seed(0))])
    assert tuner.skipped == [1] and torch.equal(layer.s, s_before)
    assert max_drift(model) < 1e-4
