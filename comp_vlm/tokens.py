"""Token-site mechanics, model-agnostic (method.md §1 "token sites", "keep ratios").

A :class:`TokenState` follows the tokens of one batch through a tower: for every slot of the current (possibly
shortened) sequence it records the token's original position, whether the slot holds a real token (not padding
or a filler), and whether a site may drop it. Sites gather (never mask) the kept tokens in their original order,
so causality is preserved; samples that keep fewer tokens than the longest one are padded with dropped tokens
marked invalid, which the rebuilt attention mask hides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TokenState:
    positions: torch.Tensor  # (B, n) long: original position of each slot
    valid: torch.Tensor  # (B, n) bool: slot holds a real token
    prunable: torch.Tensor  # (B, n) bool: a site may drop this token
    pooled: torch.Tensor  # (B,) long: original position of the pooled token
    attn_mask: torch.Tensor | None = None  # mask for the current slots, once tokens were gathered
    gathered: bool = False
    full_length: int = 0

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

    @property
    def pooled_slot(self) -> torch.Tensor:
        """(B,) slot index of the pooled token in the current sequence."""
        return (self.positions == self.pooled[:, None]).int().argmax(dim=1)

    def gather(self, slots: torch.Tensor, slot_valid: torch.Tensor, causal: bool, dtype: torch.dtype) -> TokenState:
        positions = self.positions.gather(1, slots)
        valid = self.valid.gather(1, slots) & slot_valid
        prunable = self.prunable.gather(1, slots) & valid
        mask = build_attention_mask(positions, valid, causal, dtype)
        return replace(self, positions=positions, valid=valid, prunable=prunable, attn_mask=mask, gathered=True)


def kept_counts(prunable: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Per-sample k = max(1, floor(r*m + 0.5)) of the m prunable tokens (0 if m = 0). Mirrors flops.kept_token_count."""
    m = prunable.sum(dim=1)
    k = torch.floor(keep_ratio * m.double() + 0.5).long().clamp(min=1)
    return torch.where(m > 0, k, torch.zeros_like(k))


def select_tokens(scores: torch.Tensor, state: TokenState, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the slots a site keeps.

    Keeps every valid non-prunable slot plus the top-k prunable slots by ``scores`` (ties broken by lower index).
    Returns ``(slots, slot_valid)``: (B, n') indices into the current sequence, kept ones first in ascending order,
    then fillers (dropped slots, marked invalid) up to the longest sample's count.
    """
    b, n = scores.shape
    masked = torch.where(state.prunable, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    k = kept_counts(state.prunable, keep_ratio)
    keep = (state.valid & ~state.prunable) | (state.prunable & (rank < k[:, None]))
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
    new = replace(
        state,
        positions=state.positions.gather(1, slot),
        valid=ones,
        prunable=~ones,
        attn_mask=None,
        gathered=True,
    )
    return gather_tokens(hidden, slot), new


def scatter_to_full(hidden: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Put the valid slots back at their original positions of a zero (B, N, D) tensor."""
    if not state.gathered:
        return hidden
    b, _, d = hidden.shape
    out = hidden.new_zeros(b, state.full_length, d)
    batch_idx = torch.arange(b, device=hidden.device)[:, None].expand_as(state.positions)
    out[batch_idx[state.valid], state.positions[state.valid]] = hidden[state.valid]
    return out
