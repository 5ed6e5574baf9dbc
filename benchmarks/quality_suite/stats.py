"""Statistics of the quality suite: t-intervals, per-seed paired differences, the headline comparisons, and where
a run's removed FLOPs came from."""

from __future__ import annotations

import itertools
import math
import statistics

from comp_vlm.schedule import TOKEN_MODE_PARTS

from .arms import NAIVE_JOINT, SINGLE_MODE, base_name, label_of, order_key, suite_of


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (nan for fewer than 2 values)."""
    from scipy.stats import t as student_t  # optional dependency, only for the report

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired(records: list[dict], ratio: float, a: str, b: str) -> list[float]:
    """Per-seed differences a - b (arm labels) at ``ratio`` over the seeds where both reached it, within a suite."""
    keyed = {(suite_of(r), label_of(r), r["seed"]): r for r in records if r["ratio"] == ratio and r["reached"]}
    return [keyed[(suite, a, seed)]["metric"] - rec["metric"]
            for (suite, label, seed), rec in sorted(keyed.items()) if label == b and (suite, a, seed) in keyed]


def arm_mean(records: list[dict], ratio: float, label: str) -> float:
    rows = [r["metric"] for r in records if label_of(r) == label and r["ratio"] == ratio and r["reached"]]
    return statistics.fmean(rows) if rows else -math.inf


def labels_of(items: list[dict]) -> list[str]:
    return sorted({label_of(x) for x in items}, key=order_key)


def best_rule(records: list[dict], ratio: float, name: str) -> str | None:
    """The label of arm ``name`` under its best unit-selection rule at ``ratio`` (highest mean; None: unreached)."""
    reached = [x for x in labels_of(records) if base_name(x) == name and arm_mean(records, ratio, x) > -math.inf]
    return max(reached, key=lambda x: arm_mean(records, ratio, x)) if reached else None


def delta(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return ""
    m, h = mean_ci(diffs)
    return f"{m:+.2f} ± {h:.2f}"


def verdict(diffs: list[float]) -> str:
    m, h = mean_ci(diffs)
    return "CI excludes 0" if m - h > 0 or m + h < 0 else "CI includes 0"


def headline(records: list[dict], ratio: float, arm: str = "comp") -> list[str]:
    """``arm`` (CoMP) vs the best single-mode arm and vs the best naive joint arm (best = highest mean at ``ratio``
    over the arms and their selection rules)."""
    lines = []
    for label, group in (("best single-mode arm", SINGLE_MODE), ("best naive joint arm", NAIVE_JOINT)):
        present = [x for x in labels_of(records) if base_name(x) in group and arm_mean(records, ratio, x) > -math.inf]
        if not present or arm_mean(records, ratio, arm) == -math.inf:
            continue
        best = max(present, key=lambda g: arm_mean(records, ratio, g))
        diffs = paired(records, ratio, arm, best)
        if len(diffs) < 2:
            continue
        m, h = mean_ci(diffs)
        lines.append(f"- at {ratio}: {arm} − {label} ({best}) = **{m:+.2f} ± {h:.2f}** R@1 points "
                     f"(n = {len(diffs)} paired seeds; {verdict(diffs)})")
    return lines


#: the report's columns of where FLOPs went; ``removed_by`` parts (``tower/kind``) sum into them by kind
REMOVED_PARTS = ("heads", "neurons", "vision_tokens", "text_tokens")
#: stage logs from before parts were keyed by tower: token parts name their tower, heads and neurons do not
LEGACY_PARTS = {"vision_tokens": TOKEN_MODE_PARTS["T_v"], "text_tokens": TOKEN_MODE_PARTS["T_l"]}
TOKEN_COLUMNS = {part: column for column, part in LEGACY_PARTS.items()}


def tower_kind(removed_by: dict[str, float]) -> dict[str, float]:
    """A stage's ``removed_by`` with old keys mapped to ``tower/kind`` ones where they name a tower."""
    return {LEGACY_PARTS.get(part, part): value for part, value in removed_by.items()}


def column_of(part: str) -> str:
    """The report column a ``removed_by`` part sums into: its token column, else its kind ("text/heads": heads;
    kinds other than heads and neurons, e.g. P_c's cross_heads, count only in ``params``)."""
    return TOKEN_COLUMNS.get(part, part.rpartition("/")[2])


def logged_removals(stage: dict, ratio: str) -> list[dict[str, float]] | None:
    """The stages' ``removed_by`` (``tower/kind`` keys) up to the ``ratio`` snapshot; None where the run did not
    reach ``ratio`` or a stage did not log it."""
    last = snapshot_position(stage, ratio)
    if last is None:
        return None
    removed_by = (stage.get("removed_by") or [None] * (last + 1))[:last + 1]
    return None if any(x is None for x in removed_by) else [tower_kind(x) for x in removed_by]


def removed_by_tower(stage: dict, ratio: str = "0.8") -> dict[str, float] | None:
    """Fractions of the dense FLOPs removed up to the ``ratio`` snapshot per ``tower/kind`` part; None where the
    run did not reach ``ratio`` or its log does not name every part's tower (older logs)."""
    logged = logged_removals(stage, ratio)
    if logged is None or any("/" not in part for x in logged for part in x):
        return None
    out: dict[str, float] = {}
    for part, value in itertools.chain.from_iterable(x.items() for x in logged):
        out[part] = out.get(part, 0.0) + value
    return out


def snapshot_position(stage: dict, ratio: str) -> int | None:
    """Position in a stage record's lists of the last stage before the ``ratio`` snapshot (None: not reached).
    Logs without snapshot stages: the first stage that keeps at most 1 - ratio (the engine's snapshot rule)."""
    if "snapshot_stage" in stage:
        last = stage["snapshot_stage"].get(ratio)
        positions = [i for i, s in enumerate(stage["stage"]) if last is not None and s <= last]
        return positions[-1] if positions else None
    return next((i for i, kept in enumerate(stage["flops_kept"]) if kept <= 1 - float(ratio) + 1e-9), None)


def flops_went_where(stage: dict, ratio: str = "0.8") -> dict[str, float | None] | None:
    """Fractions of the dense FLOPs removed up to the ``ratio`` snapshot by heads, neurons, vision tokens and text
    tokens (the stages' ``removed_by``, summed over towers), with ``params`` every unit kind's (heads + neurons,
    and e.g. P_c's cross-attention heads). A log without ``removed_by``
    attributes each stage's removal by its mode: T_v / T_l to vision / text tokens, the rest to ``params`` (heads
    and neurons then None). None where the run did not reach ``ratio``."""
    last = snapshot_position(stage, ratio)
    if last is None:
        return None
    logged = logged_removals(stage, ratio)
    if logged is not None:
        parts: dict[str, float | None] = dict.fromkeys(REMOVED_PARTS, 0.0)
        params = 0.0
        for part, value in itertools.chain.from_iterable(x.items() for x in logged):
            column = column_of(part)
            if column in parts:
                parts[column] += value
            params += 0.0 if part in TOKEN_COLUMNS else value
        parts["params"] = params
        return parts
    kept = [1.0] + list(stage["flops_kept"])
    steps = stage.get("flops_removed_step") or [a - b for a, b in itertools.pairwise(kept)]
    out = {"heads": None, "neurons": None, "params": 0.0, "vision_tokens": 0.0, "text_tokens": 0.0}
    for mode, removed in zip(stage["modes"][:last + 1], steps[:last + 1]):
        out[TOKEN_COLUMNS[TOKEN_MODE_PARTS[mode]] if mode in TOKEN_MODE_PARTS else "params"] += removed
    return out
