"""The search fixes of method.md's REVISED rules: size-blind unit selection, bounded token stages on a per-site
pyramid, seeded warm-up order, sliver-free steps, probe costs, recovery schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_clip import fresh, quick, tiny_setup

from comp_vlm import Pruner, importance, prune
from comp_vlm.flops import tower_flops
from comp_vlm.schedule import MPSConfig, MultiModeScheduler
from comp_vlm.search import budget
from comp_vlm.tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


def random_scores(pruner: Pruner, seed: int) -> None:
    """Replace the collector's CIP scores by i.i.d. uniform scores (fixed per unit for this seed)."""
    gen = torch.Generator().manual_seed(seed)
    table = {}

    def scores(key, out_weight, width):
        if key not in table:
            table[key] = torch.rand(out_weight.shape[1] // width, generator=gen, dtype=torch.float64)
        return table[key]

    pruner.collector.unit_scores = scores


# ---- selection: importance decides which units go, ΔF how many ---------------------------------------------------

def test_random_scores_remove_heads_and_neurons_in_proportion_to_their_flops(setup):
    """With i.i.d. random scores the default rule takes heads and neurons in proportion to their FLOPs (the first
    rule, per-flop, took every removable head before any neuron). Dead compute off: every layer's units then cost
    the same, so the random scores alone decide."""
    cfg, _, loaders = setup
    shares = []
    for seed in range(12):
        pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.5, dead_compute=False))
        random_scores(pruner, seed)
        towers = {t.name: t for t in pruner.structural_towers()}
        vision = towers["vision"]
        tf = tower_flops(vision)
        head_total = sum(tf.per_layer) - sum(2 * tf.tokens_mlp[i] * lay.hidden * lay.neurons * lay.mlp_matrices
                                             for i, lay in enumerate(vision.layers))
        neuron_total = sum(tf.per_layer) - head_total
        target = 0.3 * sum(tf.per_layer)
        plan = pruner._plan_params("P_v", target)
        removed = plan.removed_by
        shares.append((removed.get("vision/heads", 0.0) * pruner.dense_flops / head_total,
                       removed.get("vision/neurons", 0.0) * pruner.dense_flops / neuron_total))
    head_share = sum(h for h, _ in shares) / len(shares)
    neuron_share = sum(n for _, n in shares) / len(shares)
    assert head_share == pytest.approx(0.3, abs=0.08)
    assert neuron_share == pytest.approx(0.3, abs=0.08)


@pytest.mark.parametrize("rule", importance.SELECTIONS)
def test_within_a_group_less_important_units_leave_first(setup, rule):
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.5, selection=rule))
    random_scores(pruner, 3)
    plan = pruner._plan_params("P_l", 0.15 * pruner.dense_flops)
    assert {kind for kind, _, _ in plan.units} == {"head", "neuron"}
    for key, idx in plan.units.items():
        scores = pruner.adapter.unit_scores(key, pruner.collector)
        taken = set(idx.tolist())
        worst_taken = max(scores[i] for i in taken)
        best_left = min(scores[i] for i in range(len(scores)) if i not in taken)
        assert worst_taken <= best_left, key


def test_size_blind_rules_take_equal_quantiles_of_every_kind_group():
    """Pure check of the rule: a head group (4 units of cost 50) and a neuron group (100 units of cost 1) with
    scores spread evenly lose the same share of their FLOPs under the size-blind rules, not under per-flop."""
    scores = torch.cat([torch.linspace(0.1, 1.0, 4), torch.linspace(0.01, 1.0, 400)]).double()
    costs = torch.cat([torch.full((4,), 100.0), torch.ones(400)]).double()
    groups = torch.cat([torch.zeros(4), torch.ones(400)]).long()
    floors = torch.tensor([0, 0])

    def shares(rule):
        keys = importance.selection_keys(scores, costs, groups, groups, rule)
        new, _ = importance.greedy_fill(keys, costs, 400.0, torch.zeros(404, dtype=torch.bool), groups, floors)
        return float(costs[:4][new[:4]].sum()) / 400, float(costs[4:][new[4:]].sum()) / 400

    for rule in ("layer-rank", "kind-rank", "kind-zscore"):
        head, neuron = shares(rule)
        assert head == pytest.approx(0.5, abs=0.13) and neuron == pytest.approx(0.5, abs=0.13), rule
    head, neuron = shares("per-flop")
    assert head == 1.0 and neuron < 0.05  # size decides: every head first


def test_selection_keys_formulas():
    scores = torch.tensor([4.0, 1.0, 2.0, 9.0]).double()
    costs = torch.tensor([2.0, 1.0, 1.0, 3.0]).double()
    layer = torch.tensor([0, 0, 1, 1])
    kind = torch.tensor([0, 0, 0, 0])
    # density = [2, 1, 2, 3]; kind-rank: quantiles (rank + 0.5) / 4 with ties averaged
    assert importance.selection_keys(scores, costs, layer, kind, "kind-rank").tolist() == [0.5, 0.125, 0.5, 0.875]
    # layer-rank: within layer 0 [2, 1] -> [0.75, 0.25], layer 1 [2, 3] -> [0.25, 0.75]
    assert importance.selection_keys(scores, costs, layer, kind, "layer-rank").tolist() == [0.75, 0.25, 0.25, 0.75]
    z = importance.selection_keys(scores, costs, layer, kind, "kind-zscore")
    d = torch.tensor([2.0, 1.0, 2.0, 3.0]).double()
    assert torch.allclose(z, (d - d.mean()) / d.std(unbiased=False))
    with pytest.raises(ValueError):
        importance.selection_keys(scores, costs, layer, kind, "size")


# ---- tokens: per-site pyramid, per-stage bound, fractional floor -------------------------------------------------

def test_pyramid_keep_ratios_hand_computed():
    assert budget.cumulative_keep(0.4, 3, "linear") == pytest.approx([0.8, 0.6, 0.4])
    assert budget.pyramid_keep_ratios(0.4, 3, "linear") == pytest.approx([0.8, 0.75, 0.4 / 0.6])
    assert budget.pyramid_keep_ratios(0.125, 3, "geometric") == pytest.approx([0.5, 0.5, 0.5])
    assert budget.pyramid_keep_ratios(0.5, 2, "legacy") == [0.5, 0.5]  # compounds: 0.25 at the second site
    assert budget.token_level_range(0.6, "linear", 0.1, 0.5) == (0.3, 0.6)
    assert budget.token_level_range(0.15, "linear", 0.1, 0.5) == (0.1, 0.15)
    assert budget.token_level_range(0.6, "legacy", 0.1, 0.5)[0] == pytest.approx(1e-6)


def _site_tokens(pruner: Pruner, tower: str) -> list[int]:
    tf = tower_flops(next(t for t in pruner.structural_towers() if t.name == tower))
    return list(tf.tokens_mlp)


def test_a_token_stage_never_cuts_more_than_the_bound_and_a_bounded_stage_keeps_its_mode(setup):
    """A huge FLOPs step cannot be met by T_v within the bound: the stage removes at most half of the tokens left
    at every site and the mode stays live (the first rule went to one token per site and retired the mode)."""
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.5, flops_step=0.5))
    before = _site_tokens(pruner, "vision")
    plan = pruner._plan_tokens("T_v", 0.5 * pruner.dense_flops)
    after = _site_tokens(pruner, "vision")
    prunable_before = [n - 1 for n in before]  # CLS is always kept
    prunable_after = [n - 1 for n in after]
    assert any(a < b for a, b in zip(prunable_after, prunable_before))
    for a, b in zip(prunable_after, prunable_before):
        assert a >= math.floor(0.5 * b) - 1  # at most half (one token of rounding)
    assert not plan.floor_limited  # held back by the bound, not at its floor
    # the stage runs end to end and the mode is not retired
    pruner2 = Pruner(fresh(cfg), RetrievalTask(), loaders.val,
                     quick(ratio=0.2, flops_step=0.2, strategy="token-only"))
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    pruner2.calibrate(iter(loaders.train))
    while pruner2.stage_index == 1:
        pruner2.step()
    assert pruner2.stage_log[0]["flops_removed_step"] < 0.2
    assert pruner2.stage_log[0]["mode"] not in pruner2.scheduler.exhausted


def test_the_token_floor_is_a_share_of_the_tokens_entering_the_tower(setup):
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.5, token_floor=0.25))
    entering = next(t for t in pruner.structural_towers() if t.name == "vision").tokens - 1
    for _ in range(10):  # stage after stage, as far as the mode goes
        pruner._plan_tokens("T_v", 0.5 * pruner.dense_flops)
    assert pruner.token_levels["T_v"] == pytest.approx(0.25)
    sites = pruner.adapter.site_layers(pruner.specs["vision"])
    tokens = _site_tokens(pruner, "vision")
    for layer in sites:
        assert tokens[layer] - 1 >= math.floor(0.25 * entering + 0.5) - 1


# ---- MPS: warm-up order, slivers, probe ----------------------------------------------------------------------

def test_warmup_order_varies_with_the_seed_and_is_reproducible(setup):
    cfg, _, loaders = setup
    orders = [tuple(Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(seed=s)).scheduler.warmup)
              for s in range(8)]
    assert len(set(orders)) > 1
    assert orders[3] == tuple(Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(seed=3)).scheduler.warmup)
    fixed = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(seed=3, warmup_order="fixed")).scheduler.warmup
    assert fixed == ["P_v", "T_v", "P_l", "T_l"]


def test_warmup_runs_untried_modes_in_the_permuted_order():
    sched = MultiModeScheduler(["P_v", "T_v", "P_l", "T_l"], MPSConfig(warmup_order="random"), seed=5)
    seen = []
    for _ in range(4):
        m = sched.choose()
        seen.append(m)
        sched.update(m, 1.0)
    assert seen == sched.warmup


def test_no_remainder_below_the_sliver_bound_is_left_before_a_snapshot():
    # 0.5 removed at 0.04 per stage: 12 stages leave 0.02 < 0.25 * 0.04? no (0.02 >= 0.01): a short 13th stage
    assert budget.next_step(1.0 - 0.48, 0.5, 0.04, 0.25) == pytest.approx(0.02)
    # a remainder of 0.045 would leave 0.005 after a full step: the step is enlarged to land on the snapshot
    assert budget.next_step(0.545, 0.5, 0.04, 0.25) == pytest.approx(0.045)
    assert budget.next_step(0.545, 0.5, 0.04, 0.0) == pytest.approx(0.04)  # the first rule: a 0.005 sliver follows
    kept, target, step, sliver = 1.0, 0.2, 0.04, 0.25
    for _ in range(100):
        s = budget.next_step(kept, target, step, sliver)
        if s <= 0:
            break
        assert s >= sliver * step - 1e-12
        kept -= s
    assert kept == pytest.approx(target)


def test_sliver_stages_do_not_update_history(setup):
    """Parameter modes held at their floors can remove only ~1% of FLOPs (a sliver of the 0.1 step): those stages
    run, are marked, and leave R_m as it was."""
    cfg, _, loaders = setup
    tight = quick(ratio=0.3, strategy="cycle", finetune_steps=0, head_floor=4, neuron_floor=0.97,
                  token_floor=0.01, sliver_fraction=0.25, min_stage_fraction=0.0)  # let the slivers run
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, tight)
    slivers = [r for r in res.stage_log if r["sliver"]]
    assert {r["mode"] for r in slivers} >= {"P_v", "P_l"}
    assert all(r["flops_removed_step"] < 0.025 for r in slivers)
    assert all((r["flops_removed_step"] < 0.025) == r["sliver"] for r in res.stage_log)
    last_R: dict = {}
    for r in res.stage_log:  # a sliver leaves R_m where it was (None before the mode's first real cost)
        if r["sliver"]:
            assert r["R"] == last_R.get(r["mode"])
        last_R[r["mode"]] = r["R"]


def test_scheduler_update_without_history_keeps_R():
    sched = MultiModeScheduler(["P_v", "T_v"], MPSConfig(warmup_order="fixed"), seed=0)
    for m, c in (("P_v", 2.0), ("T_v", 1.0)):
        assert sched.choose() == m
        sched.update(m, c)
    m = sched.choose()
    assert sched.update(m, 100.0, hi=False) == pytest.approx({"P_v": 2.0, "T_v": 1.0}[m])


def test_probe_feeds_every_live_mode_cost_before_the_choice(setup):
    cfg, _, loaders = setup
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                quick(ratio=0.3, finetune_steps=0, cost_measure="probe"))
    assert res.stage_log[0]["chosen"] in ("greedy", "random")  # no warm-up: every mode was measured first
    for r in res.stage_log:
        assert r["b_removed"] is not None
        assert r["probe_s"] > 0  # the probe's own time, logged apart from the stage's


def test_exploration_after_probe_costs_counts_never_run_modes_from_the_start():
    """Under the probe every mode has a cost before it ever ran; random exploration (Eq. 9) then takes I_m = T for
    those modes (it crashed on their missing T_m)."""
    sched = MultiModeScheduler(["P_v", "T_v", "P_l"], MPSConfig(rho=1.0), seed=0)
    for m, c in (("P_v", 3.0), ("T_v", 1.0), ("P_l", 2.0)):
        sched.observe(m, c)
    m = sched.choose()
    assert sched.history[-1]["how"] == "random" and m in ("P_v", "T_v", "P_l")


def test_observe_applies_history():
    sched = MultiModeScheduler(["P_v", "T_v"], MPSConfig(warmup_order="fixed"), seed=0)
    assert sched.observe("P_v", 3.0) == 3.0 and sched.observe("T_v", 1.0) == 1.0
    m = sched.choose()
    assert m == "T_v" and sched.history[-1]["observed"] == {"P_v": 3.0, "T_v": 1.0}
    sched.update(m, 1.0, hi=False)
    # P_v last ran never: its next observation replaces nothing but is smoothed with R = 3 (lambda(None) = 0)
    assert sched.observe("T_v", 2.0) == pytest.approx(0.4 * 1.0 + 0.6 * 2.0)


# ---- recovery ---------------------------------------------------------------------------------------------------

def test_lr_factor_warmup_then_cosine_to_zero():
    f = [budget.lr_factor(i, 10, "cosine", 0.2) for i in range(10)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in itertools.pairwise(f[1:]))  # non-increasing after the warm-up
    assert budget.lr_factor(10, 10, "cosine", 0.2) == pytest.approx(0.0)
    assert budget.lr_factor(3, 10, "constant") == 1.0


def test_equal_total_budget_tops_up_fine_tuning():
    # 0.5 at 0.05 per stage is 10 nominal stages of 50 steps; a run that needed 12 stages fine-tunes 100 fewer
    assert budget.finetune_steps_for(0.5, 600, 150, "equal-total", 0.05, 50) == 50
    assert budget.finetune_steps_for(0.5, 450, 150, "equal-total", 0.05, 50) == 200
    assert budget.finetune_steps_for(0.5, 450, 150, "fixed", 0.05, 50) == 150
    # with two slack stages, a run that needed 12 stages still fine-tunes 150 steps, one of 10 fine-tunes 250
    assert budget.finetune_steps_for(0.5, 600, 150, "equal-total", 0.05, 50, 2) == 150
    assert budget.finetune_steps_for(0.5, 500, 150, "equal-total", 0.05, 50, 2) == 250
