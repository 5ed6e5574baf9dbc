"""Token-site mechanics, model-agnostic (method.md §1 "token sites", "keep ratios").

A :class:`TokenState` follows the tokens of one batch through a tower: for every slot of the current (possibly
shortened) sequence it records the token's original position, whether the slot holds a real token (not padding
or a filler), whether a site may drop it, and the token pool it belongs to (a tower may hold several pools, e.g.
image and instruction tokens in one LLM sequence; a site keeps the top k of each). Sites gather (never mask) the
kept tokens in their original order, so causality is preserved; samples that keep fewer tokens than the longest
one are padded with dropped tokens marked invalid, which the rebuilt attention mask hides. The per-slot fields
(:data:`SLOT_FIELDS`) travel together through every gather: a further per-slot label (a merged token's size)
joins them there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

SLOT_FIELDS = ("positions", "valid", "prunable", "pool")  # the (B, n) fields of a TokenState, gathered together


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

    @staticmethod
    def start(
        batch: int,
        length: int,
        device: torch.device,
        valid: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        always_kept: torch.Tensor | None = None,
    ) -> TokenState:
        """State at a tower's input. ``always_kept`` (B, n) marks tokens no site may drop (CLS, BOS, EOS...)."""
        positions = torch.arange(length, device=device).expand(batch, length)
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if valid is None else valid.bool()
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
    pool = getattr(state, "pool", None)  # a duck-typed state (benchmarks/token_foreground.py) holds one pool
    if pool is None:
        return [state.prunable]
    return [state.prunable & (pool == p) for p in range(state.n_pools)]


def select_tokens(scores: torch.Tensor, state: TokenState, keep_ratio: float | Sequence[float],
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the slots a site keeps.

    Keeps every valid non-prunable slot plus, of each token pool, its top-k prunable slots by ``scores`` (ties
    broken by lower index; k from the pool's ratio: ``keep_ratio``, one for every pool or one per pool). Returns
    ``(slots, slot_valid)``: (B, n') indices into the current sequence, kept ones first in ascending order, then
    fillers (dropped slots, marked invalid) up to the longest sample's count.
    """
    b, n = scores.shape
    members = pool_members(state)
    ratios = [keep_ratio] * len(members) if isinstance(keep_ratio, (int, float)) else list(keep_ratio)
    if len(ratios) != len(members):
        raise ValueError(f"{len(ratios)} keep ratios for {len(members)} token pools")
    keep = state.valid & ~state.prunable
    for pool, ratio in zip(members, ratios):
        keep = keep | top_k(scores, pool, ratio)
    slot = torch.arange(n, device=scores.device).expand(b, n)
    key = torch.where(keep, slot, slot + n)
    count = keep.sum(dim=1)
    width = int(count.max().item()) if b > 0 else 0
    slots = torch.sort(key, dim=1).values[:, :width] % n
    slot_valid = torch.arange(width, device=scores.device)[None, :] < count[:, None]
    return slots, slot_valid


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
    return gather_tokens(hidden, slot), replace(state, **fields, attn_mask=None, gathered=True)


def scatter_to_full(hidden: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Put the valid slots back at their original positions of a zero (B, N, D) tensor."""
    if not state.gathered:
        return hidden
    b, _, d = hidden.shape
    out = hidden.new_zeros(b, state.full_length, d)
    batch_idx = torch.arange(b, device=hidden.device)[:, None].expand_as(state.positions)
    out[batch_idx[state.valid], state.positions[state.valid]] = hidden[state.valid]
    return out
