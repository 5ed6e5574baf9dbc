"""The token-site runtime every family's layer forward shares (method.md §1 "token sites", §2 CIT and CIP).

A layer adapter keeps only its family's maths and hands the protocol to the layer's :class:`SiteRuntime` (stored on
the layer module as ``comp_runtime``) at three points::

    step = layer.comp_runtime.start(layer, state, call, n_heads, head_mask)  # before attention
    attn_out, probs = attention(..., attention_mask=step.attention_mask(mask), comp_need_probs=step.need_probs)
    step.after_attention(probs)            # token scores (the injected scorer), collector.on_attention
    hidden = step.site(hidden + attn_out)  # the token site (gather + slots), then the pooled-only MLP step
    hidden = hidden + mlp(...)
    return hidden, step.after_mlp()        # collector.on_mlp; the TokenState the next layer gets

:meth:`SiteRuntime.run` wraps that body: it fixes the forward's :class:`LayerCall` -- whether it is recorded, and
the scorer with its random draws -- outside any gradient checkpoint (a checkpoint recompute must replay the forward,
never record it or draw anew), and checkpoints the body when the layer asks.

Tokens are ranked by a :data:`TokenScorer`, passed at install; :data:`TOKEN_SCORERS` names the built-in ones. What
a site does with the tokens it does not keep is its reducer (:data:`TOKEN_REDUCERS`): ``drop``, ``fuse`` or
``merge``; ``merge`` compares the layer's attention keys, which a :class:`KeyCapture` hook on the key projection
hands over, and makes later attention proportional (:func:`comp_vlm.adapters.common.proportional_bias`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import importance, tokens
from ..collect import CAPTURE_FLAG, in_backward, pop_captured
from ..errors import CompVLMError, ConfigError
from ..structure import TOKEN_POOL
from ..tokens import TokenState
from .common import proportional_bias

KEEP_ATTR = "comp_site_keep"  # a layer's site keep ratio per token pool, {pool: ratio} (ModelAdapter.set_keep_ratio)
COLLECTOR_ATTR = "comp_collector"  # the StatsCollector a layer feeds (set by ModelAdapter.attach_collector)

TokenScorer = Callable[[torch.Tensor, torch.Tensor | None, TokenState, bool], torch.Tensor]
"""``scorer(probs, cit_head_mask, state, causal) -> scores``: attention probabilities (B, H, n, n), detached; the
soft head mask (H,) for CIT, or None; the TokenState of the n current slots; whether the tower is causal. Returns
(B, n) scores of the slots: a site keeps the top-k prunable slots, and the collector weights tokens by them (Eq. 4),
so they are >= 0 and 0 outside ``state.prunable``. A scorer that draws random numbers also has ``per_call()``,
which returns the scorer of one layer forward with its draws fixed (see :func:`call_scorer`)."""


# ---- scorers ------------------------------------------------------------------------------------------------------
def attention_scores(probs: torch.Tensor, head_mask: torch.Tensor | None, state: TokenState, causal: bool,
                     ) -> torch.Tensor:
    """CIT (Eq. 6-7), the default: the pooled query's row for causal towers, received attention otherwise (and in
    a tower with no pooled token, where every valid query counts)."""
    if causal and state.has_pooled:
        return importance.cit_pooled_row(probs, head_mask, state.pooled_slot, state.prunable)
    query_rows = state.valid & (state.positions != state.pooled[:, None])
    return importance.cit_received_attention(probs, head_mask, query_rows, state.prunable)


def uniform_scores(probs: torch.Tensor, head_mask: torch.Tensor | None, state: TokenState, causal: bool,
                   seed: int = 0) -> torch.Tensor:
    """Uniform noise over the prunable slots (normalised like CIT), drawn from a generator seeded with ``seed``."""
    noise = torch.rand(state.prunable.shape, generator=torch.Generator().manual_seed(seed)).to(probs.device)
    return importance.normalize_scores(noise, state.prunable)


class RandomScorer:
    """Uniform scores (the 'token-random' sanity baseline of baselines.md) from a private generator seeded at
    construction: reproducible under ``seed``, and torch's global RNG is neither read nor advanced. One instance
    serves every layer of a model in call order, each layer forward drawing one seed for its noise; a deepcopy of
    the model carries the generator state, and a search checkpoint holds it (:meth:`state_dict`)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's state (a uint8 tensor), for search checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict`: the next draws are those the saved scorer would have made."""
        self.generator.set_state(state["generator"])

    def per_call(self) -> TokenScorer:
        """The scorer of one layer forward: noise from a seed drawn now, the same on every call."""
        return partial(uniform_scores, seed=int(torch.randint(2**62, (), generator=self.generator)))

    def __call__(self, probs: torch.Tensor, head_mask: torch.Tensor | None, state: TokenState, causal: bool,
                 ) -> torch.Tensor:
        return self.per_call()(probs, head_mask, state, causal)


def _attention(seed: int) -> TokenScorer:
    return attention_scores


TOKEN_SCORERS: dict[str, Callable[[int], TokenScorer]] = {"attention": _attention, "random": RandomScorer}
"""Built-in scorers by name (``PruneConfig.token_scorer``, ``AdapterOptions.token_scorer``): seed -> scorer."""


def check_token_scorer(name: str) -> None:
    """Raise ConfigError unless ``name`` is a built-in scorer."""
    if name not in TOKEN_SCORERS:
        raise ConfigError(f"unknown token scorer {name!r}; choose from {', '.join(TOKEN_SCORERS)}")


def make_token_scorer(name: str, seed: int = 0) -> TokenScorer:
    """The built-in scorer ``name``, seeded with ``seed`` where it draws random numbers."""
    check_token_scorer(name)
    return TOKEN_SCORERS[name](seed)


# ---- token pools ----------------------------------------------------------------------------------------------------
def site_keep(layer: nn.Module, pool: str = TOKEN_POOL) -> float:
    """The keep ratio of token pool ``pool`` at the token site a layer module holds (1: none, or keeps all)."""
    return float(getattr(layer, KEEP_ATTR, {}).get(pool, 1.0))


def set_site_keep(layer: nn.Module, pool: str, ratio: float) -> None:
    """Set the keep ratio of token pool ``pool`` at ``layer``'s token site (unchecked: ModelAdapter.set_keep_ratio)."""
    setattr(layer, KEEP_ATTR, {**getattr(layer, KEEP_ATTR, {}), pool: float(ratio)})


PoolLabels = Callable[[TokenState], torch.Tensor]
"""``labels(state) -> (B, n) long``: the pool index (into the tower's pools) of each slot of a tower's input state;
read on its prunable slots only."""


@dataclass(frozen=True)
class TokenPool:
    """A named set of tokens that token sites prune, with one keep ratio per site layer: a CLIP tower holds one
    pool (:data:`TOKEN_POOL`, every prunable token); a family that mixes token kinds in one stack (image and
    instruction tokens in an LLM) holds one per kind, and labels each token with its pool (:data:`PoolLabels`)."""

    name: str
    mode: str  # the token mode whose stages set this pool's keep ratios (structure.TOKEN_MODES)

    def keep(self, layer: nn.Module) -> float:
        return site_keep(layer, self.name)


def label_pools(layers: Sequence[nn.Module], state: TokenState) -> TokenState:
    """A tower's input state with each prunable slot labelled with its pool, by the tower's :data:`PoolLabels`
    (a family's tower forward calls it on ``TokenState.start``'s state); unchanged where the tower has one pool."""
    runtime = layers[0].__dict__.get("comp_runtime") if len(layers) else None
    if runtime is None or runtime.pool_labels is None:
        return state
    return state.labelled(runtime.pool_labels(state), len(runtime.pools))


def heads_alive(n_heads: int, head_mask: torch.Tensor | None) -> bool:
    """Whether the attention still has a head (a layer without one has no attention map: its site is off)."""
    return n_heads > 0 and (head_mask is None or bool((head_mask > 0).any()))


def site_step(
    hidden: torch.Tensor, scores: torch.Tensor, state: TokenState, keep: float | Sequence[float], causal: bool
) -> tuple[torch.Tensor, TokenState, torch.Tensor]:
    """Select (top-k of each pool by ``scores``, sorted) and gather the tokens a site keeps; also returns the kept
    slots. ``keep``: one ratio for every pool, or one per pool."""
    slots, slot_valid = tokens.select_tokens(scores, state, keep)
    return tokens.gather_tokens(hidden, slots), state.gather(slots, slot_valid, causal, hidden.dtype), slots


# ---- reducers -------------------------------------------------------------------------------------------------------
Keep = float | Sequence[float]
TokenReducer = Callable[[torch.Tensor, torch.Tensor, TokenState, Keep, bool, "torch.Tensor | None"],
                        tuple[torch.Tensor, TokenState, torch.Tensor]]
"""``reducer(hidden, scores, state, keep, causal, keys) -> (hidden, state, scores)``: a site's step, the
tokens it keeps (top-k of each pool by ``scores``) gathered and the others reduced; ``keys`` (B, n, W) are the
layer's attention keys (read by ``merge`` only)."""


def drop_step(hidden: torch.Tensor, scores: torch.Tensor, state: TokenState, keep: Keep, causal: bool,
              keys: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenState, torch.Tensor]:
    """``drop``: the tokens a site does not keep are gone (method.md §1)."""
    hidden, state, slots = site_step(hidden, scores, state, keep, causal)
    return hidden, state, scores.gather(1, slots)


def fuse_step(hidden: torch.Tensor, scores: torch.Tensor, state: TokenState, keep: Keep, causal: bool,
              keys: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenState, torch.Tensor]:
    """``fuse`` (EViT, MADTP): each pool's dropped tokens fold into the pool's fused token (score-weighted mean,
    :func:`comp_vlm.tokens.fuse_dropped`). The fused tokens are allotted at a tower's first active site, one per
    pool, as its last slots (an empty one stays masked); they are never pruned and carry score 0."""
    hidden, scores, state = tokens.with_fused_slots(hidden, scores, state)
    b, n = scores.shape
    body = torch.arange(n, device=scores.device) < n - state.fused
    slots, ok = tokens.select_tokens(scores, replace(state, valid=state.valid & body), keep)
    hidden, state = tokens.fuse_dropped(hidden, scores, state, tokens.slot_mask(slots, ok, n))
    slots = torch.cat([slots, torch.arange(n - state.fused, n, device=slots.device).expand(b, -1)], dim=1)
    ok = torch.cat([ok, torch.ones(b, state.fused, dtype=torch.bool, device=ok.device)], dim=1)
    return tokens.gather_tokens(hidden, slots), state.gather(slots, ok, causal, hidden.dtype), scores.gather(1, slots)


def merge_step(hidden: torch.Tensor, scores: torch.Tensor, state: TokenState, keep: Keep, causal: bool,
               keys: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenState, torch.Tensor]:
    """``merge`` (ToMe): each dropped token averages into its most similar kept token of its pool (cosine of the
    keys; in a causal tower an earlier one), weighted by size (:func:`comp_vlm.tokens.merge_targets`,
    :func:`comp_vlm.tokens.merge_tokens`); the sizes travel in the state for proportional attention."""
    if keys is None:
        raise CompVLMError("the merge reducer needs the layer's attention keys, which this layer did not capture")
    n = scores.shape[1]
    slots, ok = tokens.select_tokens(scores, state, keep)
    kept = tokens.slot_mask(slots, ok, n)
    target = torch.full_like(state.positions, -1)
    for members in tokens.pool_members(state):
        target = torch.maximum(target, tokens.merge_targets(keys, members & ~kept, members & kept, state.positions,
                                                            causal))
    size = state.size if state.size is not None else torch.ones(state.valid.shape, device=hidden.device)
    hidden, size, positions = tokens.merge_tokens(hidden, size, state.positions, target, causal)
    state = replace(state, size=size, positions=positions).gather(slots, ok, causal, hidden.dtype)
    if state.attn_mask is None:  # proportional attention adds its bias to a mask of the hidden dtype
        w = slots.shape[1]
        state = replace(state, attn_mask=torch.zeros(len(slots), 1, w, w, dtype=hidden.dtype, device=hidden.device))
    return tokens.gather_tokens(hidden, slots), state, scores.gather(1, slots)


TOKEN_REDUCERS: dict[str, TokenReducer] = {"drop": drop_step, "fuse": fuse_step, "merge": merge_step}
"""The reducers by name (``PruneConfig.token_reducer``, ``AdapterOptions.token_reducer``)."""
KEY_REDUCERS = ("merge",)  # reducers that read the layer's attention keys (a family must expose them)


KEYS = "comp_captured_keys"


class KeyCapture:
    """Forward hook (prepended: it sees the keys before any head-mask hook) on a layer's key projection: keeps its
    output, detached, while the layer's site asks for it (``module.comp_capture_keys``)."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module.__dict__.get("comp_capture_keys", False):
            module.__dict__[KEYS] = output.detach()


def install_key_capture(linear: nn.Module) -> None:
    """Hook ``linear`` (a layer's key projection) with a :class:`KeyCapture` (idempotent)."""
    if not any(isinstance(h, KeyCapture) for h in linear._forward_hooks.values()):
        linear.register_forward_hook(KeyCapture(), prepend=True)


def site_keys(linear: nn.Module, n_heads: int, head_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The keys ``linear`` captured in this forward (B, n, W), each head's channels scaled by its soft mask (as the
    attention sees them: a sliced model's keys and a hard-masked one's have the same cosines)."""
    keys = linear.__dict__.pop(KEYS, None)
    if keys is None or head_mask is None:
        return keys
    b, n, w = keys.shape
    return (keys.view(b, n, n_heads, w // n_heads) * head_mask.to(keys.dtype)[:, None]).view(b, n, w)


# ---- the runtime ----------------------------------------------------------------------------------------------------
def call_scorer(scorer: TokenScorer) -> TokenScorer:
    """The scorer of one layer forward: a scorer with ``per_call()`` fixes its random draws through it (so that a
    gradient-checkpoint recompute scores as the forward did); any other is used as it is."""
    per_call = getattr(scorer, "per_call", None)
    return scorer if per_call is None else per_call()


def records(layer: nn.Module) -> bool:
    """Whether this forward of ``layer`` feeds its collector (train mode, grad on, not inside a backward)."""
    collector = layer.__dict__.get(COLLECTOR_ATTR)
    return collector is not None and collector.active(layer)


def end_tower(layers: Sequence[nn.Module]) -> None:
    """After a tower's last layer: the collector weights the last MLP's statistic (when this forward records)."""
    if len(layers) and records(layers[0]):
        layers[0].__dict__[COLLECTOR_ATTR].end_tower(layers[0].comp_runtime.tower)


@dataclass(frozen=True)
class SiteRuntime:
    """One layer's token-site plumbing, stored on the layer module as ``comp_runtime``.

    ``pools``: the token pools its site prunes (the tower's); ``attention_output``/``mlp_output``: paths (in the
    layer) of the linears whose inputs carry the head and neuron statistics; ``pooled_only_mlp``: the MLP runs on
    the pooled token alone (CLIP dead compute); ``cit``: the scorer sees the soft head masks (Eq. 7; False: the
    no-cit ablation, Eq. 6 on raw A); ``pool_labels``: how the tower's tokens split among several pools
    (:func:`label_pools`; None: one pool).
    """

    tower: str
    index: int
    causal: bool
    pools: tuple[TokenPool, ...]
    scorer: TokenScorer
    attention_output: str
    mlp_output: str
    pooled_only_mlp: bool = False
    cit: bool = True
    pool_labels: PoolLabels | None = None
    reducer: str = "drop"
    key_output: str | None = None  # path of the key projection whose output merge compares (KeyCapture)
    attention_kind: str = "head"  # the unit kind whose statistic attention_output's input carries (GQA: kv_group)

    def run(self, layer: nn.Module, body: Callable[..., Any], hidden: torch.Tensor, attention_mask: Any,
            state: TokenState, **kwargs: Any) -> Any:
        """``body(layer, hidden, attention_mask, comp_state=, comp_call=, **kwargs)``, under the layer's gradient
        checkpointing when it is on. The :class:`LayerCall` is fixed here, outside the checkpoint: reentrant
        checkpointing runs the body under no_grad, and a recompute must score as the forward did."""
        call = LayerCall(records(layer), call_scorer(self.scorer))
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            fn = partial(body, layer, comp_state=state, comp_call=call, **kwargs)
            return layer._gradient_checkpointing_func(fn, hidden, attention_mask)
        return body(layer, hidden, attention_mask, comp_state=state, comp_call=call, **kwargs)

    def start(self, layer: nn.Module, state: TokenState, call: LayerCall, n_heads: int,
              head_mask: torch.Tensor | None) -> LayerStep:
        """Begin one forward of ``layer`` (before its attention): sets the capture flags of the output linears."""
        collector = layer.__dict__.get(COLLECTOR_ATTR)
        wants = collector is not None and collector.wants_probs(layer)
        collect = wants and call.record and not in_backward()  # a checkpoint recompute replays, never records
        for path in (self.attention_output, self.mlp_output):
            layer.get_submodule(path).__dict__[CAPTURE_FLAG] = collect
        keep = tuple(pool.keep(layer) for pool in self.pools)
        alive = heads_alive(n_heads, head_mask)
        site_on = min(keep, default=1.0) < 1.0 and alive
        if self.key_output is not None and self.reducer in KEY_REDUCERS:
            linear = layer.get_submodule(self.key_output)
            install_key_capture(linear)  # here, not at install: slicing replaces the linear
            linear.__dict__["comp_capture_keys"] = site_on
        return LayerStep(self, layer, state, call.scorer, head_mask, keep, alive, site_on, collector, wants, collect,
                         n_heads=n_heads)


@dataclass(frozen=True)
class LayerCall:
    """What one layer forward fixes before it runs (and a gradient-checkpoint recompute reuses)."""

    record: bool  # the forward feeds the collector
    scorer: TokenScorer  # the scorer with its random draws fixed (call_scorer)


@dataclass
class LayerStep:
    """One forward of one layer through its :class:`SiteRuntime` (made by :meth:`SiteRuntime.start`)."""

    runtime: SiteRuntime
    layer: nn.Module
    state: TokenState
    scorer: TokenScorer
    head_mask: torch.Tensor | None
    keep: tuple[float, ...]  # per pool of the runtime
    alive: bool
    site_on: bool
    collector: Any
    wants: bool
    collect: bool
    scores: torch.Tensor | None = None
    n_heads: int = 0

    @property
    def need_probs(self) -> bool:
        """Whether the attention must return its probabilities (an active site, or statistics collection)."""
        return self.site_on or self.wants

    def attention_mask(self, mask: Any) -> Any:
        """The mask of the current slots once a site gathered tokens, else the model's own; under ``merge``, with
        the proportional-attention bias log(size) on the key axis (none while every size is 1)."""
        if not self.state.gathered:
            return mask
        if self.runtime.reducer == "merge" and self.state.size is not None:
            return proportional_bias(self.state.attn_mask, self.state.size)
        return self.state.attn_mask

    def after_attention(self, probs: torch.Tensor | None) -> None:
        """Score the current slots (when a site or the collector needs it) and feed the head statistic."""
        rt = self.runtime
        if (self.site_on or self.collect) and self.alive:
            if probs is None:
                raise CompVLMError(
                    "token sites need attention probabilities, which this model's attention implementation does not "
                    "return; use attn_implementation 'comp_vlm' (installed by default) or 'eager'"
                )
            cit_mask = self.head_mask.detach() if (rt.cit and self.head_mask is not None) else None
            self.scores = self.scorer(probs.detach(), cit_mask, self.state, rt.causal)
        if self.collect:
            head_input = pop_captured(self.layer.get_submodule(rt.attention_output))
            self.collector.on_attention(rt.tower, rt.index, self.scores, self.state, head_input, rt.attention_kind)

    def site(self, hidden: torch.Tensor) -> torch.Tensor:
        """The token site (top-k by the scores, gathered), then the pooled-only step; returns the shorter hidden."""
        if self.site_on:
            rt = self.runtime
            keys = None
            if rt.key_output is not None and rt.reducer in KEY_REDUCERS:
                keys = site_keys(self.layer.get_submodule(rt.key_output), self.n_heads, self.head_mask)
            hidden, self.state, self.scores = TOKEN_REDUCERS[rt.reducer](hidden, self.scores, self.state, self.keep,
                                                                        rt.causal, keys)
        if self.runtime.pooled_only_mlp:
            slot = self.state.pooled_slot[:, None]
            hidden, self.state = tokens.keep_pooled_only(hidden, self.state)
            self.scores = None if self.scores is None else self.scores.gather(1, slot)
        return hidden

    def after_mlp(self) -> TokenState:
        """Feed the neuron statistic (weighted by the next layer's scores); the state the next layer gets."""
        if self.collect:
            rt = self.runtime
            mlp_input = pop_captured(self.layer.get_submodule(rt.mlp_output))
            self.collector.on_mlp(rt.tower, rt.index, mlp_input, self.state, self.scores)
        return self.state
