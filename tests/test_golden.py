"""Regression guard for refactors: a short seeded CoMP search on the tiny CLIP must reproduce the committed golden
record (stage modes and FLOPs, kept units, token keep ratios, validation losses and test metrics).

The record was written by the code named in its ``commit`` field. A change that is *meant* to alter the search
regenerates it (and says so in its commit message):

    python tests/test_golden.py --write
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_clip import fresh, quick, tiny_setup
from tolerances import installed_versions, scalar_tolerance

from comp_vlm import prune
from comp_vlm.tasks.retrieval import RetrievalTask

GOLDEN = Path(__file__).parent / "fixtures" / "golden_prune.json"
# floats: to tests/tolerances.py's same-install tolerance when the record's library versions are installed, else to its
# recorded-elsewhere tolerance (a new transformers moves stage costs in the 5th digit); everything else exactly


def golden_run() -> dict:
    """The seeded run the record describes: comp to 0.6 with a 0.3 snapshot, every default search option."""
    cfg, _, loaders = tiny_setup()
    config = quick(ratio=0.6, snapshots=(0.3,), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the record's thread count: reductions split across threads round differently
    try:
        res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, config, test_data=loaders.test)
    finally:
        torch.set_num_threads(threads)
    stages = [{k: s[k] for k in ("mode", "chosen", "flops_kept", "b_before", "b_after", "cost", "R", "token_level")}
              for s in res.stage_log]
    snapshots = {}
    for ratio, (_, recipe) in sorted(res.snapshots.items()):
        snapshots[str(ratio)] = {
            "flops_kept": recipe.flops_kept,
            "towers": {name: [{"heads": list(lay.kept("head")), "neurons": list(lay.kept("neuron")),
                               "keep_ratio": lay.keep_ratio} for lay in layers]
                       for name, layers in recipe.towers.items()},  # through accessors: any recipe format
            "metrics": {k: float(v) for k, v in res.metrics[ratio].items()},
        }
    return {"stages": stages, "snapshots": snapshots}


def _close(actual, expected, path: str = "", tol: dict | None = None) -> list[str]:
    """Paths where ``actual`` differs from ``expected`` (floats to ``tol``, everything else exactly)."""
    tol = tol or scalar_tolerance(installed_versions())
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(actual) != set(expected):
            return [f"{path}: keys {sorted(actual)} != {sorted(expected)}"]
        return [d for k in expected for d in _close(actual[k], expected[k], f"{path}.{k}", tol)]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{path}: length {len(actual)} != {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in _close(a, e, f"{path}[{i}]", tol)]
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        ok = actual == pytest.approx(expected, **tol)
        return [] if ok else [f"{path}: {actual!r} != {expected!r}"]
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


def test_golden_search_is_reproduced():
    expected = json.loads(GOLDEN.read_text())
    tol = scalar_tolerance(expected.get("versions"))
    diffs = _close(golden_run(), expected["run"], tol=tol)
    assert not diffs, (f"{len(diffs)} differences from {GOLDEN.name} (commit {expected['commit'][:10]}, "
                       f"versions {expected.get('versions')}, tolerance {tol}): {diffs[:8]}")


def test_comparison_catches_a_changed_unit_and_a_drifted_float():
    expected = {"a": [1, 2, 3], "b": 0.5}
    assert _close({"a": [1, 2, 3], "b": 0.5 * (1 + 1e-7)}, expected) == []
    assert _close({"a": [1, 2, 4], "b": 0.5}, expected) == [".a[2]: 4 != 3"]
    assert _close({"a": [1, 2, 3], "b": 0.51}, expected) == [".b: 0.51 != 0.5"]
    # recorded elsewhere: a 5th-digit drift passes, a 3rd-digit one does not
    assert _close({"b": 0.5 * (1 + 2e-5)}, {"b": 0.5}, tol=scalar_tolerance(None)) == []
    assert _close({"b": 0.5 * (1 + 2e-5)}, {"b": 0.5}, tol=scalar_tolerance(installed_versions())) != []
    assert _close({"b": 0.505}, {"b": 0.5}, tol=scalar_tolerance(None)) == [".b: 0.505 != 0.5"]


if __name__ == "__main__" and "--write" in sys.argv:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent).stdout.strip()
    GOLDEN.write_text(json.dumps({"commit": commit, "versions": installed_versions(), "run": golden_run()}, indent=1)
                      + "\n")
    print(f"wrote {GOLDEN}")
