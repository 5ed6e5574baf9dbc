"""FLOPs budget of the staged search, pure numbers (method.md §1 keep ratios, §3 steps, slivers and floors).

- Token plans: a token mode's state is one *level* q, the cumulative keep of the prunable tokens at its deepest
  site. :func:`pyramid_keep_ratios` turns q into per-site keep ratios r_j (each site keeps r_j of the prunable
  tokens that reach it) whose cumulative keep c_j = r_0 ... r_j forms a pyramid: c_j decreases with depth and
  c_last = q. :func:`token_level_range` bounds one stage (no site loses more than ``max_cut`` of what is left
  there) and the mode as a whole (every site keeps at least ``floor`` of the tokens entering the tower).
  :func:`bisect_level` finds the level of one stage's FLOPs step within that range.
- Steps: :func:`next_step` plans the FLOPs one stage removes, cut short to land on the next snapshot, and enlarged
  so that no remainder below the sliver bound is left before it; :func:`param_stage_step` bounds a parameter
  mode's stage by what the mode can still remove; :func:`mode_exhausted` and :func:`short_of_step` say when a mode
  at its floors leaves the search.
- Floors: :func:`unit_floor` (units a layer keeps), :func:`floor_level` (a token mode's lowest level),
  :func:`reachable_targets` (the ratios a strategy's floors allow).
- Training steps: :func:`lr_factor`, :func:`nominal_search_steps`, :func:`finetune_steps_for`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

TOKEN_PLANS = ("linear", "geometric", "legacy")
"""``linear``: c_j = 1 - (1 - q)(j + 1)/n (shallow sites keep most); ``geometric``: c_j = q^((j + 1)/n), every site
keeps the same share of what reaches it (PDrop's pyramid); ``legacy``: the first rule, every site keeps q of what
reaches it (c_j = q^(j + 1): compounds), with no stage bound and a one-token floor."""

LEGACY_MIN_LEVEL = 1e-6  # the first rule's lower end of the bisection (a site then keeps a single token)
LEGACY_FLOOR_LEVEL = 1e-9  # the first rule's floor: every site keeps one token


def cumulative_keep(level: float, n_sites: int, plan: str) -> list[float]:
    """c_j, the share of a tower's prunable tokens still present after site j, for j = 0..n_sites-1."""
    if plan not in TOKEN_PLANS:
        raise ValueError(f"unknown token plan {plan!r}; expected one of {TOKEN_PLANS}")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"token level must lie in (0, 1], got {level}")
    if plan == "legacy":
        return [level ** (j + 1) for j in range(n_sites)]
    if plan == "linear":
        return [1.0 - (1.0 - level) * (j + 1) / n_sites for j in range(n_sites)]
    return [level ** ((j + 1) / n_sites) for j in range(n_sites)]


def pyramid_keep_ratios(level: float, n_sites: int, plan: str) -> list[float]:
    """Per-site keep ratios r_j = c_j / c_{j-1} (c_{-1} = 1) of :func:`cumulative_keep`; all in (0, 1]."""
    if plan == "legacy":
        cumulative_keep(level, n_sites, plan)  # validates
        return [level] * n_sites
    c = cumulative_keep(level, n_sites, plan)
    return [min(1.0, c[j] / (c[j - 1] if j else 1.0)) for j in range(n_sites)]


def token_level_range(current: float, plan: str, floor: float, max_cut: float) -> tuple[float, float]:
    """The levels one stage may move a token mode to: ``(lowest, current)``.

    For the pyramid plans c_j(q') / c_j(q) is smallest at the deepest site, where it is q'/q, so "no site loses
    more than ``max_cut`` of what is left there" is q' ≥ (1 - max_cut) q, and "every site keeps ≥ ``floor`` of
    the tokens entering the tower" is q' ≥ floor (c_j ≥ c_last = q'). ``legacy`` ignores both (first rule).
    """
    if plan == "legacy":
        return min(LEGACY_MIN_LEVEL, current), current
    if not 0.0 < floor <= 1.0 or not 0.0 < max_cut <= 1.0:
        raise ValueError(f"token floor and max cut must lie in (0, 1], got {floor}, {max_cut}")
    return min(current, max(floor, (1.0 - max_cut) * current)), current


def next_step(kept: float, next_target_kept: float, step: float, sliver: float) -> float:
    """FLOPs fraction the next stage removes (method.md §3): the fixed ``step``, cut short to land exactly on the
    next snapshot (``next_target_kept``, a FLOPs-kept fraction), and enlarged to the whole remainder when less than
    ``sliver`` (a fraction of ``step``) would otherwise be left before that snapshot."""
    remaining = kept - next_target_kept
    if remaining <= step + sliver * step:
        return max(remaining, 0.0)
    return step


def param_stage_step(step: float, removable: float, max_cut: float, flops_step: float, sliver: float,
                     remaining: float = math.inf) -> tuple[float, bool]:
    """FLOPs fraction a stage of a parameter mode asks for, and whether the stage bound cut it.

    ``step`` is the planned step (:func:`next_step`), ``removable`` what the mode can still remove above its
    floors, ``remaining`` what is left before the next snapshot. The bound ``max_cut`` x ``removable`` acts where it
    is below both ``step`` and ``removable`` (at ``max_cut`` 1 it never does: the floors stop the stage first, as
    without a bound). A bounded step below the sliver bound (``sliver`` x ``flops_step``) is not taken: the stage
    asks for ``step``, and the floors stop it at the whole remainder (``step`` stays the cap), after which
    :func:`mode_exhausted` / :func:`short_of_step` retire the mode. A bounded step is cut further, not below the
    sliver bound, so as to leave at least the sliver bound before the snapshot."""
    bounded = max_cut * removable
    bound = sliver * flops_step
    if bounded >= min(step, removable) or bounded < bound:
        return step, False
    return max(min(bounded, remaining - bound), bound), True


def is_sliver(removed: float, step: float, sliver: float) -> bool:
    """A stage whose realised ΔF is below the sliver bound: its cost is too noisy to update MPS history."""
    return removed < sliver * step


def site_keeps(sites: Sequence[int], level: float, plan: str) -> dict[int, float]:
    """Keep ratio per site (by layer index) of a tower whose token mode is at ``level``
    (:func:`pyramid_keep_ratios`); empty without sites."""
    if not sites:
        return {}
    return dict(zip(sites, pyramid_keep_ratios(level, len(sites), plan)))


def bisect_level(kept_at: Callable[[float], float], lo: float, hi: float, goal: float,
                 iterations: int = 40) -> tuple[float, bool]:
    """The token level of one stage: the highest level in ``[lo, hi]`` (by bisection) whose FLOPs kept
    ``kept_at(level)`` (increasing in the level) is at most ``goal``. Returns ``(level, short)``; ``short``: even
    ``lo`` keeps more than ``goal``, and the level is ``lo``."""
    if kept_at(lo) > goal:
        return lo, True
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if kept_at(mid) <= goal:
            lo = mid
        else:
            hi = mid
    return lo, False


def token_floor_limited(short: bool, level: float, plan: str, floor: float) -> bool:
    """Whether a token stage's shortfall (if ``short``) is the mode's floor's: not when the per-stage bound stopped
    it at ``level`` above the floor (``legacy`` has no stage bound)."""
    return not (short and plan != "legacy" and level > floor + 1e-12)


def mode_exhausted(removed: float, requested: float, floor_limited: bool, min_fraction: float) -> bool:
    """A planned stage that removes nothing, or, stopped by the floors, less than ``min_fraction`` of the
    ``requested`` step: its mode is exhausted and the stage does not run."""
    return removed <= 1e-12 or (floor_limited and removed < min_fraction * requested)


def short_of_step(removed: float, requested: float, floor_limited: bool) -> bool:
    """A finished stage that removed less than its ``requested`` step because the floors stopped it: its mode is
    exhausted from now on."""
    return removed < 0.999 * requested and floor_limited


def unit_floor(share: bool, dense: int, head_floor: int, neuron_floor: float) -> int:
    """Units of a kind a layer keeps at least: ``neuron_floor`` of its ``dense`` units (>= 1) for a kind with a
    ``share`` floor (MLP neurons, :attr:`comp_vlm.adapters.units.UnitSpec.share_floor`), else ``head_floor``."""
    if share:
        return max(1, math.ceil(neuron_floor * dense))
    return head_floor


def floor_level(plan: str, floor: float) -> float:
    """The lowest level of a token mode: ``floor``, or for ``legacy`` one token at every site."""
    return LEGACY_FLOOR_LEVEL if plan == "legacy" else floor


def reachable_targets(targets: Sequence[float], floor_kept: float) -> tuple[list[float], list[float]]:
    """``targets`` (ratios of FLOPs removed) split into those a strategy whose floors keep ``floor_kept`` of the
    dense FLOPs can reach, and the rest."""
    reachable = [t for t in targets if (1 - t) >= floor_kept - 1e-9]
    return reachable, [t for t in targets if t not in reachable]


def target_reached(kept: float, target: float) -> bool:
    """Whether a search keeping ``kept`` of the dense FLOPs has removed the ratio ``target`` (the snapshot rule)."""
    return kept <= (1 - target) + 1e-9


def lr_factor(step: int, total: int, schedule: str, warmup: float = 0.0) -> float:
    """Learning-rate multiplier at 0-based ``step`` of ``total``: ``constant`` (1), or ``cosine``: a linear warm-up
    over the first ``warmup`` share of the steps, then cosine decay to 0 at ``total`` (held at 0 beyond)."""
    if schedule == "constant" or total <= 0:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    ramp = int(warmup * total)
    if step < ramp:
        return (step + 1) / ramp
    progress = min(1.0, (step - ramp) / max(1, total - ramp))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def nominal_search_steps(ratio: float, step: float, stage_steps: int) -> int:
    """Training steps of a search that removes exactly one ``step`` per stage until ``ratio`` is removed."""
    return math.ceil(ratio / step - 1e-9) * stage_steps


def finetune_steps_for(ratio: float, search_steps: int, finetune_steps: int, budget: str, step: float,
                       stage_steps: int, slack_stages: int = 0) -> int:
    """Fine-tuning steps of a snapshot at ``ratio`` reached after ``search_steps``: ``fixed`` gives every snapshot
    ``finetune_steps``; ``equal-total`` tops it up so that search + fine-tuning equals the nominal search plus
    ``slack_stages`` stages plus ``finetune_steps``: every arm trains as long, an arm that needed fewer stages
    fine-tunes longer, and one needing up to ``slack_stages`` extra stages still gets ``finetune_steps`` (never
    below 0)."""
    if budget == "fixed":
        return finetune_steps
    total = nominal_search_steps(ratio, step, stage_steps) + slack_stages * stage_steps + finetune_steps
    return max(0, total - search_steps)


__all__ = ["TOKEN_PLANS", "bisect_level", "cumulative_keep", "finetune_steps_for", "floor_level", "is_sliver",
           "lr_factor", "mode_exhausted", "next_step", "nominal_search_steps", "param_stage_step",
           "pyramid_keep_ratios", "reachable_targets", "short_of_step", "site_keeps", "target_reached",
           "token_floor_limited", "token_level_range", "unit_floor"]
