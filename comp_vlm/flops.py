"""Analytic FLOPs of a transformer described by :mod:`comp_vlm.structure` (method.md §1, FLOPs convention).

FLOPs = 2 x MACs of matmuls and convolutions only (the convention of ``torch.utils.flop_counter``), per sample.
A token site at layer l sits between the attention and the MLP of that layer, so the layer's own MLP already
runs on the kept tokens. Pure functions: no model, no weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .structure import LayerStructure, TowerStructure


def kept_token_count(prunable: int, keep_ratio: float) -> int:
    """Tokens a site keeps of ``prunable`` ones: ``max(1, floor(r*m + 0.5))`` (0 when there are none)."""
    if prunable <= 0:
        return 0
    return max(1, math.floor(keep_ratio * prunable + 0.5))


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
    """Cross-attention (BLIP): queries from ``tokens``, keys/values from ``cross_kv_tokens`` encoder tokens."""
    if layer.cross_heads == 0:
        return 0
    width = layer.cross_heads * layer.head_dim
    q_out = 2 * tokens * layer.hidden * width * 2
    kv = 2 * layer.cross_kv_tokens * layer.cross_kv_hidden * width * 2
    mix = 2 * 2 * tokens * layer.cross_kv_tokens * width
    return q_out + kv + mix


def mlp_flops(tokens: int, layer: LayerStructure) -> int:
    return 2 * tokens * layer.hidden * layer.neurons * layer.mlp_matrices


def _head_flops(layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    return attention_flops(tokens_in, LayerStructure(layer.hidden, 1, layer.head_dim, 0))


def _neuron_flops(layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    return mlp_flops(tokens_mlp, LayerStructure(layer.hidden, 0, layer.head_dim, 1, layer.mlp_matrices))


_UNIT_FLOPS = {"head": _head_flops, "neuron": _neuron_flops}


def unit_flops(kind: str, layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
    """FLOPs one unit of ``kind`` costs in ``layer`` when ``tokens_in`` tokens enter its attention and
    ``tokens_mlp`` its MLP (the :func:`tower_flops` counts): what removing it saves, to first order."""
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
    """FLOPs of one tower at its reference shape, following the token counts through every site."""
    n = tower.tokens
    prunable = tower.tokens - tower.always_kept
    per_layer, tin, tmlp = [], [], []
    for layer in tower.layers:
        f = attention_flops(n, layer)
        tin.append(n)
        if layer.site_keep is not None and layer.heads > 0:
            prunable = kept_token_count(prunable, layer.site_keep)
            n = prunable + tower.always_kept
        f += cross_attention_flops(n, layer)
        n_mlp = 1 if layer.mlp_tokens_pooled_only else n
        tmlp.append(n_mlp)
        f += mlp_flops(n_mlp, layer)
        per_layer.append(f)
    return TowerFlops(tower.extra_flops + sum(per_layer), tuple(per_layer), tuple(tin), tuple(tmlp))


def model_flops(towers: list[TowerStructure] | tuple[TowerStructure, ...]) -> int:
    """Total per-sample FLOPs of all towers."""
    return sum(tower_flops(t).total for t in towers)
