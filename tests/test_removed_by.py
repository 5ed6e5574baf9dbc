"""Removed-FLOPs bookkeeping by tower and unit kind (issue 20, item 15): the engine's ``removed_by`` keys, and the
quality report reading them (and the older, kind-only keys of committed stage logs)."""

from __future__ import annotations

import pytest
import torch
from contract.families import registered
from quality_suite import report, stats
from test_protocol_units import PcCLIPAdapter, PcCLIPModel
from tiny_clip import fresh, quick, tiny_setup

from comp_vlm import Pruner
from comp_vlm.tasks.retrieval import RetrievalTask


def ranked_pruner(model) -> Pruner:
    """A pruner on ``model`` whose unit scores rank units by index (no statistics needed)."""
    _, _, loaders = tiny_setup()
    torch.manual_seed(0)
    pruner = Pruner(model, RetrievalTask(), loaders.val, quick(ratio=0.5, dead_compute=False))
    pruner.collector.unit_scores = lambda key, weight, width: torch.arange(weight.shape[1] // width).double()
    return pruner


def test_a_param_stage_is_booked_by_tower_and_kind():
    cfg, _, _ = tiny_setup()
    pruner = ranked_pruner(fresh(cfg))
    before = pruner.flops_kept()
    plan = pruner._plan_params("P_v", 0.2 * pruner.dense_flops)
    assert plan.units and set(plan.removed_by) <= {"vision/heads", "vision/neurons"}
    booked = {f"vision/{kind}s" for kind, _, _ in plan.units}
    assert set(plan.removed_by) == booked
    assert sum(plan.removed_by.values()) == pytest.approx(before - plan.flops_after)


@pytest.mark.parametrize(("mode", "part"), [("T_v", "vision/tokens"), ("T_l", "text/tokens")])
def test_a_token_stage_is_booked_under_its_tower(mode, part):
    cfg, _, _ = tiny_setup()
    pruner = ranked_pruner(fresh(cfg))
    before = pruner.flops_kept()
    plan = pruner._plan(mode)
    assert plan is not None and set(plan.removed_by) == {part}
    assert plan.removed_by[part] == pytest.approx(before - plan.flops_after)


def test_pc_share_shows_apart_from_the_text_towers_other_kinds():
    cfg, _, _ = tiny_setup()
    with registered(PcCLIPAdapter):
        pruner = ranked_pruner(PcCLIPModel._from_config(cfg))
        plan = pruner._plan_params("P_c", 0.05 * pruner.dense_flops)
    assert set(plan.removed_by) == {"text/neurons"}


NEW = [{"vision/heads": 0.1, "vision/neurons": 0.2, "text/heads": 0.05},
       {"vision/tokens": 0.3, "text/tokens": 0.05},
       {"text/cross_heads": 0.1, "text/neurons": 0.02},
       {"vision/heads": 0.5}]  # after the snapshot
OLD = [{"heads": 0.1, "neurons": 0.2, "vision_tokens": 0.0, "text_tokens": 0.0},
       {"heads": 0.0, "neurons": 0.0, "vision_tokens": 0.3, "text_tokens": 0.05}]


def staged(by: list[dict], strategy: str = "comp") -> dict:
    n = len(by)
    return {"strategy": strategy, "suite": "a", "arm": strategy, "stage": list(range(1, n + 1)),
            "modes": ["P_v"] * n, "flops_kept": [0.5] * n, "removed_by": by, "snapshot_stage": {"0.8": 3}}


def test_report_columns_sum_tower_kind_parts_by_kind():
    parts = stats.flops_went_where(staged(NEW))
    # heads over both towers; P_c's cross-attention heads count in params only
    assert parts == pytest.approx({"heads": 0.15, "neurons": 0.22, "params": 0.47, "vision_tokens": 0.3,
                                   "text_tokens": 0.05})
    assert stats.removed_by_tower(staged(NEW)) == pytest.approx(
        {"vision/heads": 0.1, "vision/neurons": 0.2, "text/heads": 0.05, "vision/tokens": 0.3,
         "text/tokens": 0.05, "text/cross_heads": 0.1, "text/neurons": 0.02})


def test_old_kind_only_keys_read_as_before_and_name_no_tower():
    old = staged(OLD)
    old["snapshot_stage"] = {"0.8": 2}
    assert stats.flops_went_where(old) == pytest.approx({"heads": 0.1, "neurons": 0.2, "params": 0.3,
                                                        "vision_tokens": 0.3, "text_tokens": 0.05})
    assert stats.tower_kind(OLD[1]) == {"heads": 0.0, "neurons": 0.0, "vision/tokens": 0.3, "text/tokens": 0.05}
    assert stats.removed_by_tower(old) is None  # heads and neurons of an old log have no tower
    assert report.tower_section([old], "##") == []


def test_tower_section_shows_each_part_and_each_towers_share():
    old = staged(OLD, "sjp")
    old["snapshot_stage"] = {"0.8": 2}
    lines = report.tower_section([staged(NEW), old], "##")
    header = [x for x in lines if x.startswith("| arm")]
    assert header == [("| arm | runs | text/cross_heads | text/heads | text/neurons | text/tokens | vision/heads "
                       "| vision/neurons | vision/tokens | text (all) | vision (all) |")]
    assert "| comp | 1 | 0.100 | 0.050 | 0.020 | 0.050 | 0.100 | 0.200 | 0.300 | 0.220 | 0.600 |" in lines
    assert not any(x.startswith("| sjp") for x in lines)
