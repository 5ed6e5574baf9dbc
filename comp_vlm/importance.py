"""CIM, the Collaborative Importance Metric (method.md §2): pure tensor functions, no model code.

- CIT, token importance from attention corrected by the parameter masks (Eq. 6-7).
- CIP, parameter importance weighted by token importance (Eq. 3-5).
"""

from __future__ import annotations

import torch


def masked_head_max(probs: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 7: Â = A ⊙ M̂^p, then the max over heads. probs (B, H, q, k) -> (B, q, k)."""
    if head_mask is not None:
        probs = probs * head_mask.to(probs.dtype)[None, :, None, None]
    return probs.amax(dim=1)


def normalize_scores(scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Norm(.) of Eq. 6: divide by the sum over ``support`` tokens (B, n); tokens outside support get 0."""
    scores = torch.where(support, scores, torch.zeros_like(scores))
    total = scores.sum(dim=1, keepdim=True)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), scores)


def cit_received_attention(
    probs: torch.Tensor, head_mask: torch.Tensor | None, query_rows: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """Eq. 6-7 for bidirectional towers: S^t_i = Norm(Σ_n max_h Â_{h,n,i}) summed over ``query_rows`` (B, n)
    (valid non-CLS queries), normalised over ``support`` (B, n) (the prunable tokens)."""
    received = (masked_head_max(probs, head_mask) * query_rows[:, :, None].to(probs.dtype)).sum(dim=1)
    return normalize_scores(received.float(), support)


def cit_pooled_row(
    probs: torch.Tensor, head_mask: torch.Tensor | None, pooled_slot: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """Causal towers (method.md §2, DECISION): score by the pooled/last query's row, max over heads of Â."""
    amax = masked_head_max(probs, head_mask)
    row = amax.gather(1, pooled_slot[:, None, None].expand(-1, 1, amax.shape[-1]))[:, 0]
    return normalize_scores(row.float(), support)
