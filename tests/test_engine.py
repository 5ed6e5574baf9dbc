"""The staged search end to end on a tiny CLIP, plus its guards."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_clip import REF, fresh, quick, tiny_setup

import comp_vlm
from comp_vlm import ConfigError, PruneConfig, Pruner, checkpoint, load_pruned, prune
from comp_vlm.adapters.base import get_adapter
from comp_vlm.data.synthetic import SyntheticWorld, make_retrieval_loaders
from comp_vlm.search import state
from comp_vlm.tasks.retrieval import RetrievalTask
from comp_vlm.tokens import TokenState


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


def test_comp_reaches_target_with_snapshots(setup, tmp_path):
    cfg, tok, loaders = setup
    log_path = tmp_path / "stages.jsonl"
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                quick(ratio=0.5, snapshots=(0.3,), log_path=str(log_path)), test_data=loaders.test)
    assert sorted(res.snapshots) == [0.3, 0.5] and res.not_reached == []
    for ratio, (model, recipe) in res.snapshots.items():
        kept = comp_vlm.count_flops(model, REF) / recipe.dense_flops
        assert kept <= 1 - ratio + 1e-9  # the target is met ...
        assert kept >= 1 - ratio - 0.1 - 0.05  # ... within about one step (a unit can overshoot a little)
        assert recipe.pruned_flops == comp_vlm.count_flops(model, REF)
    modes = {r["mode"] for r in res.stage_log}
    assert len(modes) >= 2
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [r["stage"] for r in lines] == [r["stage"] for r in res.stage_log]
    assert {"cost", "cost_se", "flops_kept", "b_before", "b_after", "wall_s"} <= set(lines[0])
    assert set(res.metrics) == {0.3, 0.5} and "r1_mean" in res.metrics[0.5]
    out = res.save(str(tmp_path / "pruned"), tokenizer=tok)
    loaded = load_pruned(out)
    batch = loaders.test[0]
    with torch.no_grad():
        a = res.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        b = loaded.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    assert torch.allclose(a, b, atol=1e-5)


def test_same_seed_same_recipe(setup):
    cfg, tok, _ = setup
    recipes = []
    for _ in range(2):
        loaders = make_retrieval_loaders(SyntheticWorld(image_size=16, seed=0), tok, n_train=96, n_val=32,
                                         n_test=32, batch_size=16, seed=0)
        res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, quick(ratio=0.3, finetune_steps=0))
        recipes.append(res.recipe.to_dict())
        modes = [r["mode"] for r in res.stage_log]
    recipes[0]["extra"].pop("stage", None)
    recipes[1]["extra"].pop("stage", None)
    assert recipes[0] == recipes[1]
    assert len(modes) >= 2


def test_mode_that_can_remove_only_a_sliver_is_exhausted_before_its_stage(setup):
    cfg, _, loaders = setup
    # every head kept and 62 of 64 neurons per layer: a parameter mode can remove ~1% of FLOPs, far below the step
    tight = {"ratio": 0.3, "strategy": "cycle", "finetune_steps": 0, "head_floor": 4, "neuron_floor": 0.97,
             "min_stage_fraction": 0.25, "token_plan": "legacy"}
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, quick(**tight))
    assert {r["mode"] for r in res.stage_log} == {"T_v", "T_l"}
    assert all(r["flops_removed_step"] > 0.25 * 0.1 - 1e-9 or r["flops_kept"] <= 0.7 + 1e-9 for r in res.stage_log)
    # with the threshold off, the parameter modes spend whole stages on their sliver
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, quick(**{**tight, "min_stage_fraction": 0.0}))
    slivers = [r for r in res.stage_log if r["mode"] in ("P_v", "P_l")]
    assert slivers and all(r["flops_removed_step"] < 0.25 * 0.1 for r in slivers)
    with pytest.raises(ConfigError, match="min_stage_fraction"):
        PruneConfig(min_stage_fraction=1.0)


@pytest.mark.parametrize("strategy", ["param-only", "token-only", "sjp", "random-mode", "no-cit", "uniform-rms"])
def test_strategies_run(setup, strategy):
    cfg, _, loaders = setup
    ratio = 0.25 if strategy == "token-only" else 0.3  # token-only's floor (10% of tokens at every site) keeps ~70%
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, quick(ratio=ratio, strategy=strategy, finetune_steps=0))
    modes = {r["mode"] for r in res.stage_log}
    if strategy == "param-only":
        assert modes == {"P"}
        assert all(lay.keep_ratio in (None, 1.0) for t in res.recipe.towers.values() for lay in t)
    if strategy == "token-only":
        assert modes <= {"T_v", "T_l"}
        assert all(len(lay.kept("head")) == 4 for t in res.recipe.towers.values() for lay in t)
    assert res.recipe.flops_kept <= 1 - ratio + 1e-9


def test_unreachable_single_target_fails_at_plan_time(setup):
    cfg, _, loaders = setup
    with pytest.raises(ConfigError, match="floor"):
        Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.97, strategy="token-only"))


def test_sweep_keeps_reachable_snapshots(setup):
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.97, snapshots=(0.2,), strategy="token-only"))
    assert pruner.not_reached == [0.97] and pruner.pending_targets == [0.2]


def test_immediate_cost_is_the_damage_the_stage_ends_with_when_nothing_trains(setup):
    """With lr = 0 the weights never change, so the immediate probe (removal applied at once) must see exactly the
    model the stage ends with: same B as the recovered measure, same costs, same modes -- which also shows that the
    probe leaves no trace (masks, RNG, statistics) on the search."""
    cfg, tok, _ = setup
    logs = {}
    for measure in ("recovered", "immediate"):
        loaders = make_retrieval_loaders(SyntheticWorld(image_size=16, seed=0), tok, n_train=96, n_val=32,
                                         n_test=32, batch_size=16, seed=0)  # the same data order for both
        res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                    quick(ratio=0.5, lr=0.0, finetune_steps=0, cost_measure=measure))
        logs[measure] = res.stage_log
    rec, imm = logs["recovered"], logs["immediate"]
    assert [r["mode"] for r in rec] == [r["mode"] for r in imm] and len({r["mode"] for r in imm}) >= 2
    for a, b in zip(rec, imm):
        assert a["b_removed"] is None
        assert b["b_removed"] == pytest.approx(b["b_after"], abs=1e-6)
        assert b["cost"] == pytest.approx(a["cost"], abs=1e-4)


def test_immediate_cost_ignores_the_recovery(setup):
    cfg, _, loaders = setup
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                quick(ratio=0.3, lr=1e-3, finetune_steps=0, cost_measure="immediate"))
    for r in res.stage_log:
        assert r["cost"] == pytest.approx((r["b_removed"] - r["b_before"]) / r["flops_removed_step"], rel=1e-9)
    assert any(abs(r["b_removed"] - r["b_after"]) > 1e-4 for r in res.stage_log)  # training moved B afterwards
    with pytest.raises(ConfigError, match="cost_measure"):
        PruneConfig(cost_measure="later")


def test_metric_badness_costs_are_metric_lost_per_flop(setup):
    """B = -metric (the paper's choice): each cost is the validation R@1 lost per FLOPs fraction removed."""
    cfg, _, loaders = setup
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                quick(ratio=0.3, finetune_steps=0, badness="metric"))
    dense_r1 = RetrievalTask().evaluate(fresh(cfg), loaders.val)["r1_mean"]
    assert res.stage_log[0]["b_before"] == pytest.approx(-dense_r1)
    for r in res.stage_log:
        assert -100.0 <= r["b_after"] <= 0.0 and r["metric"] is None
        assert r["cost"] == pytest.approx((r["b_after"] - r["b_before"]) / r["flops_removed_step"], rel=1e-9)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        PruneConfig(ratio=ratio)


def test_bad_strategy():
    with pytest.raises(ConfigError, match="strategy"):
        PruneConfig(strategy="magic")


def test_nan_statistic_is_reported(setup):
    cfg, _, loaders = setup
    model = fresh(cfg)
    pruner = Pruner(model, RetrievalTask(), loaders.val, quick(ratio=0.3))
    with torch.no_grad():
        model.vision_model.encoder.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    loaders.train.load_state_dict({"epoch": 0, "position": 0})  # calibration must see batches whatever ran before
    with pytest.raises(comp_vlm.CompVLMError, match="vision layer"):
        pruner.calibrate(iter(loaders.train))


@pytest.mark.parametrize("scorer", ["attention", "random"])
def test_resume_after_interruption_gives_the_same_recipe(setup, tmp_path, monkeypatch, scorer):
    """Killed after two stages and resumed, the search equals the uninterrupted one: stage log, recipe and test
    metrics (the random scorer's generator travels with the checkpoint)."""
    cfg, tok, _ = setup

    def loaders():
        return make_retrieval_loaders(SyntheticWorld(image_size=16, seed=0), tok, n_train=96, n_val=32, n_test=32,
                                      batch_size=16, seed=0)

    def config(directory, **kw):
        return quick(ratio=0.4, finetune_steps=0, token_scorer=scorer, checkpoint_dir=str(tmp_path / directory), **kw)

    full = loaders()
    reference = prune(fresh(cfg), RetrievalTask(), full.train, full.val, config("a"), test_data=full.test)
    assert len(reference.stage_log) >= 3

    real_save = state.save_search_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # calibration + 2 stages written, then the process "dies"
            raise KeyboardInterrupt

    monkeypatch.setattr(state, "save_search_checkpoint", save_then_die)
    first = loaders()
    with pytest.raises(KeyboardInterrupt):
        prune(fresh(cfg), RetrievalTask(), first.train, first.val, config("b"))
    monkeypatch.setattr(state, "save_search_checkpoint", real_save)
    again = loaders()
    resumed = prune(fresh(cfg), RetrievalTask(), again.train, again.val, config("b", resume=True),
                    test_data=again.test)

    def strip(log):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in log]

    assert strip(resumed.stage_log) == strip(reference.stage_log)
    assert resumed.recipe.to_dict() == reference.recipe.to_dict()
    assert resumed.metrics == reference.metrics and reference.metrics


def _scorer_draws(pruner):
    """Scores the pruner's installed token scorer gives next (a random scorer draws anew on each call)."""
    probs, tokens = torch.zeros(2, 1, 6, 6), TokenState.start(2, 6, torch.device("cpu"))
    return get_adapter(pruner.model).token_scorer(probs, None, tokens, False)


def _searches(cfg, val, config):
    """A fresh (model, pruner, optimizer) of ``config``, as a search or its resume starts."""
    model = fresh(cfg)
    return model, Pruner(model, RetrievalTask(), val, config), torch.optim.AdamW(model.parameters())


def test_random_scorer_state_round_trips_through_the_checkpoint(setup, tmp_path):
    cfg, _, loaders = setup
    config = quick(ratio=0.3, token_scorer="random")
    model, pruner, opt = _searches(cfg, loaders.val, config)
    _scorer_draws(pruner)  # the generator moved past its seed
    state.save_search_checkpoint(tmp_path / "ck", model, pruner, opt, loaders.train, config)
    expected = _scorer_draws(pruner)
    assert checkpoint.read_checkpoint(tmp_path / "ck")[1]["scorer/generator"].dtype == torch.uint8
    model, resumed, opt = _searches(cfg, loaders.val, config)
    state.load_search_checkpoint(tmp_path / "ck", model, resumed, opt, loaders.train, config)
    assert torch.equal(_scorer_draws(resumed), expected)


def test_checkpoint_without_scorer_state_resumes_from_the_seed_with_a_warning(setup, tmp_path, caplog):
    """A checkpoint written before the scorer state was kept resumes as before (the generator at its seed), with a
    warning; the attention scorer keeps no state and warns nothing."""
    from safetensors.torch import save_file

    cfg, _, loaders = setup
    for scorer in ("random", "attention"):
        config = quick(ratio=0.3, token_scorer=scorer)
        model, pruner, opt = _searches(cfg, loaders.val, config)
        state.save_search_checkpoint(tmp_path / scorer, model, pruner, opt, loaders.train, config)
        tensors = checkpoint.read_checkpoint(tmp_path / scorer)[1]
        old = {k: v for k, v in tensors.items() if not k.startswith("scorer/")}
        save_file(old, str(tmp_path / scorer / checkpoint.TENSORS))
        seeded = _scorer_draws(_searches(cfg, loaders.val, config)[1])
        model, resumed, opt = _searches(cfg, loaders.val, config)
        caplog.clear()
        with caplog.at_level("WARNING", logger="comp_vlm"):
            state.load_search_checkpoint(tmp_path / scorer, model, resumed, opt, loaders.train, config)
        assert torch.equal(_scorer_draws(resumed), seeded)
        warned = "holds no token-scorer state" in caplog.text
        assert warned == (scorer == "random") and (set(old) == set(tensors)) == (scorer == "attention")


def test_resume_with_other_arguments_is_refused(setup, tmp_path):
    cfg, _, loaders = setup
    prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
          quick(ratio=0.2, finetune_steps=0, checkpoint_dir=str(tmp_path / "c")))
    with pytest.raises(comp_vlm.CheckpointError, match="ratio"):
        prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
              quick(ratio=0.3, finetune_steps=0, checkpoint_dir=str(tmp_path / "c"), resume=True))


def test_distillation_runs_and_changes_training(setup):
    cfg, _, loaders = setup
    plain = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, quick(ratio=0.2, finetune_steps=1))
    kd = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val, quick(ratio=0.2, finetune_steps=1, distill=1.0))
    assert kd.stage_log[0]["b_after"] != plain.stage_log[0]["b_after"]
    assert all(r["metric"] is not None for r in kd.stage_log)


def test_distill_loss_is_zero_against_itself(setup):
    cfg, _, loaders = setup
    model = fresh(cfg)
    batch = loaders.val[0]
    assert RetrievalTask().distill_loss(model, model, batch).abs().item() < 1e-6
    other = fresh(cfg)
    with torch.no_grad():
        other.visual_projection.weight.mul_(-1)
    assert RetrievalTask().distill_loss(model, other, batch).item() > 1e-3


def test_loss_with_distill_runs_the_student_once_and_equals_the_sum(setup):
    cfg, _, loaders = setup
    student, teacher = fresh(cfg), fresh(cfg)
    with torch.no_grad():
        teacher.visual_projection.weight.mul_(-1)
    student.eval()
    batch, task = loaders.val[0], RetrievalTask()
    calls = []
    student.vision_model.register_forward_hook(lambda *_: calls.append(1))
    fused = task.loss_with_distill(student, teacher, batch, 0.7)
    assert len(calls) == 1
    separate = task.loss(student, batch) + 0.7 * task.distill_loss(student, teacher, batch)
    assert len(calls) == 3
    torch.testing.assert_close(fused, separate)


def test_nonfinite_training_loss_is_named(setup):
    cfg, _, loaders = setup
    model = fresh(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    with pytest.raises(comp_vlm.CompVLMError, match="NaN|nan"):
        prune(model, RetrievalTask(), loaders.train, loaders.val, quick(ratio=0.2))


def test_reference_text_length_is_the_mean_training_length(setup):
    cfg, _, loaders = setup
    from comp_vlm.training import training_text_length

    expected = training_text_length(loaders.train)
    state = loaders.train.state_dict()
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                quick(ratio=0.2, finetune_steps=0, reference={"image_size": 16}))
    assert res.recipe.reference["text_length"] == expected
    assert 6 <= expected <= 15
    assert state != loaders.train.state_dict()  # the search itself consumed batches


def test_materialized_snapshot_equals_masked_search_model(setup):
    cfg, _, loaders = setup
    model = fresh(cfg)
    task = RetrievalTask()
    pruner = Pruner(model, task, loaders.val, quick(ratio=0.4, snapshots=(0.2,)))
    from comp_vlm.training import cycle_batches

    pruner.calibrate(cycle_batches(loaders.train))
    batches = cycle_batches(loaders.train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = loaders.val[0]
    checked = 0
    while not pruner.done:
        model.train()
        loss = task.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = len(pruner.snapshots)
        pruner.step()
        if len(pruner.snapshots) > before:
            snap = pruner.snapshots[-1]
            sliced = pruner.materialize(snap)
            model.eval()
            with torch.no_grad():
                a = task.encode_images(model, batch["pixel_values"])
                b = task.encode_images(sliced, batch["pixel_values"])
                c = task.encode_texts(model, batch["input_ids"], batch["attention_mask"])
                d = task.encode_texts(sliced, batch["input_ids"], batch["attention_mask"])
            assert torch.allclose(a, b, atol=1e-5) and torch.allclose(c, d, atol=1e-5)
            assert comp_vlm.count_flops(sliced) == snap.recipe.pruned_flops
            checked += 1
    assert checked == 2
