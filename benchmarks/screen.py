"""Issue 24's screen: which search variant becomes comp's default. The rule (benchmarks/README.md, written before any
screen run) as code, and its report over the screen's quality records.

    python benchmarks/screen.py                 # after the screen runs: the table and the decision

Each variant is one quality-suite run of the comp arm at ratio 0.8 on seeds 0, 1, 2, on both worlds, recorded under
``--tag screen-<variant>-<world>`` (commands in benchmarks/README.md). A variant's score is the mean over the two
worlds of its mean paired difference (same seed) to today's comp in R@1 points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# simplest first: drop < fuse < merge, recovered < probe; the bound alone is simpler than the bound with a reducer
VARIANTS: dict[str, dict[str, object]] = {
    "today": {},
    "bound": {"param_max_cut": 0.5},
    "bound-fuse": {"param_max_cut": 0.5, "token_reducer": "fuse"},
    "bound-merge": {"param_max_cut": 0.5, "token_reducer": "merge"},
    "bound-merge-probe": {"param_max_cut": 0.5, "token_reducer": "merge", "cost_measure": "probe"},
}
WORLDS = ("synthetic", "emoji")
SEEDS = (0, 1, 2)
RATIO = 0.8
MARGIN = 0.5  # R@1 points: a variant within this of a simpler one loses to it


def score(differences: dict[str, list[float]]) -> float:
    """Mean over the worlds of the mean paired difference to today's comp (R@1 points)."""
    return statistics.fmean(statistics.fmean(d) for d in differences.values())


def decide(scores: dict[str, float], order: list[str] | tuple[str, ...] = tuple(VARIANTS),
           margin: float = MARGIN) -> str:
    """The rule. ``today`` scores 0 by definition. A variant within ``margin`` of any simpler variant (earlier in
    ``order``) loses to it, so a candidate must beat every simpler variant, ``today`` included, by more than
    ``margin``; of the candidates the highest score wins; with none, ``today`` stays."""
    scores = {**scores, "today": 0.0}
    ranked = [v for v in order if v in scores]
    candidates = [v for i, v in enumerate(ranked) if all(scores[v] > scores[u] + margin for u in ranked[:i])]
    return max(candidates, key=lambda v: scores[v]) if candidates else "today"


def paired_differences(results: Path, variant: str) -> dict[str, list[float]] | None:
    """Per world, variant − today at RATIO for each seed both recorded; None while a run is missing."""
    out: dict[str, list[float]] = {}
    for world in WORLDS:
        metrics = {}
        for name in (variant, "today"):
            path = results / f"quality-screen-{name}-{world}.json"
            records = json.loads(path.read_text()) if path.is_file() else []
            metrics[name] = {r["seed"]: r["metric"] for r in records
                             if r.get("arm") == "comp" and abs(r["ratio"] - RATIO) < 1e-9 and r.get("reached", True)}
        if not all(s in metrics[variant] and s in metrics["today"] for s in SEEDS):
            return None
        out[world] = [metrics[variant][s] - metrics["today"][s] for s in SEEDS]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    scores, missing = {}, []
    for variant in list(VARIANTS)[1:]:
        diffs = paired_differences(Path(args.results), variant)
        if diffs is None:
            missing.append(variant)
            continue
        scores[variant] = score(diffs)
        print(f"{variant:20s} " + "  ".join(f"{w} {statistics.fmean(d):+.2f}" for w, d in diffs.items())
              + f"  score {scores[variant]:+.2f}")
    if missing:
        print(f"not yet recorded: {', '.join(missing)} (no decision)", file=sys.stderr)
        return 1
    print(f"decision: {decide(scores)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
