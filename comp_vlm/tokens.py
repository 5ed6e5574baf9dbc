"""Token-site mechanics, model-agnostic (method.md §1 "token sites", "keep ratios").

A :class:`TokenState` follows the tokens of one batch through a tower: for every slot of the current (possibly
shortened) sequence it records the token's original position, whether the slot holds a real token (not padding
or a filler), whether a site may drop it, and the token pool it belongs to (a tower may hold several pools, e.g.
image and instruction tokens in one LLM sequence; a site keeps the top k of each). Sites gather (never mask) the
kept tokens in their original order, so causality is preserved; samples that keep fewer tokens than the longest
one are padded with dropped tokens marked invalid, which the rebuilt attention mask hides. The per-slot fields
(:data:`SLOT_FIELDS`) travel together through every gather.

Token reducers (what a site does with the tokens it does not keep, :data:`comp_vlm.adapters.runtime.TOKEN_REDUCERS`)
build on the same state: ``drop`` discards them; ``fuse`` folds each pool's dropped tokens into one fused token per
pool (:func:`with_fused_slots`, :func:`fuse_dropped`), held in the last ``fused`` slots of the sequence; ``merge``
averages each into its most similar kept token (:func:`merge_targets`, :func:`merge_tokens`). The per-slot
``size`` records what a slot holds (None: every slot holds one token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn import functional as nn_functional

SLOT_FIELDS = ("positions", "valid", "prunable", "pool", "size")  # the (B, n) fields of a TokenState, gathered together
NO_POOLED = -1  # TokenState.pooled of a tower with no pooled token (no position matches it)


@dataclass(frozen=True)
class TokenState:
    positions: torch.Tensor  # (B, n) long: original position of each slot
    valid: torch.Tensor  # (B, n) bool: slot holds a real token
    prunable: torch.Tensor  # (B, n) bool: a site may drop this token
    pooled: torch.Tensor  # (B,) long: original position of the pooled token
    attn_mask: torch.Tensor | None = None  # mask for the current slots, once tokens were gathered
    gathered: bool = False
    full_length: int = 0
    pool: torch.Tensor | None = None  # (B, n) long: the pool index of each prunable slot (-1 elsewhere); None: one
    n_pools: int = 1
    size: torch.Tensor | None = None  # (B, n) float: merge, the tokens a slot holds; fuse, a fused slot's score mass
    fused: int = 0  # the last ``fused`` slots hold the fused tokens, one per pool (fuse), from the first site on

    @staticmethod
    def start(
        batch: int,
        length: int,
        device: torch.device,
        valid: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        always_kept: torch.Tensor | None = None,
        pooled_token: bool = True,
    ) -> TokenState:
        """State at a tower's input. ``always_kept`` (B, n) marks tokens no site may drop (CLS, BOS, EOS...).
        ``pooled`` (B,): where the tower pools (default slot 0); ``pooled_token=False``: the tower has no pooled
        token (SigLIP's vision tower pools every token through an attention head), so no slot is kept for it,
        token scores are the attention every token receives, and CIP has no anchor (:attr:`anchor_slot`)."""
        positions = torch.arange(length, device=device).expand(batch, length)
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if valid is None else valid.bool()
        if not pooled_token:
            pooled = torch.full((batch,), NO_POOLED, dtype=torch.long, device=device)
        pooled = torch.zeros(batch, dtype=torch.long, device=device) if pooled is None else pooled.long()
        keep = positions == pooled[:, None]
        if always_kept is not None:
            keep = keep | always_kept
        return TokenState(positions, valid, valid & ~keep, pooled, None, False, length)

    def labelled(self, pool: torch.Tensor, n_pools: int) -> TokenState:
        """This state with its prunable slots in pools ``pool`` (B, n) (values in [0, n_pools)); raises
        ValueError on a prunable slot outside them (a site would drop it unranked)."""
        pool = torch.where(self.prunable, pool.long(), -1)
        if bool(((pool >= n_pools) | (self.prunable & (pool < 0))).any()):
            raise ValueError(f"token pool labels must lie in [0, {n_pools}) on every prunable slot")
        return replace(self, pool=pool, n_pools=n_pools)

    @property
    def pooled_slot(self) -> torch.Tensor:
        """(B,) slot index of the pooled token in the current sequence."""
        return (self.positions == self.pooled[:, None]).int().argmax(dim=1)

    @property
    def has_pooled(self) -> bool:
        """Whether the tower pools at one token (False: ``TokenState.start(pooled_token=False)``)."""
        return bool((self.pooled != NO_POOLED).all())

    @property
    def anchor_slot(self) -> torch.Tensor | None:
        """CIP's anchor (Eq. 4, ω_0 = 1): the pooled token's slot, None where the tower has no pooled token."""
        return self.pooled_slot if self.has_pooled else None

    @property
    def pooled_mask(self) -> torch.Tensor:
        """(B, n) bool: the slot of the pooled token (none where the tower has none)."""
        return (self.positions == self.pooled[:, None]) & (self.pooled != NO_POOLED)[:, None]

    def slot_fields(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-slot fields (:data:`SLOT_FIELDS`) at ``slots`` (B, n')."""
        return {name: getattr(self, name).gather(1, slots) for name in SLOT_FIELDS if getattr(self, name) is not None}

    def gather(self, slots: torch.Tensor, slot_valid: torch.Tensor, causal: bool, dtype: torch.dtype) -> TokenState:
        fields = self.slot_fields(slots)
        valid = fields["valid"] & slot_valid
        prunable = fields["prunable"] & valid
        mask = build_attention_mask(fields["positions"], valid, causal, dtype)
        return replace(self, **{**fields, "valid": valid, "prunable": prunable}, attn_mask=mask, gathered=True)


def kept_counts(prunable: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Per-sample k = max(1, floor(r*m + 0.5)) of the m prunable tokens (0 if m = 0). Mirrors flops.kept_token_count."""
    m = prunable.sum(dim=1)
    k = torch.floor(keep_ratio * m.double() + 0.5).long().clamp(min=1)
    return torch.where(m > 0, k, torch.zeros_like(k))


def top_k(scores: torch.Tensor, members: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(B, n) bool: the :func:`kept_counts` highest-scoring of the ``members`` slots (ties broken by lower index)."""
    b, n = scores.shape
    masked = torch.where(members, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    return members & (rank < kept_counts(members, keep_ratio)[:, None])


def pool_members(state: TokenState) -> list[torch.Tensor]:
    """(B, n) bool per pool: its prunable slots."""
    if state.pool is None:
        return [state.prunable]
    return [state.prunable & (state.pool == p) for p in range(state.n_pools)]


def select_tokens(scores: torch.Tensor, state: TokenState, keep_ratio: float | Sequence[float],
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the slots a site keeps.

    Keeps every valid non-prunable slot and the pooled token's (a masked pooled token, e.g. SigLIP's last
    position under a padding mask, stays a query that no token attends to) plus, of each token pool, its top-k prunable slots by ``scores`` (ties
    broken by lower index; k from the pool's ratio: ``keep_ratio``, one for every pool or one per pool). Returns
    ``(slots, slot_valid)``: (B, n') indices into the current sequence, kept ones first in ascending order, then
    fillers (dropped slots, marked invalid) up to the longest sample's count.
    """
    members = pool_members(state)
    ratios = [keep_ratio] * len(members) if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
    if len(ratios) != len(members):
        raise ValueError(f"{len(ratios)} keep ratios for {len(members)} token pools")
    keep = (state.valid & ~state.prunable) | state.pooled_mask  # the pooled query even where it is no valid key
    for pool, ratio in zip(members, ratios):
        keep = keep | top_k(scores, pool, ratio)
    return packed(keep)


def packed(members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, ok)`` (B, w): each sample's ``members`` slots in ascending order, then other slots (``ok`` False)
    up to the largest count w."""
    b, n = members.shape
    slot = torch.arange(n, device=members.device).expand(b, n)
    key = torch.where(members, slot, slot + n)
    count = members.sum(dim=1)
    width = int(count.max().item()) if b > 0 else 0
    slots = torch.sort(key, dim=1).values[:, :width] % n
    ok = torch.arange(width, device=members.device)[None, :] < count[:, None]
    return slots, ok


def slot_mask(slots: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) bool: the slots ``slots`` (B, w) names where ``ok``."""
    mask = torch.zeros(slots.shape[0], n, dtype=torch.long, device=slots.device)
    return mask.scatter_add(1, slots, ok.long()) > 0


def gather_tokens(hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, n, D) -> (B, n', D) along the sequence dimension."""
    return hidden.gather(1, slots[:, :, None].expand(-1, -1, hidden.shape[-1]))


def build_attention_mask(
    positions: torch.Tensor, valid: torch.Tensor, causal: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive (B, 1, n, n) mask for the current slots: keys must be valid and, if causal, not later than the
    query in original positions. ``None`` when nothing needs masking (bidirectional and all valid)."""
    if not causal and bool(valid.all()):
        return None
    allowed = valid[:, None, :].expand(-1, positions.shape[1], -1)
    if causal:
        allowed = allowed & (positions[:, None, :] <= positions[:, :, None])
    # a query row with no allowed key (a filler) attends to itself, avoiding an all-masked softmax row
    eye = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)[None]
    allowed = allowed | (eye & ~allowed.any(dim=-1, keepdim=True))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def keep_pooled_only(hidden: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    """Reduce the sequence to the pooled token (CLIP dead-compute option)."""
    slot = state.pooled_slot[:, None]
    ones = torch.ones_like(slot, dtype=torch.bool)
    fields = {**state.slot_fields(slot), "valid": ones, "prunable": ~ones}
    return gather_tokens(hidden, slot), replace(state, **fields, attn_mask=None, gathered=True, fused=0)


def scatter_to_full(hidden: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Put the valid slots (and the pooled one) back at their original positions of a zero (B, N, D) tensor. A
    fused token sits at its position id, that of the last token it absorbed (a dropped token's place, which drop leaves at zero); a merged
    token at its own position, or in a causal tower at the last token it holds (:func:`merge_tokens`)."""
    if not state.gathered:
        return hidden
    b, _, d = hidden.shape
    out = hidden.new_zeros(b, state.full_length, d)
    batch_idx = torch.arange(b, device=hidden.device)[:, None].expand_as(state.positions)
    placed = state.valid | state.pooled_mask
    out[batch_idx[placed], state.positions[placed]] = hidden[placed]
    return out


# ---- reducers: fuse and merge ----------------------------------------------------------------------------------------
def with_fused_slots(hidden: torch.Tensor, scores: torch.Tensor, state: TokenState,
                     ) -> tuple[torch.Tensor, torch.Tensor, TokenState]:
    """``hidden``, ``scores`` and ``state`` with one empty fused slot per pool appended (zero, invalid, never
    prunable, size 0, position -1), unless the state holds them already."""
    if state.fused:
        return hidden, scores, state
    b, p = hidden.shape[0], state.n_pools

    def tail(x: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.cat([x, torch.full((b, p, *x.shape[2:]), value, dtype=x.dtype, device=x.device)], dim=1)

    size = state.size if state.size is not None else torch.ones(state.valid.shape, device=hidden.device)
    fields = {"positions": tail(state.positions, -1), "valid": tail(state.valid, False),
              "prunable": tail(state.prunable, False), "size": tail(size, 0.0)}
    if state.pool is not None:
        fields["pool"] = tail(state.pool, -1)
    return tail(hidden, 0.0), tail(scores, 0.0), replace(state, **fields, attn_mask=None, fused=p)


def fuse_dropped(hidden: torch.Tensor, scores: torch.Tensor, state: TokenState, kept: torch.Tensor,
                 ) -> tuple[torch.Tensor, TokenState]:
    """Fold each pool's dropped tokens (prunable, not ``kept``) into the pool's fused slot (the state's last
    ``n_pools`` slots): the mean of the fused token and the dropped ones weighted by their scores, the fused token
    by the score mass it holds already (its ``size``; uniform weights where a sample's dropped tokens all score
    0). The fused token turns valid once it holds a token and takes the position of the last token it absorbed."""
    n, p = hidden.shape[1], state.fused
    columns: dict[str, list[torch.Tensor]] = {"hidden": [], "size": [], "positions": [], "valid": []}
    for i, members in enumerate(pool_members(replace(state, prunable=state.prunable & ~kept))):
        t = n - p + i
        w = torch.where(members, scores.float(), 0.0)
        w = torch.where(members & (w.sum(dim=1, keepdim=True) == 0), 1.0, w)
        mass = state.size[:, t] + w.sum(dim=1)
        total = state.size[:, t, None] * hidden[:, t].float() + (w[:, :, None] * hidden.float()).sum(dim=1)
        fused = torch.where(mass[:, None] > 0, total / torch.where(mass > 0, mass, 1.0)[:, None], 0.0)
        last = torch.where(members, state.positions, -1).amax(dim=1)
        columns["hidden"].append(fused.to(hidden.dtype))
        columns["size"].append(mass)
        columns["positions"].append(torch.maximum(state.positions[:, t], last))
        columns["valid"].append(state.valid[:, t] | members.any(dim=1))
    new = {k: torch.cat([getattr(state, k)[:, :n - p], torch.stack(v, dim=1)], dim=1)
           for k, v in columns.items() if k != "hidden"}
    return torch.cat([hidden[:, :n - p], torch.stack(columns["hidden"], dim=1)], dim=1), replace(state, **new)


def merge_targets(keys: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                  causal: bool) -> torch.Tensor:
    """(B, n) long: the slot each ``sources`` slot merges into, the ``targets`` slot whose key (``keys`` (B, n, W))
    has the highest cosine with its own (ties: the lower slot); in a causal tower only a target at an earlier
    position qualifies. -1 elsewhere, and where no target qualifies (the token is dropped). The similarity is one
    (S, W) x (W, T) matmul per sample, S and T the largest source and target counts of the batch."""
    b, n = sources.shape
    out = torch.full((b, n), -1, dtype=torch.long, device=sources.device)
    src, src_ok = packed(sources)
    dst, dst_ok = packed(targets)
    if src.shape[1] == 0 or dst.shape[1] == 0:
        return out
    unit = nn_functional.normalize(keys.float(), dim=-1)
    sim = torch.matmul(gather_tokens(unit, src), gather_tokens(unit, dst).transpose(1, 2))
    allowed = src_ok[:, :, None] & dst_ok[:, None, :]
    if causal:
        allowed = allowed & (positions.gather(1, dst)[:, None, :] < positions.gather(1, src)[:, :, None])
    best = sim.masked_fill(~allowed, float("-inf")).argmax(dim=-1)
    chosen = torch.where(src_ok & allowed.any(dim=-1), dst.gather(1, best), -1)
    return out.scatter(1, src, chosen)


def merge_tokens(hidden: torch.Tensor, size: torch.Tensor, positions: torch.Tensor, target: torch.Tensor,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average every slot with a ``target`` (>= 0) into it, weighted by size: a target becomes
    ``sum(size_i x_i) / sum(size_i)`` over itself and its sources, of size ``sum(size_i)``; in a causal tower it
    takes the position of the last token it holds, so no earlier query sees it. Slots that receive nothing are
    unchanged (the sources too: the site drops them). Returns (hidden, size, positions)."""
    b, n, d = hidden.shape
    into = torch.where(target >= 0, target, torch.arange(n, device=hidden.device).expand(b, n))
    received = torch.zeros_like(target).scatter_add(1, into, (target >= 0).long()) > 0
    total = torch.zeros_like(hidden).scatter_add(1, into[:, :, None].expand(-1, -1, d), hidden * size[:, :, None])
    mass = torch.zeros_like(size).scatter_add(1, into, size)
    merged = total / torch.where(received, mass, 1.0)[:, :, None]
    new_positions = positions.scatter_reduce(1, into, positions, "amax") if causal else positions
    return (torch.where(received[:, :, None], merged, hidden), torch.where(received, mass, size),
            torch.where(received, new_positions, positions))
