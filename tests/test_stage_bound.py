"""The stage bound of a parameter mode (issue 24 item 1): ``param_max_cut`` bounds one stage to a share of what the
mode can still remove above its floors, a bounded step below the sliver bound takes the whole remainder, a mode
with nothing left is exhausted, and the stage log says when the bound acted."""

from __future__ import annotations

import json

import pytest
from quality_suite.arms import config_dict
from quality_suite.identity import suite_key
from test_cli import FAST, _prune_config, dense_dir, one_error_line  # noqa: F401 (dense_dir: a fixture)
from test_search_fixes import random_scores
from tiny_clip import fresh, quick, tiny_setup

import comp_vlm
from comp_vlm import ConfigError, Pruner, prune
from comp_vlm.cli import main
from comp_vlm.schedule import stage_cost
from comp_vlm.search import budget
from comp_vlm.tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


# ---- the step, hand-computed ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("step", "removable", "max_cut", "expected"), [
    (0.04, 0.50, 0.5, (0.04, False)),  # 0.25 above the step: the fixed step
    (0.04, 0.06, 0.5, (0.03, True)),  # half of 0.06 = 0.03 < 0.04, above the sliver bound 0.01: bounded
    (0.02, 0.03, 0.5, (0.015, True)),  # a step cut short to land on a snapshot is bounded the same way
    (0.04, 0.015, 0.5, (0.04, False)),  # 0.0075 < 0.01: the step is asked for, the floors stop it at the remainder
    (0.04, 0.50, 0.01, (0.04, False)),  # 0.005 < 0.01 with 0.5 left: flops_step stays the cap
    (0.04, 0.03, 1.0, (0.04, False)),  # max_cut 1: the floors, never the bound, stop the stage
    (0.04, 0.0, 0.5, (0.04, False)),  # nothing left above the floors
])
def test_param_stage_step_hand_computed(step, removable, max_cut, expected):
    got = budget.param_stage_step(step, removable, max_cut, 0.04, 0.25)
    assert got[0] == pytest.approx(expected[0]) and got[1] is expected[1]


@pytest.mark.parametrize(("step", "remaining", "removable", "expected"), [
    (0.04, 0.50, 0.06, 0.03),  # the snapshot is far: bounded as usual
    (0.03, 0.03, 0.05, 0.02),  # landing on a snapshot: 0.025 would leave 0.005, so 0.02 leaves the sliver bound
    (0.015, 0.015, 0.024, 0.01),  # 0.012 would leave 0.003: never below the sliver bound 0.01 (0.005 is left)
])
def test_a_bounded_step_leaves_at_least_a_sliver_before_a_snapshot(step, remaining, removable, expected):
    got, bounded = budget.param_stage_step(step, removable, 0.5, 0.04, 0.25, remaining)
    assert bounded and got == pytest.approx(expected)


def test_nothing_left_exhausts_and_a_small_remainder_is_taken_whole():
    step, bounded = budget.param_stage_step(0.04, 0.0, 0.5, 0.04, 0.25)
    assert budget.mode_exhausted(0.0, step, not bounded, 0.25)  # the floors remove nothing: exhausted
    step, bounded = budget.param_stage_step(0.04, 0.015, 0.5, 0.04, 0.25)
    # the floors stop the stage at the whole remainder 0.015: it runs (0.015 >= 0.25 x 0.04), then retires the mode
    assert not budget.mode_exhausted(0.015, step, not bounded, 0.25)
    assert budget.short_of_step(0.015, step, not bounded)


# ---- in the search ---------------------------------------------------------------------------------------------------
def test_planning_a_mode_stage_after_stage_ends_at_its_floors(setup):
    """P_l with bound 0.3: every bounded stage asks for 30% of what is left, the last one takes the whole
    remainder, and then the mode has nothing left and is refused (exhausted)."""
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.8, param_max_cut=0.3, flops_step=0.1))
    random_scores(pruner, 0)  # unit scores without training forwards
    kinds = []
    for _ in range(30):
        removable = pruner._param_removable("P_l")
        plan = pruner._plan("P_l")
        if plan is None:
            break
        if plan.unbounded is not None:
            kinds.append("bounded")
            assert plan.requested == pytest.approx(0.3 * removable)
            assert plan.unbounded > plan.requested and not plan.floor_limited
            assert plan.flops_before - plan.flops_after >= plan.requested - 1e-12
        else:
            kinds.append("remainder")
            assert 0.3 * removable < 0.25 * 0.1  # the bounded step would have been a sliver
            assert plan.flops_before - plan.flops_after == pytest.approx(removable)
    assert plan is None and pruner._param_removable("P_l") == pytest.approx(0.0, abs=1e-12)
    assert kinds[-1] == "remainder" and kinds.count("remainder") == 1 and kinds.count("bounded") >= 2


def test_a_bounded_search_keeps_its_mode_and_logs_the_bound(setup, tmp_path):
    """param-only, steps of half the FLOPs: the first stage is bounded to half of what P can remove above its
    floors, P stays live, the target is reached, and the cost uses the realised ΔF."""
    cfg, _, loaders = setup
    log_path = tmp_path / "stages.jsonl"
    config = quick(ratio=0.7, strategy="param-only", flops_step=0.5, param_max_cut=0.5, finetune_steps=0,
                   log_path=str(log_path))
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    removable = 1.0 - Pruner(fresh(cfg), RetrievalTask(), loaders.val, config).floor_flops()
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, config)
    first = res.stage_log[0]
    assert first["bounded"] is True and first["unbounded_step"] == pytest.approx(0.5)
    assert 0.5 * removable <= first["flops_removed_step"] < first["unbounded_step"]  # (the last unit overshoots)
    assert len(res.stage_log) > 1 and not res.not_reached and 0.7 in res.snapshots
    assert all(r["mode"] == "P" for r in res.stage_log)
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["bounded"] for r in logged] == [r["bounded"] for r in res.stage_log]
    kept = [1.0] + [r["flops_kept"] for r in res.stage_log]
    for r, f_before in zip(res.stage_log, kept):
        assert r["cost"] == pytest.approx(stage_cost(r["b_before"], r["b_after"], f_before, r["flops_kept"]))
        assert r["bounded"] == (r["unbounded_step"] is not None)


def test_a_search_with_a_small_bound_ends_at_the_floors(setup):
    """param-only with bound 0.1 to its floor (all that P can remove): the stages shrink with what is left, the
    whole remainder is taken once the bounded step would be a sliver, and the search ends on the floor."""
    cfg, _, loaders = setup
    config = quick(ratio=0.5, strategy="param-only", param_max_cut=0.1, finetune_steps=0)
    floor = Pruner(fresh(cfg), RetrievalTask(), loaders.val, config).floor_flops()
    config = quick(ratio=1.0 - floor, snapshots=(0.3,), strategy="param-only", param_max_cut=0.1,
                   finetune_steps=0)
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, config)
    log = res.stage_log
    assert not res.not_reached and log[-1]["flops_kept"] == pytest.approx(floor)
    assert log[0]["bounded"] and not log[-1]["bounded"]  # bounded first, the remainder without the bound
    assert sum(r["bounded"] for r in log) >= 5 and len(log) < 40
    first_removable = 1.0 - floor
    assert 0.1 * first_removable <= log[0]["flops_removed_step"] < log[0]["unbounded_step"]


def test_a_checkpoint_from_before_the_bound_resumes_without_it(setup, tmp_path):
    """A search checkpoint written before ``param_max_cut`` existed resumes at the neutral 1.0, not at another."""
    import torch

    from comp_vlm import checkpoint
    from comp_vlm.errors import CheckpointError
    from comp_vlm.search.state import load_search_checkpoint, save_search_checkpoint

    cfg, _, loaders = setup
    config = quick(ratio=0.5)
    model = fresh(cfg)
    pruner = Pruner(model, RetrievalTask(), loaders.val, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_search_checkpoint(tmp_path / "ckpt", model, pruner, opt, None, config)
    state, tensors = checkpoint.read_checkpoint(tmp_path / "ckpt")
    del state["config"]["param_max_cut"]  # as an earlier version wrote it
    checkpoint.write_checkpoint(tmp_path / "ckpt", state, tensors)
    load_search_checkpoint(tmp_path / "ckpt", model, pruner, opt, None, config)
    with pytest.raises(CheckpointError, match="param_max_cut"):
        load_search_checkpoint(tmp_path / "ckpt", model, pruner, opt, None, quick(ratio=0.5, param_max_cut=0.5))


# ---- bad input, the CLI and the suite key ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_a_bound_outside_0_1_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"param_max_cut must be in \(0, 1\]"):
        comp_vlm.PruneConfig(param_max_cut=value)


def test_the_default_bound_is_no_bound():
    assert comp_vlm.PruneConfig().param_max_cut == 1.0


def test_param_max_cut_flag_reaches_the_config(dense_dir, tmp_path, monkeypatch):  # noqa: F811
    base = ["prune", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "-q", *FAST]
    assert _prune_config(monkeypatch, base + ["--param-max-cut", "0.3"]).param_max_cut == 0.3


def test_param_max_cut_flag_out_of_range_is_one_line(tmp_path, capsys):
    assert main(["prune", "--model", "demo-clip-quick", "--out", str(tmp_path / "o"), "--param-max-cut", "0",
                 "--cache", str(tmp_path / "cache")]) == 1
    assert "--param-max-cut must be in (0, 1]" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "cache").exists()  # refused before any training


def test_the_bound_at_its_neutral_value_keeps_recorded_suite_keys():
    identity = {"world": "w", "model": {"name": "m"}, "task": {"name": "retrieval"}, "bench": {"name": "m"}}
    recorded = {k: v for k, v in config_dict(comp_vlm.PruneConfig()).items() if k != "param_max_cut"}
    key = suite_key(identity, recorded, "kind-rank")  # a suite recorded before the field existed
    assert suite_key(identity, recorded | {"param_max_cut": 1.0}, "kind-rank") == key
    assert suite_key(identity, recorded | {"param_max_cut": 0.5}, "kind-rank") != key
