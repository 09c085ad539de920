"""Master weights: the fp32 values DeepSpeed's optimizer updates, read and written as full tensors.

With DeepSpeed's native mixed precision (the JSON's ``bf16`` or ``fp16`` section) the model's
parameters are 16-bit working copies and the optimizer keeps fp32 *master* weights; after each step
the working copy is the master rounded. In fp32 the masters are the parameters themselves (stage 0) or
fp32 copies that the working parameters equal exactly (ZeRO 1–3). Everything that reads or sets the
value of a parameter — the retraction, the non-finite checks, spectra, the gradient sketch, rank
changes — goes through ``MasterWeights``, and every write also sets the working copy to the rounded
master, as the optimizer does: the retraction acts on fp32 values, and the 16-bit weights are the
rounding of the retracted master.

Where this rank's ``Piece`` of each master lives (its offset in the flattened full value and a flat
fp32 view into the optimizer's storage, so that writes land in the master):

======================  ===============================================  ========================================
stage                   masters                                          this rank's piece
======================  ===============================================  ========================================
0, fp32                 the parameters                                   all of ``p``
0, bf16/fp16            ``FP16_UnfusedOptimizer.fp32_groups``             all of the master
1, 2                    ``single_partition_of_fp32_groups`` (flat,       the fragment ``p._hp_mapping`` names
                        one partition per group and rank)                (none when the partition misses ``p``)
3                       ``fp32_partitioned_groups_flat``                 ``[rank·n, rank·n + n)`` of the
                                                                         zero-padded value, padding left out
======================  ===============================================  ========================================

Every element has exactly one holder among the ranks (stages 1–3), so a sum over ranks of zero buffers
holding each rank's pieces is the full value (``full``). DeepSpeed 0.19.8's ``safe_get_full_fp32_param``
does the same one parameter at a time (one collective each) and returns nothing at stage 0;
``safe_set_full_fp32_param`` writes the master only, leaving the 16-bit copy stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_get_local_fp32_param
from torch import Tensor, nn

from tsvd.engine.zero_params import GATHER_BYTES, chunks_by_bytes, full_numel, full_shape, zero3_partition


@dataclass(frozen=True)
class Piece:
    """This rank's part of one master: ``values`` (flat fp32 view into the optimizer's storage, detached:
    in-place writes land in the master) holds elements ``start … start + len(values)`` of the flattened
    full value."""

    start: int
    values: Tensor


class MasterWeights:
    """The fp32 masters of the parameters of one DeepSpeed engine (rebuilt with the engine).

    ``low_precision``: the working parameters are ``param_dtype`` (bf16/fp16) copies. ``whole``: every
    rank holds every master whole (stage 0). Full values of fp32 masters at stages 0–2 are the live
    tensors (no copy, no communication); otherwise they are assembled (collective).
    """

    def __init__(self, optimizer, stage: int, param_dtype: torch.dtype, device: torch.device) -> None:
        self.optimizer, self.stage, self.param_dtype, self.device = optimizer, stage, param_dtype, device
        self.low_precision = param_dtype != torch.float32
        self.whole = stage == 0
        #: Full values can be read from the working parameters (exact fp32, held whole by every rank).
        self.exact_working = not self.low_precision and stage < 3
        self._stage0: dict[int, Tensor] = {}
        if stage == 0 and self.low_precision:
            for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                self._stage0.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})

    # ---- one parameter -------------------------------------------------------------------

    def master(self, p: nn.Parameter) -> Tensor:
        """Stage 0: the tensor AdamW updates for ``p`` (``p`` itself in fp32; its state is keyed by it)."""
        assert self.stage == 0, "ZeRO 1–3 keep masters in flat partitions: use piece()"
        return self._stage0.get(id(p), p)

    def piece(self, p: nn.Parameter) -> Piece | None:
        """This rank's piece of ``p``'s master (module docstring), or ``None`` when it holds none."""
        if self.stage == 0:
            return Piece(0, self.master(p).data.view(-1))
        if self.stage in (1, 2):
            mapping = p._hp_mapping
            return None if mapping is None else Piece(mapping.lp_fragment_address.start, mapping.get_hp_fragment().detach())
        start, count = zero3_partition(p)
        return Piece(start, safe_get_local_fp32_param(p).detach().view(-1).narrow(0, 0, count)) if count else None

    def local(self, p: nn.Parameter) -> Tensor:
        """What this rank can check of ``p``'s master without communication: all of it where it holds it
        (``whole``, ``exact_working``), else its piece (possibly empty). See ``partitioned``."""
        if self.exact_working:
            return p.data
        piece = self.piece(p)
        return piece.values if piece is not None else torch.empty(0, device=self.device)

    @property
    def partitioned(self) -> bool:
        """``local`` sees only this rank's part: a verdict about all of a master needs every rank's."""
        return not (self.whole or self.exact_working)

    @torch.no_grad()
    def write_(self, p: nn.Parameter, value: Tensor) -> None:
        """Set ``p``'s master to ``value`` (full, fp32, the same on every rank) and its working copy to
        the rounding of it. Every rank calls it; no communication. ``value`` may be a tensor ``full``
        returned (the live master or parameter)."""
        flat = value.reshape(-1)
        piece = self.piece(p)
        if piece is not None:
            _copy_(piece.values, flat.narrow(0, piece.start, piece.values.numel()))
        if self.stage < 3:
            _copy_(p.data, value.view(p.shape))
            return
        start, count = zero3_partition(p)
        p.ds_tensor.view(-1).narrow(0, 0, count).copy_(flat.narrow(0, start, count))
        if p.data.numel() == full_numel(p):  # also held whole (a persistent parameter, once gathered)
            p.data.copy_(value.view(full_shape(p)))

    # ---- many parameters -------------------------------------------------------------------

    def chunks(self, named: list[tuple[str, nn.Parameter]]) -> Iterator[list[tuple[str, nn.Parameter]]]:
        """Consecutive groups of ``named`` whose fp32 masters take at most ``GATHER_BYTES`` each (what one
        ``full`` call assembles at once)."""
        return chunks_by_bytes(named, GATHER_BYTES * self.param_dtype.itemsize // 4)

    @torch.no_grad()
    def full(self, params: list[nn.Parameter], dst: int | None = None) -> list[Tensor]:
        """The full fp32 masters of ``params`` (shaped like the parameters), on every rank (``dst=None``)
        or on rank ``dst`` only (the others get scratch). Collective at stages 1–3 unless
        ``exact_working``: all ranks call it with the same ``params``. Where a rank holds the masters
        (``whole``, ``exact_working``) they are the live tensors: write them back only through ``write_``."""
        if self.whole:
            return [self.master(p).data.view(full_shape(p)) for p in params]
        if self.exact_working:
            return [p.data for p in params]
        sizes = [full_numel(p) for p in params]
        buf = torch.zeros(sum(sizes), dtype=torch.float32, device=self.device)
        views = buf.split(sizes)
        for p, view in zip(params, views):
            piece = self.piece(p)
            if piece is not None:
                view.narrow(0, piece.start, piece.values.numel()).copy_(piece.values)
        if dist.get_world_size() > 1:
            if dst is None:
                dist.all_reduce(buf)
            else:
                dist.reduce(buf, dst)
        return [v.view(full_shape(p)) for p, v in zip(params, views)]


def _copy_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``, skipped when both are the same memory (a live master written back)."""
    if dst.data_ptr() != src.data_ptr() or dst.dtype != src.dtype:
        dst.copy_(src)
