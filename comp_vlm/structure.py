"""Architecture-free description of what a (pruned) model computes, consumed by :mod:`comp_vlm.flops`.

The five pruning modes of CoMP (method.md §1):

=====  ==========================================================
P_v    vision parameters (attention heads + MLP neurons)
P_l    language parameters (self-attention heads + MLP neurons)
P_c    cross-modal parameters (cross-attention heads)
T_v    vision tokens
T_l    language tokens
=====  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

PARAM_MODES = ("P_v", "P_l", "P_c")
TOKEN_MODES = ("T_v", "T_l")
MODES = PARAM_MODES + TOKEN_MODES


@dataclass(frozen=True)
class LayerStructure:
    """One transformer layer as the FLOPs model sees it.

    ``heads``/``neurons`` are the units still computed (kept). ``site_keep`` is the keep ratio of the token site
    that sits between this layer's attention and its MLP (``None``: no active site). ``mlp_tokens_pooled_only``
    marks CLIP's dead-compute option: the MLP runs on the pooled token alone.
    """

    hidden: int
    heads: int
    head_dim: int
    neurons: int
    mlp_matrices: int = 2  # 2: fc1/fc2; 3: gate/up/down (LLaMA)
    kv_heads: int | None = None  # None: same as heads
    cross_heads: int = 0
    cross_kv_tokens: int = 0
    cross_kv_hidden: int = 0
    site_keep: float | None = None
    mlp_tokens_pooled_only: bool = False


@dataclass(frozen=True)
class TowerStructure:
    """A stack of layers run on ``tokens`` input tokens (at the reference shape), of which ``always_kept``
    can never be dropped by a token site. ``extra_flops`` covers the tower's matmuls outside the layers
    (patch embedding, projection heads)."""

    name: str
    tokens: int
    always_kept: int
    layers: tuple[LayerStructure, ...]
    extra_flops: int = 0
    meta: dict = field(default_factory=dict, compare=False)
