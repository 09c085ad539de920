"""Optimizer + retraction correctness: fused AdamW equals the reference AdamW, and retraction after the
step keeps every factor orthonormal (``StepInBackward``, a benchmark helper: tests/test_step_in_backward.py).

Tolerances: fused and for-loop AdamW evaluate the same per-element formula in fp32 but in a different
order (the fused kernel uses FMA and folds the bias corrections differently), so they agree to a few
ulp per step; 1e-6 absolute on O(0.1–1) parameters after 5 steps at lr 1e-2 leaves ~10× headroom.
Orthonormality after a fp32 retraction is ~1e-6 (tests/test_stiefel.py): 1e-5 is the contract.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tsvd.config import ModelConfig, SpectralConfig, TrainConfig
from tsvd.model import build_model
from tsvd.optim import build_adamw, param_groups
from tsvd.retraction import Retractor, spectral_factors
from tsvd.stiefel import (
    MAX_CHOLESKY_DRIFT,
    REFINE_DRIFT,
    drift,
    gram,
    householder_qr,
    orthonormality_error,
    orthonormalize,
    orthonormalize_each,
)

TOL = 1e-5
ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"]


def spectral_model(seed: int = 0) -> nn.Module:
    """A two-layer Llama-style decoder with every projection, the embedding and the head spectral."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16,
                      tie_embeddings=False, spectral=SpectralConfig(targets=ALL_TARGETS, rank=6))
    return build_model(cfg)


def train_cfg(lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(lr=lr, spectral_lr=lr, core_lr=lr, weight_decay=0.1, betas=[0.9, 0.95])


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2, 9), generator=g)
    return ids[:, :-1], ids[:, 1:]


def backward(model: nn.Module, seed: int) -> None:
    x, y = batch(seed)
    model(x, y)[1].backward()


def max_ortho(model: nn.Module) -> float:
    return max(float(orthonormality_error(p.detach())) for p in spectral_factors(model).values())


def test_build_adamw_is_fused_and_updates_in_place():
    model = spectral_model()
    opt = build_adamw(model, train_cfg(), "cpu")
    assert opt.defaults["fused"] is True and all(g["fused"] for g in opt.param_groups)
    assert {g["name"] for g in opt.param_groups} == {"factors", "cores", "no_decay"}
    ptrs = {id(p): p.data_ptr() for p in model.parameters()}
    backward(model, 0)
    opt.step()
    state_ptrs = {id(p): (opt.state[p]["exp_avg"].data_ptr(), opt.state[p]["exp_avg_sq"].data_ptr())
                  for p in model.parameters()}
    for seed in (1, 2):
        opt.zero_grad(set_to_none=True)
        backward(model, seed)
        opt.step()
    for p in model.parameters():  # parameters and moments keep their storage: updated in place
        assert p.data_ptr() == ptrs[id(p)]
        assert (opt.state[p]["exp_avg"].data_ptr(), opt.state[p]["exp_avg_sq"].data_ptr()) == state_ptrs[id(p)]


def test_fused_adamw_matches_reference_for_loop_adamw_on_a_spectral_model():
    t = train_cfg(1e-2)
    fused_model = spectral_model(1)
    ref_model = copy.deepcopy(fused_model)
    fused = build_adamw(fused_model, t, "cpu")
    ref = torch.optim.AdamW(param_groups(ref_model, t), betas=tuple(t.betas), eps=t.eps, foreach=False, fused=False)
    for step in range(5):
        for model, opt in ((fused_model, fused), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            backward(model, step)
            opt.step()
        for (name, a), b in zip(fused_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6, msg=f"{name} at step {step}")
    for a, b in zip(fused_model.parameters(), ref_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[a][key], ref.state[b][key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_retraction_after_each_optimizer_step_keeps_factors_orthonormal(lr):
    model = spectral_model(2)
    opt = build_adamw(model, train_cfg(lr), "cpu")
    retractor = Retractor(model)
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        backward(model, step)
        opt.step()
        assert max_ortho(model) > 1e-4  # the step really left the manifold
        report = retractor(measure_error=True)
        assert max_ortho(model) <= TOL
        assert len(report.retracted) == len(spectral_factors(model))
        assert max(c.error for c in retractor.cache.values()) <= TOL
        assert all(p.is_contiguous() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the retraction paths by drift (tsvd.stiefel), and the list routine's contract


def drifted(m: int, r: int, target: float, seed: int) -> torch.Tensor:
    """An orthonormal matrix whose first column is scaled so that ``‖AᵀA − I‖_F ≈ target``."""
    g = torch.Generator().manual_seed(seed)
    A = householder_qr(torch.randn(m, r, generator=g))[0]
    A[:, 0] *= (1.0 - target) ** 0.5
    return A + 1e-4 * torch.randn(m, r, generator=g).sign()


@pytest.mark.parametrize("target", [1e-3, 0.3, 0.7])
def test_one_or_two_cholesky_passes_by_drift_match_householder(target):
    A = drifted(400, 8, target, seed=int(target * 1e3))
    d = float(drift(gram(A)))
    assert (d <= REFINE_DRIFT) == (target < 0.5) and d <= MAX_CHOLESKY_DRIFT
    Q, info = orthonormalize(A)
    assert not bool(info.householder)
    assert float(orthonormality_error(Q)) <= TOL
    torch.testing.assert_close(Q, householder_qr(A)[0], rtol=0, atol=TOL)


def test_orthonormalize_each_reuses_one_buffer_and_never_stacks():
    As = [drifted(300, 6, 0.05, seed=i) for i in range(5)]
    seen: list[tuple[int, torch.Tensor]] = []
    info = orthonormalize_each(As, "cholesky", None, lambda i, Q: seen.append((Q.data_ptr(), Q.clone())))
    assert len({ptr for ptr, _ in seen}) == 1  # one scratch buffer for the whole list: the caller copies
    for A, (_, Q) in zip(As, seen):
        torch.testing.assert_close(Q, orthonormalize(A)[0], rtol=0, atol=0)
        assert float(orthonormality_error(Q)) <= TOL
    assert info.drift.shape == (5,) and not bool(info.householder.any())


def test_orthonormalize_each_falls_back_for_nan_and_far_drift():
    good, far = drifted(200, 4, 0.01, 0), 3.0 * drifted(200, 4, 0.01, 1)
    bad = good.clone()
    bad[0, 0] = float("nan")
    out: dict[int, torch.Tensor] = {}
    info = orthonormalize_each([good, far, bad], "cholesky", None, lambda i, Q: out.__setitem__(i, Q.clone()))
    assert info.householder.tolist() == [False, True, True]
    assert float(orthonormality_error(out[1])) <= TOL
    torch.testing.assert_close(out[1], householder_qr(far)[0], rtol=0, atol=0)
