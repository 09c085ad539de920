"""The rank overview of a run: spectral layers as a grid of blocks (rows) × projection types (columns),
per-type aggregates, the TensorBoard custom-scalars layout and the rank decision as a table.

Layer names are read generically: the first all-digit component is the block (``layers.12.attn.q`` →
block 12), the last component is the projection type (``q``; ``q_proj`` in a converted HF model).
A layer without a block index (``tok_emb``, ``lm_head``) gets a row of its own, named after it.

Pure functions over plain data: ``{layer: rank}``, ``{layer: (m, n)}`` (rows of ``U``, rows of ``V``:
the dense matrix is ``m × n``), ``{layer: stat}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

MAX_CARD_BLOCKS = 8  # layer_cards: auto keeps per-layer cards for about this many blocks


@dataclass(frozen=True)
class LayerGrid:
    """``rows`` (block indices as text, then the names of layers outside blocks), ``types`` (columns, in
    order of first appearance) and ``cell[layer] = (row, column)``."""

    rows: list[str]
    types: list[str]
    cell: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, layers: Sequence[str]) -> "LayerGrid":
        placed = {name: (block_of(name), type_of(name)) for name in layers}
        blocks = sorted({b for b, _ in placed.values() if b is not None})
        rows = [str(b) for b in blocks] + [name for name, (b, _) in placed.items() if b is None]
        types = list(dict.fromkeys(t for _, t in placed.values()))
        index = {r: i for i, r in enumerate(rows)}
        cell = {name: (index[str(b) if b is not None else name], types.index(t)) for name, (b, t) in placed.items()}
        return cls(rows, types, cell)

    def layers_of(self, type_: str) -> list[str]:
        return [name for name, (_, j) in self.cell.items() if self.types[j] == type_]


def block_of(layer: str) -> int | None:
    """The block index of ``layer`` (its first all-digit name component), ``None`` outside blocks."""
    for part in layer.split("."):
        if part.isdigit():
            return int(part)
    return None


def type_of(layer: str) -> str:
    return layer.rsplit(".", 1)[-1]


def card_layers(layers: Sequence[str], spec: str) -> list[str]:
    """The layers that get per-layer cards under ``train.layer_cards``: ``all``, ``none``, ``every:K``
    (blocks 0, K, 2K, … and the last block; layers outside blocks always) or ``auto`` (``every:K`` with
    the smallest K that keeps at most ``MAX_CARD_BLOCKS`` + 1 blocks)."""
    if spec == "all":
        return list(layers)
    if spec == "none":
        return []
    blocks = sorted({b for b in map(block_of, layers) if b is not None})
    k = int(spec.split(":")[1]) if spec.startswith("every:") else max(1, math.ceil(len(blocks) / MAX_CARD_BLOCKS))
    keep = {b for i, b in enumerate(blocks) if i % k == 0} | set(blocks[-1:])
    return [name for name in layers if block_of(name) is None or block_of(name) in keep]


def dense_params(dims: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    return {name: m * n for name, (m, n) in dims.items()}


def factor_params(ranks: Mapping[str, int], dims: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Parameters of ``U`` (m×r), ``s`` (r) and ``V`` (n×r) per layer."""
    return {name: r * (dims[name][0] + dims[name][1] + 1) for name, r in ranks.items()}


def aggregates(ranks: Mapping[str, int], dims: Mapping[str, tuple[int, int]], kept: Mapping[str, float],
               other_params: int) -> dict[str, float]:
    """Per projection type ``rank/<t>/mean|min|max``, ``params/<t>/ratio`` (factor parameters over the
    dense ``m·n``) and ``energy/<t>/mean`` (mean of ``kept``); ``params/ratio`` for the whole model:
    ``(other + Σ factors) / (other + Σ dense)``, ``other_params`` being everything not spectral."""
    grid = LayerGrid.of(list(ranks))
    factors, dense = factor_params(ranks, dims), dense_params(dims)
    out: dict[str, float] = {}
    for t in grid.types:
        names = grid.layers_of(t)
        r = [ranks[n] for n in names]
        out[f"rank/{t}/mean"] = sum(r) / len(r)
        out[f"rank/{t}/min"] = float(min(r))
        out[f"rank/{t}/max"] = float(max(r))
        out[f"params/{t}/ratio"] = sum(factors[n] for n in names) / sum(dense[n] for n in names)
        if all(n in kept for n in names):
            out[f"energy/{t}/mean"] = sum(kept[n] for n in names) / len(names)
    out["params/ratio"] = (other_params + sum(factors.values())) / (other_params + sum(dense[n] for n in ranks))
    return out


def custom_layout(layers: Sequence[str]) -> dict:
    """``SummaryWriter.add_custom_scalars`` layout: one category of model-wide charts, then one per
    projection type of ``layers`` with the type's aggregates and, as lines of one chart, the rank of
    every layer of the type that has per-layer cards (``train.layer_cards``)."""
    model = {
        "loss": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "learning rate": ["Multiline", ["^train/lr$", "^train/spectral_lr$"]],
        "parameters / dense": ["Multiline", ["^params/ratio$"]],
        "retraction time (s, share of the step)": ["Multiline", ["^perf/retraction_s$", "^perf/retraction_share$"]],
    }
    layout = {"model": model}
    for t in LayerGrid.of(layers).types:
        q = re.escape(t)
        layout[f"type {t}"] = {
            f"{t}: rank of every layer": ["Multiline", [rf"^spectral/rank/(.*\.)?{q}$"]],
            f"{t}: rank mean, min, max": ["Multiline", [f"^rank/{q}/(mean|min|max)$"]],
            f"{t}: parameters / dense": ["Multiline", [f"^params/{q}/ratio$"]],
            f"{t}: energy kept without the tail": ["Multiline", [f"^energy/{q}/mean$"]],
        }
    return layout


def decision_table(step: int, changes: Sequence, signals: Mapping[str, str]) -> str:
    """Markdown: the layers whose rank changed at ``step``, ``old → new``, and the signal behind each.
    ``changes``: objects or mappings with ``layer``, ``old``, ``new`` (and optionally ``reason``);
    ``signals[layer]``: what the spectra said at the decision, used when a change carries no reason."""
    rows = [f"**rank decision at step {step}**: {len(changes)} layer(s) changed", "",
            "| layer | rank | signal |", "|---|---|---|"]
    for c in changes:
        get = c.get if isinstance(c, Mapping) else (lambda key, c=c: getattr(c, key, None))
        why = get("reason") or signals.get(get("layer"), "")
        rows.append(f"| {get('layer')} | {get('old')} → {get('new')} | {why} |")
    return "\n".join(rows)


def spectral_signals(stats: Mapping[str, Mapping[str, float]], policy: str, energy: float,
                     grow_tail: float) -> dict[str, str]:
    """What each layer's spectrum said at a decision (``tsvd.metrics.layer_stats``), in words: the tail
    share (the energy policy grows a layer above ``grow_tail``) and how many directions hold ``energy``
    of ``Σ sᵢ²`` (it shrinks towards that); the budget policy pools every layer's spectrum."""
    lead = "budget allocation over pooled spectra; " if policy == "budget" else ""
    return {layer: f"{lead}tail share {st['tail_share']:.3f} (grow above {grow_tail:g}); "
                   f"{energy:g} of Σs² in {int(st['rank_at_tau'])} directions" for layer, st in stats.items()}
