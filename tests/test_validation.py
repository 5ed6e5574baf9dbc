"""PruneConfig type and range checks, and property tests: random configurations fed to the API and random recipe
edits fed to the loader end in success or a CompVLMError, never in another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_clip import tiny_setup
from transformers import CLIPModel

import comp_vlm
from comp_vlm import CompVLMError, ConfigError, PruneConfig
from comp_vlm.search import STRATEGIES
from comp_vlm.tasks.retrieval import RetrievalTask

PROPERTY = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---- the table-driven checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": "0.8"}, "ratio must be a float, got str"),
        ({"snapshots": 0.5}, "snapshots must be a tuple of floats, got float"),
        ({"snapshots": (0.5, "0.7")}, "snapshots must be a tuple of floats"),
        ({"finetune_steps": -5}, "finetune_steps must be >= 0"),
        ({"lr": -1}, "lr must be >= 0"),
        ({"calibration_batches": 0}, "calibration_batches must be >= 1"),
        ({"stage_steps": 2.5}, "stage_steps must be an int"),
        ({"seed": True}, "seed must be an int, got bool"),
        ({"seed": -1}, "seed must be in"),
        ({"tau": math.inf}, "tau must be finite"),
        ({"rho": 1.5}, r"rho must be in \[0, 1\]"),
        ({"reference": {"image_size": 0}}, "reference must map names to positive integers"),
        ({"reference": [224, 16]}, "reference must be a dict or None"),
        ({"progress": "yes"}, "progress must be a bool"),
        ({"log_path": 3}, "log_path must be a str or None"),
    ],
)
def test_bad_fields_raise_config_error_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**kwargs)


def test_types_come_from_the_annotations():
    @dataclasses.dataclass
    class Extended(PruneConfig):  # a field added later is checked without a new rule
        future_share: float = 0.5
        future_rule: str = "knapsack"

    with pytest.raises(ConfigError, match="future_share must be a float"):
        Extended(future_share="0.5")
    with pytest.raises(ConfigError, match="future_rule must be a str"):
        Extended(future_rule=None)
    # what the annotations allow: an int for a float, a list for a tuple, a path for a *_path field
    config = Extended(ratio=1 / 2, snapshots=[0.3], future_share=1, lr=0, log_path=Path("s.jsonl"), seed=2**32 - 1)
    assert config.ratio == 0.5 and config.snapshots == [0.3]


# ---- random configurations fed to the API ---------------------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 6), st.just(2**40),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                 st.lists(st.floats(-1, 2), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(-2, 40),
                                                                          max_size=2))

#: plausible, cheap values per field (edges and unreachable targets included)
PLAUSIBLE = {
    "ratio": st.one_of(st.floats(0.05, 0.6), st.sampled_from([0.0, 0.99, 1.0])),
    "snapshots": st.lists(st.floats(0.05, 0.95), max_size=2).map(tuple),
    "strategy": st.sampled_from(STRATEGIES), "flops_step": st.floats(0.15, 1.0),
    "stage_steps": st.integers(2, 4), "calibration_batches": st.integers(1, 2), "finetune_steps": st.integers(0, 2),
    "lr": st.floats(0.0, 1e-2), "weight_decay": st.floats(0.0, 0.1), "seed": st.integers(0, 2**32 - 1),
    "badness": st.sampled_from(["val_loss", "metric"]), "cost_measure": st.sampled_from(["recovered", "immediate"]),
    "head_floor": st.integers(1, 5), "neuron_floor": st.floats(0.0, 1.0), "sjp_token_share": st.floats(0.0, 1.0),
    "min_stage_fraction": st.floats(0.0, 0.99), "distill": st.floats(0.0, 2.0), "bootstrap": st.integers(0, 20),
    "rho": st.floats(0.0, 1.0), "tau": st.floats(0.01, 50.0), "lambda0": st.floats(0.0, 1.0),
    "i_max": st.integers(1, 6), "dead_compute": st.booleans(), "site_start": st.integers(0, 4),
    "site_every": st.integers(1, 3), "reference": st.sampled_from([None, {"image_size": 16, "text_length": 9},
                                                                   {"text_length": 1}, {"image_size": 4}]),
}
#: a cheap run where the drawn values leave a field out
CHEAP = {"stage_steps": 2, "calibration_batches": 1, "finetune_steps": 0, "bootstrap": 10, "flops_step": 0.3,
         "progress": False}


def junk_kwargs() -> st.SearchStrategy[dict]:
    """Keyword arguments for PruneConfig: any subset of the fields, each with a plausible value or junk."""
    return st.fixed_dictionaries({}, optional={name: st.one_of(PLAUSIBLE[name], JUNK) for name in PLAUSIBLE})


#: the longest run a drawn config may ask for
LONGEST = {"stage_steps": 8, "calibration_batches": 4, "finetune_steps": 8, "bootstrap": 500}


@st.composite
def run_kwargs(draw) -> dict:
    """Keyword arguments for a cheap run: any subset of the fields with plausible values (some out of range),
    and in every other example one field with a junk value (which may still be valid, e.g. an int for a float)."""
    kwargs = {**CHEAP, **draw(st.fixed_dictionaries({}, optional=PLAUSIBLE))}
    if draw(st.booleans()):
        kwargs[draw(st.sampled_from(sorted(PLAUSIBLE)))] = draw(JUNK)
    return kwargs


@settings(PROPERTY, max_examples=200)
@given(junk_kwargs())
def test_random_config_values_are_accepted_or_refused_with_config_error(kwargs):
    try:
        PruneConfig(**kwargs)
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def tiny():
    cfg, _, loaders = tiny_setup(n_train=32, n_val=16, n_test=16, batch_size=8, projection_dim=8)
    return cfg, loaders


@settings(PROPERTY, max_examples=20)
@given(run_kwargs())
def test_random_configs_run_or_raise_comp_vlm_errors(tiny, kwargs):
    cfg, loaders = tiny
    try:
        config = PruneConfig(**kwargs)
    except ConfigError:
        return
    if config.flops_step < 0.15 or any(getattr(config, k) > limit for k, limit in LONGEST.items()):
        return  # valid (junk such as 2**40 steps can be), but too long a run for a test
    torch.manual_seed(0)
    model = CLIPModel._from_config(cfg)
    try:
        result = comp_vlm.prune(model, RetrievalTask(), loaders.train, loaders.val, config)
    except CompVLMError:
        return
    assert 0 < result.recipe.flops_kept <= 1.0


# ---- random recipe edits fed to the loader --------------------------------------------------------------------
JSON_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=4)


def json_paths(node, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the root excluded."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield prefix + (key,)
        yield from json_paths(child, prefix + (key,))


def edit(doc, path, op, value):
    """Replace, delete, or insert next to the node at ``path`` (in place)."""
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, value)
    else:
        parent[f"{key}_extra"] = value


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from conftest import make_clip
    from test_clip_adapter import prune_all_sites, random_masks

    model = make_clip(0)
    adapter = comp_vlm.get_adapter(model).install()
    prune_all_sites(adapter, 0.6)
    random_masks(adapter, 11)
    adapter.slice()
    return comp_vlm.save_pruned(model, tmp_path_factory.mktemp("fuzz") / "m")


@pytest.mark.parametrize("part", ["format_version", "family", "model_class", "base_config_hash", "options",
                                  "reference", "flops", "towers", "extra"])
@settings(PROPERTY, max_examples=15)
@given(data=st.data())
def test_random_recipe_edits_load_or_raise_comp_vlm_errors(saved_model, part, data):
    doc = json.loads((saved_model / "comp_recipe.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in json_paths(doc) if p[0] == part]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        edit(doc, path, data.draw(st.sampled_from(["replace", "delete", "insert"])), data.draw(JSON_JUNK))
    work = saved_model.parent / "edited"
    if not work.exists():
        shutil.copytree(saved_model, work)
    (work / "comp_recipe.json").write_text(json.dumps(doc))
    try:
        model = comp_vlm.load_pruned(work)
        comp_vlm.count_flops(model)
    except CompVLMError:
        pass
