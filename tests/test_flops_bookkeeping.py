"""The search's FLOPs bookkeeping as data (issue 20 item 13): the pruner reads the dense structure once and derives
every candidate's structure from its selection and keep ratios, so planning a stage never walks the model (not
even per step of a token stage's bisection), and the derived structure is what the model computes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from contract.families import registered
from test_token_pools import TwoPoolCLIPAdapter, TwoPoolCLIPModel
from tiny_clip import fresh, quick, tiny_setup

from comp_vlm import Pruner, prune
from comp_vlm.adapters.base import TowerSpec
from comp_vlm.adapters.units import UnitSpec
from comp_vlm.flops import model_flops
from comp_vlm.schedule import mode_kind
from comp_vlm.search import bookkeeping, budget
from comp_vlm.structure import LayerStructure, TowerStructure
from comp_vlm.tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@contextmanager
def structure_calls(adapter) -> Iterator[list[int]]:
    """Count the ``adapter.structure()`` calls within the block (``dense_structure`` and ``count_flops``
    included)."""
    calls, original = [0], adapter.structure

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    adapter.structure = counted
    try:
        yield calls
    finally:
        del adapter.structure  # the class's method again


def bisection_of(monkeypatch, iterations: int) -> list[int]:
    """Make the token bisection take ``iterations`` steps; returns a counter of the levels it evaluates."""
    evaluated, original = [0], budget.bisect_level

    def bisect(kept_at, lo, hi, goal):
        def counted(q):
            evaluated[0] += 1
            return kept_at(q)
        return original(counted, lo, hi, goal, iterations=iterations)

    monkeypatch.setattr(budget, "bisect_level", bisect)
    return evaluated


@pytest.mark.parametrize("mode", ["T_v", "T_l"])
def test_a_token_stage_plan_does_not_walk_the_model_per_bisection_step(setup, monkeypatch, mode):
    cfg, _, loaders = setup
    calls = {}
    for iterations in (5, 40):
        with monkeypatch.context() as m:
            evaluated = bisection_of(m, iterations)
            pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.6, flops_step=0.02))
            with structure_calls(pruner.adapter) as walks:
                plan = pruner._plan(mode)
            assert plan is not None and plan.token_level < 1.0
            assert evaluated[0] == iterations + 1  # the range's lower end, then every bisection step
            calls[iterations] = walks[0]
    assert calls[5] == calls[40] == 0  # the structure is derived from data: the model is never walked


def test_a_parameter_stage_plan_does_not_walk_the_model(setup, monkeypatch):
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.6, param_max_cut=0.5))
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    monkeypatch.setattr(pruner, "_start_stage", lambda: None)  # statistics only: planning a stage resets them
    pruner.calibrate(iter(loaders.train))
    with structure_calls(pruner.adapter) as walks:
        for mode in ("P_v", "P_l"):  # the stage bound, the floors and the greedy fill
            plan = pruner._plan(mode)
            assert plan is not None and plan.units
            pruner._restore_plan(plan)
        assert pruner.floor_flops("comp") < 1.0 and pruner._token_only_kept() <= 1.0
    assert walks[0] == 0


def check_every_stage(monkeypatch) -> list[str]:
    """Wrap :meth:`Pruner._end_stage`: at the end of each stage (hard masks, live keep ratios at the planned level)
    the structure derived as data (without reading the model) must be what the adapter reads off the model.
    Returns the stages' modes."""
    modes, original = [], Pruner._end_stage

    def checked(self):
        with structure_calls(self.adapter) as walks:
            derived = self.structural_towers()
        live = self.adapter.structure(self.reference)
        assert walks[0] == 0 and derived == live, f"stage {self.stage_index} ({self.plan.mode})"
        assert self.flops_kept() == model_flops(live, self.couplings) / self.dense_flops
        modes.append(self.plan.mode)
        original(self)

    monkeypatch.setattr(Pruner, "_end_stage", checked)
    return modes


@pytest.mark.parametrize("reducer", ["drop", "fuse", "merge"])
@pytest.mark.parametrize("two_pools", [False, True], ids=["clip", "two-pool-clip"])
def test_the_derived_structure_is_the_adapters_after_every_stage(setup, monkeypatch, two_pools, reducer):
    cfg, _, loaders = setup
    model = fresh(cfg)
    if two_pools:  # the text tower's tokens in pools "early" (T_l) and "late" (T_v)
        model.__class__ = TwoPoolCLIPModel
    modes = check_every_stage(monkeypatch)
    loaders.train.load_state_dict({"epoch": 0, "position": 0})
    with registered(TwoPoolCLIPAdapter):
        prune(model, RetrievalTask(), loaders.train, loaders.val,
              quick(ratio=0.5, finetune_steps=0, token_reducer=reducer))
    assert {"param", "token"} <= {mode_kind(m) for m in modes}
    assert not two_pools or reducer != "drop" or {"T_v", "T_l"} <= set(modes)  # the search's own choice of modes


def test_the_dense_structure_is_read_once_and_matches_the_adapters(setup):
    cfg, _, loaders = setup
    pruner = Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.6))
    assert list(pruner.dense_towers) == pruner.adapter.dense_structure(pruner.reference)
    assert pruner.dense_flops == pruner.adapter.dense_flops(pruner.reference)
    assert pruner.structural_towers() == list(pruner.dense_towers)  # nothing selected, every level at 1


# ---- the pure functions, by hand -----------------------------------------------------------------------------------
GROUP = UnitSpec("kv_group", "attn", 4, 2, (), "attn.o_proj", "kv_heads", field_multiples=(("heads", 2),))
NEURON = UnitSpec("neuron", "mlp", 1, 16, (), "mlp.fc2", "neurons")
LLM = TowerSpec("llm", "P_l", "T_l", "layers", 4, 4, 8, 16, True, (GROUP, NEURON))
DENSE = TowerStructure("llm", 10, 1, (LayerStructure(8, 4, 4, 16, kv_heads=2, cross_kv_hidden=5),
                                      LayerStructure(8, 4, 4, 16, kv_heads=2)))


def test_derive_structure_sets_every_field_of_a_kind_and_the_site_keeps():
    counts = {("kv_group", "llm", 0): 1, ("neuron", "llm", 0): 10, ("kv_group", "llm", 1): 2,
              ("neuron", "llm", 1): 16}
    (tower,) = bookkeeping.derive_structure([DENSE], {"llm": LLM}, counts, {"llm": {1: {"tokens": 0.5}}})
    assert tower.layers == (LayerStructure(8, 2, 4, 10, kv_heads=1, cross_kv_hidden=5),  # layer fields stay
                            LayerStructure(8, 4, 4, 16, kv_heads=2, site_keep={"tokens": 0.5}))
    assert (tower.tokens, tower.always_kept) == (DENSE.tokens, DENSE.always_kept)
    dense = bookkeeping.dense_counts([LLM], {"llm": 2})
    assert bookkeeping.derive_structure([DENSE], {"llm": LLM}, dense, {}) == [DENSE]


def test_kept_units_and_floors():
    selected = {("head", "t", 0): torch.tensor([True, False, True, False]), ("neuron", "t", 0): torch.zeros(6).bool()}
    counts = bookkeeping.kept_units(selected)
    assert counts == {("head", "t", 0): 2, ("neuron", "t", 0): 6}
    assert bookkeeping.at_floors(counts, {("head", "t", 0): 3, ("neuron", "t", 0): 4}) == {("head", "t", 0): 2,
                                                                                           ("neuron", "t", 0): 4}
    assert bookkeeping.at_floors(counts, {}) == counts
