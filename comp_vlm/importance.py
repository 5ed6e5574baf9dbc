"""CIM, the Collaborative Importance Metric (method.md §2): pure tensor functions, no model code.

- CIT, token importance from attention corrected by the parameter masks (Eq. 6-7).
- CIP, parameter importance weighted by token importance (Eq. 3-5).
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteError


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
    # sum in float32 (a bf16 result would round the column sums and create spurious ties)
    received = (masked_head_max(probs, head_mask).float() * query_rows[:, :, None].float()).sum(dim=1)
    return normalize_scores(received, support)


def cit_pooled_row(
    probs: torch.Tensor, head_mask: torch.Tensor | None, pooled_slot: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """Causal towers (method.md §2, DECISION): score by the pooled/last query's row, max over heads of Â."""
    amax = masked_head_max(probs, head_mask)
    row = amax.gather(1, pooled_slot[:, None, None].expand(-1, 1, amax.shape[-1]))[:, 0]
    return normalize_scores(row.float(), support)


# ----------------------------------------------------------------------------------------------------------------
# CIP: token-weighted parameter importance (Eq. 3-5) and the knapsack-greedy selection (method.md §2 "Selection")
# ----------------------------------------------------------------------------------------------------------------

WEIGHTINGS = ("cip", "uniform-rms", "no-cip")
"""Token weightings: ``cip`` = Eq. 4 (the method), ``uniform-rms`` and ``no-cip`` = the ablations of §4."""

NORMALIZATIONS = ("rank", "zscore")



def check_finite(t: torch.Tensor, label: str) -> torch.Tensor:
    """Raise :class:`NonFiniteError` (a ``ValueError``) naming ``label`` if ``t`` holds NaN/inf; else return ``t``."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise NonFiniteError(
            f"{label}: {int(bad.sum())} of {t.numel()} entries are not finite ({n_nan} NaN, "
            f"{int(bad.sum()) - n_nan} inf)"
        )
    return t


def token_weights(
    token_scores: torch.Tensor | None,
    support: torch.Tensor,
    anchor_slot: torch.Tensor | None = None,
    weighting: str = "cip",
) -> torch.Tensor:
    """Per-token CIP weights ω (B, n), float32 (Eq. 4).

    ``support`` (B, n) bool: tokens that reach the unit and may carry weight (real, not pruned, not padding);
    ``anchor_slot`` (B,) long: the CLS/pooled slot, which gets ω_0 = 1 in every weighting (``None`` for models
    without one, e.g. the LLaVA LLM: the ω_0 term is dropped). The "others" are ``support`` minus the anchor:

    - ``cip``: ω_n = S^t_n / Σ_{n'} S^t_{n'} over the others (they sum to 1 per sample). If that sum is 0
      (e.g. every head masked to 0) the others fall back to 1/N (DECISION), never NaN.
    - ``uniform-rms``: ω_n = 1/N, N = number of others (length normalisation without token weighting;
      DECISION: the anchor keeps ω_0 = 1 so that only the token weighting differs from ``cip``).
    - ``no-cip``: ω_n = 1 for every supported token (and the anchor): Σ ω X² is the plain squared L2 norm (Eq. 3).

    ``token_scores`` (B, n) is only read by ``cip``; tokens outside ``support`` get 0 whatever their score.
    **DECISION** (always-kept tokens other than the anchor, e.g. BOS in a causal tower): the sites' scores are
    normalised over the prunable tokens only, so such a token scores 0 and gets ω = 0 under ``cip``. BOS is the
    attention sink of the pooled row (method.md §2, causal towers); weighting by its share would let the sink's
    activations dominate every unit's score. ``uniform-rms`` and ``no-cip`` weight it like any other token.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown token weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if support.dim() != 2:
        raise ValueError(f"support must be (B, n), got shape {tuple(support.shape)}")
    others = support.bool().clone()
    if anchor_slot is not None:
        others.scatter_(1, anchor_slot.long().view(-1, 1), False)
    count = others.sum(dim=1, keepdim=True).float()
    uniform = torch.where(count > 0, others.float() / count.clamp_min(1.0), torch.zeros_like(count))
    if weighting == "no-cip":
        weights = others.float()
    elif weighting == "uniform-rms":
        weights = uniform
    else:
        if token_scores is None:
            raise ValueError("the 'cip' weighting needs token_scores")
        if token_scores.shape != support.shape:
            raise ValueError(f"token_scores {tuple(token_scores.shape)} and support {tuple(support.shape)} differ")
        s = torch.where(others, token_scores.float(), torch.zeros((), device=support.device))
        total = s.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, s / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)
    if anchor_slot is not None:
        weights.scatter_(1, anchor_slot.long().view(-1, 1), 1.0)
    return weights


def channel_stat(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sufficient statistic of Eq. 4 for one batch: Σ_b Σ_n ω_{b,n} X_{b,n,c}², shape (C,), float64.

    ``x`` (B, n, C) holds the input of the unit's output projection (MLP hidden activation after the
    nonlinearity and soft mask; or the attention context, where trailing dims (B, n, H, d_h) are flattened to
    C = H·d_h in the out-projection's column order). ``weights`` (B, n) from :func:`token_weights`.
    The contraction runs in float32 and the result is returned in float64 (DECISION), so that adding batches
    with :func:`accumulate_stat` is additive and, to float64 rounding, independent of batch order.
    """
    if x.dim() > 3:
        x = x.flatten(2)
    if x.dim() != 3 or weights.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, n, C) and weights (B, n); got {tuple(x.shape)} and {tuple(weights.shape)}")
    xf = x.detach().float()
    return torch.einsum("bn,bnc->c", weights.detach().float(), xf * xf).double()


def accumulate_stat(acc: torch.Tensor | None, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Running Σ_batches of :func:`channel_stat` (float64); ``acc=None`` starts a new one (stage start)."""
    stat = channel_stat(x, weights)
    return stat if acc is None else acc + stat.to(acc.device)


def head_stat(stat_channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Aggregate per-channel statistics (H·d_h,) to heads (H,): DECISION, the sum over the head's d_h channels,
    so a head's norm term is sqrt(Σ_{c∈h} Σ_n ω_n X²_{n,c}) (the Frobenius norm of its context block)."""
    if stat_channels.dim() != 1 or head_dim <= 0 or stat_channels.numel() % head_dim:
        raise ValueError(f"cannot split {tuple(stat_channels.shape)} channels into heads of {head_dim}")
    return stat_channels.view(-1, head_dim).sum(dim=1)


def neuron_scores(out_proj_weight: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """Eq. 3/4 per input unit i of an output projection: S_i = mean_j |W_{j,i}| · sqrt(stat_i), float64 (in,).

    ``out_proj_weight`` is ``nn.Linear.weight`` (out, in): unit i's outgoing weights are the COLUMN
    ``weight[:, i]`` (the paper's row W_{i,:} in its X·W convention). ``stat`` (in,) from :func:`channel_stat`.
    """
    if out_proj_weight.dim() != 2 or stat.shape != (out_proj_weight.shape[1],):
        raise ValueError(f"weight (out, in) {tuple(out_proj_weight.shape)} does not match stat {tuple(stat.shape)}")
    w = out_proj_weight.detach().abs().mean(dim=0, dtype=torch.float32).double()
    return w * stat.to(w.device, torch.float64).sqrt()


def head_scores(out_proj_weight: torch.Tensor, stat_channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Eq. 3/4 per attention head h, float64 (H,): S_h = mean|W[:, h·d_h:(h+1)·d_h]| · sqrt(Σ_{c∈h} stat_c).

    The weight term is the mean of |W| over the head's whole (out × d_h) column block of the out-projection;
    the norm term uses :func:`head_stat` (sum of the head's channel statistics, then sqrt).
    """
    if out_proj_weight.dim() != 2 or stat_channels.shape != (out_proj_weight.shape[1],):
        raise ValueError(
            f"weight (out, in) {tuple(out_proj_weight.shape)} does not match stat {tuple(stat_channels.shape)}"
        )
    stat = head_stat(stat_channels.to(out_proj_weight.device, torch.float64), head_dim)  # validates head_dim
    w = out_proj_weight.detach().abs().mean(dim=0, dtype=torch.float32).double()
    return w.view(-1, head_dim).mean(dim=1) * stat.sqrt()


def unit_scores(out_proj_weight: torch.Tensor, stat_channels: torch.Tensor, width: int) -> torch.Tensor:
    """Eq. 3/4 per unit of ``width`` input channels of an output projection: :func:`head_scores` for blocks
    (heads), :func:`neuron_scores` for single channels (neurons)."""
    if width > 1:
        return head_scores(out_proj_weight, stat_channels, width)
    return neuron_scores(out_proj_weight, stat_channels)


def _is_constant(scores: torch.Tensor) -> bool:
    if scores.numel() <= 1:
        return True
    scale = float(scores.abs().max())
    return float(scores.max() - scores.min()) <= 8 * torch.finfo(scores.dtype).eps * scale


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std within one group (population std). A group of size 1 or with (numerically) constant
    scores maps to zeros, never NaN."""
    s = scores.double()
    if _is_constant(s):
        return torch.zeros_like(s)
    return (s - s.mean()) / s.std(unbiased=False)


def rank_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Empirical quantile within one group: (rank + 0.5) / n ∈ (0, 1), ascending, ties share their average rank.
    A group of size 1 or with constant scores maps to 0.5."""
    s = scores.double()
    n = s.numel()
    if n == 0:
        return s
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() + 1) / 2  # mean of 0-based positions start..end-1
    return (avg_rank[inverse] + 0.5) / n


def normalize_groups(scores: torch.Tensor, groups: torch.Tensor, method: str = "rank") -> torch.Tensor:
    """Per-group normalisation before the global ranking (§2 "Selection"), float64 (U,), values in (0, 1).

    ``groups`` (U,) long: group id of each unit (tower × attn|mlp × layer). ``rank``: :func:`rank_normalize`.
    ``zscore``: Φ(:func:`zscore`) (DECISION: mapped through the standard normal CDF, the parametric analogue of
    the rank quantile, so the result is positive as the S/ΔF ratio of :func:`knapsack_select` requires).
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {NORMALIZATIONS}")
    if scores.shape != groups.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and groups {tuple(groups.shape)} must be the same (U,)")
    out = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
    for g in torch.unique(groups).tolist():
        idx = (groups == g).nonzero(as_tuple=True)[0]
        if method == "rank":
            out[idx] = rank_normalize(scores[idx])
        else:
            out[idx] = 0.5 * (1.0 + torch.erf(zscore(scores[idx]) / math.sqrt(2.0)))
    return out


SELECTIONS = ("per-flop", "layer-rank", "kind-rank", "kind-zscore")
"""Unit-selection rules (method.md §2 "Selection", REVISED). ``per-flop`` is the first rule: the score
normalised per layer group, divided by the unit's FLOPs ΔF_i — size decides (a head costs ~50x a neuron). The
size-blind rules normalise the score *density* S_i/ΔF_i inside groups of one unit kind, so that importance decides
which units go and ΔF only how many fill the step: ``layer-rank`` (rank within tower x kind x layer),
``kind-rank`` (rank within tower x kind, across layers) and ``kind-zscore`` (standardised within tower x kind:
keeps magnitude information across layers)."""


def selection_keys(
    scores: torch.Tensor,
    costs: torch.Tensor,
    layer_groups: torch.Tensor,
    kind_groups: torch.Tensor,
    rule: str,
    normalization: str = "rank",
) -> torch.Tensor:
    """Sort keys (U,) float64 for :func:`greedy_fill`: units with the lowest key are pruned first.

    ``scores`` (U,) ≥ 0 are the units' importances S_i, ``costs`` (U,) > 0 their FLOPs ΔF_i; ``layer_groups`` /
    ``kind_groups`` (U,) long ids of the tower x kind x layer and tower x kind groups. ``normalization`` is the
    per-layer-group normaliser of the ``per-flop`` rule only. See :data:`SELECTIONS`.
    """
    if rule not in SELECTIONS:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTIONS}")
    s = check_finite(scores.double(), "selection scores")
    c = check_finite(costs.double(), "selection costs")
    if bool((s < 0).any()):
        raise ValueError("unit scores must be >= 0")
    if bool((c <= 0).any()):
        raise ValueError("unit costs (ΔF) must be > 0")
    if rule == "per-flop":
        return normalize_groups(s, layer_groups, normalization) / c
    density = s / c
    if rule == "layer-rank":
        return normalize_groups(density, layer_groups, "rank")
    if rule == "kind-rank":
        return normalize_groups(density, kind_groups, "rank")
    out = torch.empty_like(density)  # kind-zscore: raw standardised density (order only; may be negative)
    for g in torch.unique(kind_groups).tolist():
        idx = (kind_groups == g).nonzero(as_tuple=True)[0]
        out[idx] = zscore(density[idx])
    return out


def greedy_fill(
    keys: torch.Tensor,
    costs: torch.Tensor,
    target: float,
    selected: torch.Tensor,
    groups: torch.Tensor,
    floors: torch.Tensor,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Take units in ascending ``keys`` order until their FLOPs reach ``target``. Returns ``(new_selected, removed)``.

    Candidates are the ``eligible`` (default: all) units not yet ``selected``, sorted by ``keys`` (U,) ascending,
    ties by lower index; ``costs`` (U,) ΔF_i > 0 for candidates. The last unit taken may overshoot ``target``
    (DECISION: no skipping to fit). A unit is skipped if taking it would leave its group (``groups`` (U,) long ids
    0..G-1) with fewer than ``floors[g]`` unselected units (``floors`` (G,) ints). Selection is monotone:
    ``new_selected ⊇ selected``. ``removed`` is the FLOPs of the newly selected units only; it is below ``target``
    when candidates or floors run out.
    """
    u = keys.numel()
    if not (keys.shape == costs.shape == selected.shape == groups.shape == (u,)):
        raise ValueError("keys, costs, selected and groups must all be (U,)")
    selected = selected.bool()
    eligible = torch.ones_like(selected) if eligible is None else eligible.bool()
    groups = groups.long()
    n_groups = int(floors.numel())
    if u and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"group ids must lie in [0, {n_groups}) (one floor per group)")
    if n_groups and int(floors.min()) < 0:
        raise ValueError("floors must be >= 0")
    cand = (eligible & ~selected).nonzero(as_tuple=True)[0]
    new_selected = selected.clone()
    if target <= 0 or cand.numel() == 0:
        return new_selected, 0.0
    k = check_finite(keys[cand].double(), "selection keys")
    c = check_finite(costs[cand].double(), "selection costs")
    if bool((c <= 0).any()):
        raise ValueError("costs (ΔF) of candidate units must be > 0")
    order = torch.sort(k, stable=True).indices  # stable: ties keep ascending unit index
    cand, c = cand[order], c[order]
    # floors: in group g at most (kept_g - floor_g) candidates may go; skipping a unit at its group's floor and
    # continuing is the same as keeping, per group, only the first `capacity` candidates in greedy order.
    size = torch.bincount(groups, minlength=n_groups)
    kept = size - torch.bincount(groups[selected], minlength=n_groups)
    capacity = (kept - floors.long().to(kept.device)).clamp_min(0)
    g = groups[cand]
    by_group = torch.sort(g, stable=True).indices
    counts = torch.bincount(g, minlength=n_groups)
    starts = counts.cumsum(0) - counts
    rank_in_group = torch.empty_like(g)
    rank_in_group[by_group] = torch.arange(g.numel(), device=g.device) - starts[g[by_group]]
    allowed = rank_in_group < capacity[g]
    cand, c = cand[allowed], c[allowed]
    before = c.cumsum(0) - c  # FLOPs removed before taking each allowed candidate
    take = before < target
    new_selected[cand[take]] = True
    return new_selected, float(c[take].sum())


def knapsack_select(
    scores: torch.Tensor,
    costs: torch.Tensor,
    target: float,
    selected: torch.Tensor,
    groups: torch.Tensor,
    floors: torch.Tensor,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The first selection rule (``per-flop``): :func:`greedy_fill` by S_i / ΔF_i ascending, where ``scores``
    (U,) ≥ 0 are already normalised per group (:func:`normalize_groups`) and ``costs`` (U,) ΔF_i > 0."""
    if not (scores.shape == costs.shape == selected.shape):
        raise ValueError("scores, costs and selected must all be (U,)")
    cand = ~selected.bool() & (torch.ones_like(selected.bool()) if eligible is None else eligible.bool())
    s = check_finite(scores[cand].double(), "knapsack scores")
    c = check_finite(costs[cand].double(), "knapsack costs")
    if bool((s < 0).any()):
        raise ValueError("knapsack scores must be >= 0 (normalise with normalize_groups)")
    if bool((c <= 0).any()):
        raise ValueError("knapsack costs (ΔF) of candidate units must be > 0")
    keys = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    keys[cand] = s / c
    return greedy_fill(keys, costs, target, selected, groups, floors, eligible)
