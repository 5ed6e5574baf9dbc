"""Architecture-free description of what a (pruned) model computes, consumed by :mod:`comp_vlm.flops`.

The five pruning modes of CoMP (method.md §1):

=====  ==========================================================
P_v    vision parameters (attention heads + MLP neurons)
P_l    language parameters (self-attention heads + MLP neurons)
P_c    cross-modal parameters (cross-attention heads)
T_v    vision tokens
T_l    language tokens
=====  ==========================================================

A model's towers may feed one another (:class:`Coupling`: BLIP's vision tokens are the K/V of the text tower's
cross-attention, LLaVA's image features are a span of the LLM's input): :func:`resolve_couplings` fills the token
counts a tower takes from another, so the FLOPs of every tower follow the tokens the others keep.

A tower's token ``reducer`` (what its sites do with the tokens they do not keep) changes its counts: ``fuse`` adds
one token per pool from the first active site on (:func:`site_token_counts`); ``merge`` adds each site's similarity
matmul, (dropped x kept) keys of each pool (:func:`merge_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

PARAM_MODES = ("P_v", "P_l", "P_c")
TOKEN_MODES = ("T_v", "T_l")
MODES = PARAM_MODES + TOKEN_MODES
COUPLING_KINDS = ("cross_kv", "token_span")
TOKEN_POOL = "tokens"  # the pool of a single-pool tower (CLIP), and of a TowerStructure that lists no pools
REDUCERS = ("drop", "fuse", "merge")  # adapters.runtime.TOKEN_REDUCERS, as the FLOPs model knows them


@dataclass(frozen=True)
class LayerStructure:
    """One transformer layer as the FLOPs model sees it.

    ``heads``/``neurons`` are the units still computed (kept). ``site_keep`` is the keep ratio of the token site
    that sits between this layer's attention and its MLP (``None``: no active site): one ratio for every token pool
    of the tower, or a ratio per pool name (a pool it does not name keeps all its tokens). ``mlp_tokens_pooled_only``
    marks CLIP's dead-compute option: the MLP runs on the pooled token alone. ``cross_heads`` query the tokens
    after the site; their keys/values come from ``cross_kv_tokens`` tokens of width ``cross_kv_hidden`` (a layer
    with ``cross_kv_hidden > 0`` has cross-attention; a ``cross_kv`` coupling fills its ``cross_kv_tokens``).
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
    site_keep: float | Mapping[str, float] | None = None
    mlp_tokens_pooled_only: bool = False

    def __post_init__(self) -> None:
        if self.cross_heads and self.mlp_tokens_pooled_only:  # cross-attention and MLP see the same tokens
            raise ValueError("a layer with cross-attention cannot run its MLP on the pooled token alone")

    def pool_keep(self, pool: str) -> float | None:
        """The site's keep ratio of token pool ``pool`` (None: the pool keeps all its tokens here)."""
        if isinstance(self.site_keep, Mapping):
            return self.site_keep.get(pool)
        return self.site_keep


@dataclass(frozen=True)
class TowerStructure:
    """A stack of layers run on ``tokens`` input tokens (at the reference shape), of which ``always_kept``
    can never be dropped by a token site. ``extra_flops`` covers the tower's matmuls outside the layers
    (patch embedding, projection heads). ``pools``: (name, count) of each token pool among the tower's own
    prunable tokens (``tokens - always_kept``, span tokens aside); none listed: one pool :data:`TOKEN_POOL` holds
    them all. ``span_tokens``: of ``tokens``, those other towers bring in through ``token_span`` couplings, and
    ``span_pools`` the pools they join (both set by :func:`resolve_couplings`). ``reducer``: what its sites do with
    the tokens they do not keep (:data:`REDUCERS`). ``output_token_flops``: FLOPs per token leaving the last layer
    outside the layers (a pooling head that reads every kept token: SigLIP's attention-pooling head projects the
    keys and values of each)."""

    name: str
    tokens: int
    always_kept: int
    layers: tuple[LayerStructure, ...]
    extra_flops: int = 0
    meta: dict = field(default_factory=dict, compare=False)
    span_tokens: int = 0
    pools: tuple[tuple[str, int], ...] = ()
    span_pools: tuple[tuple[str, int], ...] = ()
    reducer: str = "drop"
    output_token_flops: int = 0

    def __post_init__(self) -> None:
        if self.reducer not in REDUCERS:
            raise ValueError(f"tower {self.name!r}: unknown token reducer {self.reducer!r} (known: {REDUCERS})")
        names = [name for name, _ in self.pools]
        if len(set(names)) < len(names) or any(n < 0 for _, n in self.pools):
            raise ValueError(f"tower {self.name!r}: token pools need unique names and counts >= 0, got {self.pools}")
        own = self.tokens - self.span_tokens - self.always_kept
        if self.pools and sum(n for _, n in self.pools) != own:
            raise ValueError(f"tower {self.name!r}: its token pools {self.pools} do not add up to its {own} prunable "
                             "tokens")

    def pool_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.pools) if self.pools else (TOKEN_POOL,)

    def pool_tokens(self) -> dict[str, int]:
        """Prunable tokens of each pool entering the first layer at the reference shape, spans included."""
        counts = dict(self.pools) if self.pools else {TOKEN_POOL: self.tokens - self.span_tokens - self.always_kept}
        for name, n in self.span_pools:
            counts[name] += n
        return counts


@dataclass(frozen=True)
class Coupling:
    """Output tokens of tower ``source`` feeding tower ``target`` (design.md item 4).

    ``cross_kv``: the target's cross-attention layers take keys/values from them (BLIP). ``token_span``: they
    enter the target's input sequence (LLaVA's image span in the LLM), as prunable tokens of the target's token
    pool ``pool``. Of the source's n output tokens the target receives ceil((n - skip) / per_token): ``skip`` it
    never sees (LLaVA's default feature selection drops the CLS token), ``per_token`` source tokens per token
    received (a projector that merges tokens).
    """

    kind: str
    source: str
    target: str
    per_token: int = 1
    skip: int = 0
    pool: str = TOKEN_POOL

    def __post_init__(self) -> None:
        if self.kind not in COUPLING_KINDS:
            raise ValueError(f"unknown coupling kind {self.kind!r}; expected one of {COUPLING_KINDS}")
        if self.source == self.target or self.per_token < 1 or self.skip < 0:
            raise ValueError(f"coupling {self.source!r} -> {self.target!r}: towers must differ, per_token >= 1, "
                             "skip >= 0")

    def received(self, source_tokens: int) -> int:
        """Tokens the target receives when the source outputs ``source_tokens``."""
        return math.ceil(max(0, source_tokens - self.skip) / self.per_token)


def kept_token_count(prunable: int, keep_ratio: float) -> int:
    """Tokens a site keeps of ``prunable`` ones: ``max(1, floor(r*m + 0.5))`` (0 when there are none; method.md §1)."""
    if prunable <= 0:
        return 0
    return max(1, math.floor(keep_ratio * prunable + 0.5))


def site_token_counts(tower: TowerStructure) -> tuple[tuple[int, int], ...]:
    """Per layer, (tokens entering its attention, tokens after its site) at the reference shape. A site keeps,
    of each token pool, :func:`kept_token_count` of the pool's prunable tokens reaching it at the pool's keep
    ratio; a layer with no heads has no attention map, so its site is off (method.md §1). Under ``fuse`` the tower
    holds one fused token per pool from its first active site (a pool keep ratio below 1) on. Raises ValueError
    on a site keep ratio for a pool the tower lacks."""
    return tuple((n_in, n) for n_in, n, _ in _sites(tower))


def merge_pairs(tower: TowerStructure) -> tuple[int, ...]:
    """Per layer, the (dropped, kept) token pairs its site compares under ``merge``: sum over pools of
    (m - k) * k, m of the pool's tokens reaching the site and k kept (0 under the other reducers)."""
    if tower.reducer != "merge":
        return tuple(0 for _ in tower.layers)
    return tuple(sum((m - k) * k for m, k in pools) for _, _, pools in _sites(tower))


def _sites(tower: TowerStructure) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Per layer: tokens in, tokens after the site, and (m, k) per pool at an active site (empty elsewhere)."""
    n, pools, out, fused = tower.tokens, tower.pool_tokens(), [], 0
    for i, layer in enumerate(tower.layers):
        n_in, site = n, []
        if isinstance(layer.site_keep, Mapping) and not set(layer.site_keep) <= set(pools):
            raise ValueError(f"tower {tower.name!r} layer {i}: keep ratios for token pools "
                             f"{sorted(set(layer.site_keep) - set(pools))} it lacks (pools: {list(pools)})")
        if layer.site_keep is not None and layer.heads > 0:
            keeps = {pool: layer.pool_keep(pool) for pool in pools}
            if tower.reducer == "fuse" and any(k is not None and k < 1.0 for k in keeps.values()):
                fused = len(pools)
            for pool, m in pools.items():
                pools[pool] = m if keeps[pool] is None else kept_token_count(m, keeps[pool])
                site.append((m, pools[pool]))
            n = sum(pools.values()) + tower.always_kept + fused
        out.append((n_in, n, site))
    return out


def source_output_tokens(tower: TowerStructure) -> int:
    """Tokens leaving ``tower``'s last layer: those surviving every site."""
    counts = site_token_counts(tower)
    return counts[-1][1] if counts else tower.tokens


def _couple(tower: TowerStructure, fed: Sequence[tuple[Coupling, int]]) -> TowerStructure:
    """``tower`` with the token counts its incoming couplings bring: (coupling, tokens received) pairs."""
    kv = [(c, n) for c, n in fed if c.kind == "cross_kv"]
    if len(kv) > 1:
        raise ValueError(f"tower {tower.name!r} takes cross-attention K/V from several towers "
                         f"({', '.join(c.source for c, _ in kv)}); one source per tower")
    layers = tower.layers
    if kv:
        coupling, n_kv = kv[0]
        if not any(lay.cross_kv_hidden > 0 for lay in layers):
            raise ValueError(f"cross_kv coupling {coupling.source!r} -> {tower.name!r}: {tower.name!r} has no "
                             "cross-attention layer (cross_kv_hidden > 0)")
        layers = tuple(replace(lay, cross_kv_tokens=n_kv) if lay.cross_kv_hidden > 0 else lay for lay in layers)
    spans: dict[str, int] = {}
    for c, n in fed:
        if c.kind == "token_span":
            if c.pool not in tower.pool_names():
                raise ValueError(f"token_span coupling {c.source!r} -> {tower.name!r} fills token pool {c.pool!r}, "
                                 f"which {tower.name!r} lacks (pools: {list(tower.pool_names())})")
            spans[c.pool] = spans.get(c.pool, 0) + n
    span = sum(spans.values())
    return replace(tower, layers=layers, tokens=tower.tokens - tower.span_tokens + span, span_tokens=span,
                   span_pools=tuple(spans.items()))


def resolve_couplings(towers: Sequence[TowerStructure], couplings: Sequence[Coupling]) -> tuple[TowerStructure, ...]:
    """``towers`` (same order) with the K/V token counts and input spans their couplings take from their sources'
    output tokens at the reference shape; a source is resolved before the towers it feeds. Idempotent; pure.
    Raises ValueError on repeated or unknown tower names, a cycle, or a source whose last MLP is pooled-only (dead
    compute: its other tokens would not be computed)."""
    by_name = {t.name: t for t in towers}
    if len(by_name) < len(towers):
        raise ValueError(f"tower names must be unique, got {[t.name for t in towers]}")
    for c in couplings:
        missing = [name for name in (c.source, c.target) if name not in by_name]
        if missing:
            raise ValueError(f"coupling {c.source!r} -> {c.target!r} names unknown tower(s) {missing} "
                             f"(towers: {list(by_name)})")
        if any(lay.mlp_tokens_pooled_only for lay in by_name[c.source].layers):
            raise ValueError(f"tower {c.source!r} feeds {c.target!r} ({c.kind}) but runs its last MLP on the pooled "
                             "token alone: turn dead compute off")
    done: dict[str, TowerStructure] = {}

    def resolve(name: str, path: tuple[str, ...]) -> TowerStructure:
        if name in path:
            raise ValueError(f"tower couplings form a cycle: {' -> '.join((*path[path.index(name):], name))}")
        if name not in done:
            fed = [(c, c.received(source_output_tokens(resolve(c.source, (*path, name)))))
                   for c in couplings if c.target == name]
            done[name] = _couple(by_name[name], fed) if fed else by_name[name]
        return done[name]

    return tuple(resolve(t.name, ()) for t in towers)
