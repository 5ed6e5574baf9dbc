"""Analytic FLOPs of a transformer described by :mod:`comp_vlm.structure` (method.md §1, FLOPs convention).

FLOPs = 2 x MACs of matmuls and convolutions only (the convention of ``torch.utils.flop_counter``), per sample.
A token site at layer l sits between the attention and the MLP of that layer, so the layer's own MLP already
runs on the kept tokens. A model's FLOPs are those of all its towers together (:func:`model_flops`): its
couplings carry the tokens one tower keeps into the towers it feeds. Pure functions: no model, no weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .structure import (
    Coupling,
    LayerStructure,
    TowerStructure,
    kept_token_count,
    merge_pairs,
    resolve_couplings,
    site_token_counts,
    source_output_tokens,
)

__all__ = ["TowerFlops", "attention_flops", "cross_attention_flops", "kept_token_count", "merge_flops", "mlp_flops",
           "model_flops", "model_tower_flops", "tower_flops", "unit_flops"]


def attention_flops(tokens: int, layer: LayerStructure) -> int:
    """q/k/v and output projections plus the two N x N attention matmuls (QK^T, AV)."""
    if layer.heads == 0:
        return 0
    kv = layer.heads if layer.kv_heads is None else layer.kv_heads
    width_q = layer.heads * layer.head_dim
    width_kv = kv * layer.head_dim
    proj = 2 * tokens * layer.hidden * (2 * width_q + 2 * width_kv)
    mix = 2 * 2 * tokens * tokens * width_q
    return proj + mix


def cross_attention_flops(tokens: int, layer: LayerStructure) -> int:
    """Cross-attention (BLIP): queries from ``tokens``, keys/values from ``cross_kv_tokens`` encoder tokens (the
    K/V projections of those tokens included). Raises ValueError if the K/V tokens were never filled in."""
    if layer.cross_heads == 0:
        return 0
    if layer.cross_kv_tokens <= 0 or layer.cross_kv_hidden <= 0:
        raise ValueError("cross-attention with no K/V tokens or width: declare cross_kv_hidden, resolve the couplings")
    width = layer.cross_heads * layer.head_dim
    q_out = 2 * tokens * layer.hidden * width * 2
    kv = 2 * layer.cross_kv_tokens * layer.cross_kv_hidden * width * 2
    mix = 2 * 2 * tokens * layer.cross_kv_tokens * width
    return q_out + kv + mix


def merge_flops(pairs: int, layer: LayerStructure) -> int:
    """The ``merge`` reducer's similarity matmul: ``pairs`` (dropped, kept) key dot products of the layer's key
    width (:func:`comp_vlm.structure.merge_pairs`)."""
    kv = layer.heads if layer.kv_heads is None else layer.kv_heads
    return 2 * pairs * kv * layer.head_dim


def mlp_flops(tokens: int, layer: LayerStructure) -> int:
    return 2 * tokens * layer.hidden * layer.neurons * layer.mlp_matrices


def _head_flops(layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    return attention_flops(tokens_in, LayerStructure(layer.hidden, 1, layer.head_dim, 0))


def _kv_group_flops(layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    """A GQA key/value group: one key/value head and the query heads that share it (heads / kv_heads of them)."""
    kv = layer.heads if layer.kv_heads is None else layer.kv_heads
    q_per_kv = layer.heads // kv if kv else 1
    return attention_flops(tokens_in, LayerStructure(layer.hidden, q_per_kv, layer.head_dim, 0, kv_heads=1))


def _neuron_flops(layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    return mlp_flops(tokens_mlp, LayerStructure(layer.hidden, 0, layer.head_dim, 1, layer.mlp_matrices))


def _cross_head_flops(layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    """A cross-attention head: its q/out share on the layer's tokens after the site (those the MLP sees: a
    cross-attention layer is never pooled-only), its K/V share on the source's tokens, and its mixing."""
    return cross_attention_flops(tokens_mlp, replace(layer, cross_heads=1))


_UNIT_FLOPS = {"head": _head_flops, "neuron": _neuron_flops, "cross_head": _cross_head_flops,
               "kv_group": _kv_group_flops}


def unit_flops(kind: str, layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    """FLOPs one unit of ``kind`` costs in ``layer`` when ``tokens_in`` tokens enter its attention and
    ``tokens_mlp`` its MLP (the :func:`tower_flops` counts): what removing it saves, to first order. ``layer``
    must come from resolved towers (:func:`comp_vlm.structure.resolve_couplings`) for the kinds that read
    another tower's tokens (``cross_head``)."""
    if kind not in _UNIT_FLOPS:
        raise ValueError(f"no FLOPs model for unit kind {kind!r} (known: {', '.join(_UNIT_FLOPS)})")
    return _UNIT_FLOPS[kind](layer, tokens_in, tokens_mlp)


@dataclass(frozen=True)
class TowerFlops:
    total: int
    per_layer: tuple[int, ...]
    tokens_in: tuple[int, ...]  # tokens entering each layer's attention
    tokens_mlp: tuple[int, ...]  # tokens entering each layer's MLP


def tower_flops(tower: TowerStructure) -> TowerFlops:
    """FLOPs of one tower at its reference shape, following the token counts through every site (its couplings,
    if any, already resolved: :func:`model_tower_flops`); ``output_token_flops`` for each token leaving it."""
    per_layer, tin, tmlp = [], [], []
    for layer, (n_in, n), pairs in zip(tower.layers, site_token_counts(tower), merge_pairs(tower)):
        tin.append(n_in)
        n_mlp = 1 if layer.mlp_tokens_pooled_only else n
        tmlp.append(n_mlp)
        per_layer.append(attention_flops(n_in, layer) + merge_flops(pairs, layer) + cross_attention_flops(n, layer)
                         + mlp_flops(n_mlp, layer))
    head = tower.output_token_flops * source_output_tokens(tower) if tower.output_token_flops else 0
    return TowerFlops(tower.extra_flops + head + sum(per_layer), tuple(per_layer), tuple(tin), tuple(tmlp))


def model_tower_flops(towers: Sequence[TowerStructure], couplings: Sequence[Coupling]) -> dict[str, TowerFlops]:
    """Per tower, its FLOPs once ``couplings`` carry every source's kept tokens into the towers it feeds (the
    cross-attention K/V projections count in the tower that holds the cross-attention)."""
    return {t.name: tower_flops(t) for t in resolve_couplings(towers, couplings)}


def model_flops(towers: Sequence[TowerStructure], couplings: Sequence[Coupling]) -> int:
    """Total per-sample FLOPs of a model: all its towers together, through its couplings (method.md §1)."""
    return sum(tower_flops(t).total for t in resolve_couplings(towers, couplings))
