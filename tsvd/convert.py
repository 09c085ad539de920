"""``spectralize``: one-line conversion of any ``nn.Module``'s ``nn.Linear`` layers to spectral layers."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from tsvd.errors import UserError
from tsvd.spectral import INITS, SpectralLinear, check_rank
from tsvd.spectrum import check_energy


@dataclass(frozen=True)
class LayerReport:
    """One converted layer: ``retained_energy`` is ``Σ kept sᵢ² / ‖W‖_F²`` (1.0 for fresh layers)."""

    name: str
    in_features: int
    out_features: int
    rank: int
    retained_energy: float

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def spectral_params(self) -> int:
        return self.rank * (self.in_features + self.out_features + 1)

    @property
    def compression(self) -> float:
        return self.dense_params / self.spectral_params


def format_report(rows: Sequence[LayerReport]) -> str:
    """A fixed-width table of a conversion report, with a total line."""
    lines = [f"{'layer':<40} {'shape':>13} {'rank':>6} {'energy':>8} {'compress':>9}"]
    for r in rows:
        lines.append(f"{r.name:<40} {f'{r.out_features}x{r.in_features}':>13} {r.rank:>6} "
                     f"{r.retained_energy:>8.4f} {r.compression:>8.1f}x")
    dense, spec = sum(r.dense_params for r in rows), sum(r.spectral_params for r in rows)
    if rows:
        lines.append(f"{'total':<40} {'':>13} {'':>6} {'':>8} {dense / spec:>8.1f}x  "
                     f"({dense:,} -> {spec:,} params)")
    return "\n".join(lines)


def matches_glob(name: str, patterns: Sequence[str]) -> bool:
    """Does the module name match one of the globs (``fnmatch``, case-sensitive)? The rule of ``targets``
    and ``exclude``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def spectralize(
    model: nn.Module,
    targets: Sequence[str] | str = ("*",),
    rank: int | None = None,
    energy: float | None = None,
    init: str | None = None,
    exclude: Sequence[str] | str = (),
) -> list[LayerReport]:
    """Replace every ``nn.Linear`` whose qualified name matches a glob in ``targets`` (and none in
    ``exclude``) by a ``SpectralLinear``, in place; returns a per-layer report.

    ``init=None`` converts the existing (pretrained) weights by truncated SVD at a fixed ``rank``
    (capped at ``min(in, out)``) or at the smallest rank retaining ``energy`` of ``Σ sᵢ²``.
    ``init="scaled"`` / ``"sct"`` builds fresh spectral layers at ``rank`` instead. Models on the
    ``meta`` device get fresh meta layers (sizing without allocation; needs ``rank``).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if (rank is None) == (energy is None):
        raise UserError("spectralize: give exactly one of rank= or energy=")
    if energy is not None:
        check_energy(energy)
        if init is not None:
            raise UserError("spectralize: energy= chooses ranks from existing weights; it cannot be combined with init=")
    if init is not None and init not in INITS:
        raise UserError(f"spectralize: init must be one of {INITS} or None, got {init!r}")

    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and matches_glob(n, targets) and not matches_glob(n, exclude)]
    if any(name == "" for name, _ in chosen):
        raise UserError("spectralize: the model itself is an nn.Linear and cannot be replaced in place; "
                        "use SpectralLinear.from_linear(layer, ...) instead")
    report: list[LayerReport] = []
    for name, lin in chosen:
        out_f, in_f = lin.weight.shape
        meta = lin.weight.device.type == "meta"
        if meta and energy is not None:
            raise UserError(f"spectralize: {name} is on the meta device; energy= needs real weights, use rank=")
        if init is not None or meta:
            k = check_rank(rank, in_f, out_f, f"rank for {name}")
            new = SpectralLinear(in_f, out_f, k, bias=lin.bias is not None, init=init or "scaled",
                                 device=lin.weight.device, dtype=lin.weight.dtype)
            kept = 1.0
        else:
            k = None if rank is None else min(rank, in_f, out_f)
            new = SpectralLinear.from_linear(lin, rank=k, energy=energy)
            total = float(lin.weight.detach().double().square().sum())
            kept = 1.0 if total == 0.0 else float(new.s.detach().double().square().sum()) / total
        _set_submodule(model, name, new)
        report.append(LayerReport(name, in_f, out_f, new.rank, kept))
    if not report:
        raise UserError(f"spectralize: no nn.Linear matches targets={targets} (exclude={exclude})")
    return report


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def densify(model: nn.Module) -> int:
    """Replace every ``SpectralLinear`` by its dense ``nn.Linear`` in place (export only); returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear())
    return len(names)
