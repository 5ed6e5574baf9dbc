"""Issue 24's decision rule (benchmarks/screen.py), on hand-made scores."""

from __future__ import annotations

import json

import pytest
from screen import RATIO, VARIANTS, decide, paired_differences, score


def test_the_highest_score_wins_when_no_simpler_variant_is_close():
    assert decide({"bound": 0.2, "bound-fuse": 1.0, "bound-merge": 3.0, "bound-merge-probe": 2.9}) == "bound-merge"


def test_a_variant_within_the_margin_of_a_simpler_one_loses_to_it():
    # merge 3.0 is within 0.5 of fuse 2.6, probe 3.4 within 0.5 of merge: both lose, fuse stays
    assert decide({"bound": 0.0, "bound-fuse": 2.6, "bound-merge": 3.0, "bound-merge-probe": 3.4}) == "bound-fuse"
    # probe 3.7 beats every simpler variant by more than 0.5
    assert decide({"bound": 0.0, "bound-fuse": 2.6, "bound-merge": 3.0, "bound-merge-probe": 3.7}) == "bound-merge-probe"
    # bound 2.0 and merge 3.0 both qualify (fuse 2.3 is within 0.5 of bound): the higher wins
    assert decide({"bound": 2.0, "bound-fuse": 2.3, "bound-merge": 3.0, "bound-merge-probe": 0.0}) == "bound-merge"


def test_today_stays_unless_a_variant_beats_it_by_more_than_the_margin():
    assert decide({"bound": -1.0, "bound-fuse": -0.2, "bound-merge": -3.0, "bound-merge-probe": -2.0}) == "today"
    assert decide({"bound": 0.1, "bound-fuse": 0.4, "bound-merge": 0.5, "bound-merge-probe": 0.3}) == "today"
    # merge beats today by more than 0.5 but is within 0.5 of bound (0.1), which itself does not beat today by 0.5
    assert decide({"bound": 0.1, "bound-fuse": 0.4, "bound-merge": 0.51, "bound-merge-probe": 0.3}) == "today"
    assert decide({"bound": 0.0, "bound-fuse": 0.0, "bound-merge": 0.51, "bound-merge-probe": 0.3}) == "bound-merge"


def test_the_order_is_simplest_first():
    assert list(VARIANTS) == ["today", "bound", "bound-fuse", "bound-merge", "bound-merge-probe"]


def test_score_is_the_mean_over_worlds_of_mean_paired_differences():
    assert score({"synthetic": [1.0, 2.0, 3.0], "emoji": [-1.0, 0.0, 4.0]}) == pytest.approx((2.0 + 1.0) / 2)


def test_paired_differences_read_the_screen_records(tmp_path):
    def write(variant, world, metrics):
        records = [{"arm": "comp", "ratio": RATIO, "seed": s, "metric": m, "reached": True} for s, m in metrics.items()]
        records.append({"arm": "comp", "ratio": 0.5, "seed": 0, "metric": 99.0, "reached": True})  # other ratio
        (tmp_path / f"quality-screen-{variant}-{world}.json").write_text(json.dumps(records))

    for world, base in (("synthetic", 80.0), ("emoji", 40.0)):
        write("today", world, {0: base, 1: base + 1, 2: base + 2})
        write("bound", world, {0: base + 1, 1: base + 1, 2: base + 5})
    assert paired_differences(tmp_path, "bound") == {"synthetic": [1.0, 0.0, 3.0], "emoji": [1.0, 0.0, 3.0]}
    assert paired_differences(tmp_path, "bound-fuse") is None  # not recorded yet: no decision
