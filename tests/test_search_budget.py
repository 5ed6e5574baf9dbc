"""The pure planning helpers of comp_vlm.search.budget that the Pruner uses: floors, reachable ratios, per-site
keeps, the token-level bisection and the exhaustion rules, on hand-computed cases."""

from __future__ import annotations

import pytest

from comp_vlm.search import budget


def test_unit_floor_neurons_share_heads_count():
    assert budget.unit_floor(True, 37, 1, 0.05) == 2  # ceil(1.85)
    assert budget.unit_floor(True, 10, 1, 0.05) == 1  # ceil(0.5)
    assert budget.unit_floor(True, 4, 1, 0.0) == 1  # never below one neuron
    assert budget.unit_floor(False, 12, 2, 0.5) == 2  # attention kinds keep head_floor, whatever the share
    assert budget.unit_floor(False, 8, 1, 0.5) == 1


def test_floor_level_of_each_plan():
    assert budget.floor_level("linear", 0.1) == 0.1
    assert budget.floor_level("geometric", 0.2) == 0.2
    assert budget.floor_level("legacy", 0.1) == budget.LEGACY_FLOOR_LEVEL  # one token per site, whatever the floor


def test_reachable_targets_split_at_the_floor():
    assert budget.reachable_targets([0.3, 0.6, 0.8], 0.3) == ([0.3, 0.6], [0.8])  # 0.8 would keep 0.2 < 0.3
    assert budget.reachable_targets([0.6], 0.4) == ([0.6], [])  # exactly at the floor: reachable
    assert budget.reachable_targets([0.5, 0.7], 0.6) == ([], [0.5, 0.7])


def test_target_reached_is_the_snapshot_rule():
    assert budget.target_reached(0.2, 0.8)  # 1 - 0.8 rounds below 0.2: the tolerance absorbs it
    assert budget.target_reached(0.45, 0.5)
    assert not budget.target_reached(0.21, 0.8)


def test_site_keeps_spread_the_pyramid_over_the_site_layers():
    keeps = budget.site_keeps([1, 3, 5], 0.4, "linear")  # cumulative 0.8, 0.6, 0.4
    assert list(keeps) == [1, 3, 5]
    assert list(keeps.values()) == pytest.approx([0.8, 0.75, 2 / 3])
    assert budget.site_keeps([], 0.4, "linear") == {}


def test_bisect_level_finds_the_step_or_stops_short():
    def kept_at(q: float) -> float:  # FLOPs kept rise linearly with the level: 0.5 at q = 0, 1.0 at q = 1
        return 0.5 + 0.5 * q

    level, short = budget.bisect_level(kept_at, 0.2, 1.0, 0.75)  # 0.75 kept at q = 0.5
    assert not short and 0.5 - 1e-9 < level <= 0.5  # from below: the step is never undershot
    assert budget.bisect_level(kept_at, 0.2, 1.0, 0.55) == (0.2, True)  # q = 0.2 still keeps 0.6


def test_token_floor_limited_unless_the_stage_bound_stopped_it():
    assert budget.token_floor_limited(False, 0.3, "linear", 0.1)  # no shortfall
    assert not budget.token_floor_limited(True, 0.3, "linear", 0.1)  # short above the floor: the stage bound
    assert budget.token_floor_limited(True, 0.1, "linear", 0.1)  # short at the floor
    assert budget.token_floor_limited(True, 0.5, "legacy", 0.1)  # legacy has no stage bound


def test_mode_exhausted_and_short_of_step():
    assert budget.mode_exhausted(0.0, 0.04, False, 0.25)  # nothing left to remove
    assert budget.mode_exhausted(0.005, 0.04, True, 0.25)  # at the floors, below 0.25 x 0.04 = 0.01
    assert not budget.mode_exhausted(0.005, 0.04, False, 0.25)  # the stage bound, not the floors, held it back
    assert not budget.mode_exhausted(0.02, 0.04, True, 0.25)
    assert budget.short_of_step(0.03, 0.04, True)
    assert not budget.short_of_step(0.03, 0.04, False)
    assert not budget.short_of_step(0.03997, 0.04, True)  # within 0.1% of the step (0.03996)
