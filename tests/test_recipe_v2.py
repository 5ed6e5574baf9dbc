"""Recipe format 2: any unit kind, keep ratios per token pool, format 1 read by migration (a committed v1 model)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerances import RECORDED_TENSOR
from transformers import CLIPConfig, CLIPModel

import comp_vlm
from comp_vlm import Recipe, RecipeError, get_adapter, load_pruned, read_recipe, save_pruned
from comp_vlm.adapters.base import options_from_recipe
from comp_vlm.recipe import RECIPE_FILE, RECIPE_FORMAT_VERSION, TOKEN_POOL, LayerRecipe, migrate_v1

V1_DIR = Path(__file__).parent / "fixtures" / "v1_pruned_clip"
V1_MODEL = V1_DIR / "model"
OUTPUTS = ("image_embeds", "text_embeds", "logits_per_image")


def v1_json() -> dict:
    return json.loads((V1_MODEL / RECIPE_FILE).read_text())


def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fixture's input batch and the outputs commit 0d57e16 computed on it."""
    ref = load_file(str(V1_DIR / "reference.safetensors"))
    return ({k.removeprefix("inputs."): v for k, v in ref.items() if k.startswith("inputs.")},
            {k.removeprefix("outputs."): v for k, v in ref.items() if k.startswith("outputs.")})


def outputs(model: CLIPModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return {k: getattr(out, k) for k in OUTPUTS}


def assert_reference_outputs(model: CLIPModel) -> None:
    batch, expected = reference()
    got = outputs(model, batch)
    assert sorted(expected) == sorted(OUTPUTS)
    for key in OUTPUTS:  # recorded by commit 0d57e16 under another install: tests/tolerances.py
        torch.testing.assert_close(got[key], expected[key], **RECORDED_TENSOR, msg=key)


def v1_dense() -> CLIPModel:
    """A dense model of the fixture's architecture (random weights)."""
    return CLIPModel._from_config(CLIPConfig.from_json_file(str(V1_MODEL / "config.json")), attn_implementation="sdpa")


@contextmanager
def raises_one_line(match: str) -> Iterator[pytest.ExceptionInfo]:
    """pytest.raises(RecipeError, match=...), and the message is one line."""
    with pytest.raises(RecipeError, match=match) as info:
        yield info
    assert "\n" not in str(info.value), str(info.value)


# ---- the committed format-1 model ------------------------------------------------------------------------------
def test_v1_fixture_is_format_1():
    doc = v1_json()
    assert doc["format_version"] == 1
    assert all({"heads", "neurons", "keep_ratio"} <= set(lay) for layers in doc["towers"].values() for lay in layers)


def test_v1_fixture_loads_with_the_outputs_of_its_commit():
    assert_reference_outputs(load_pruned(V1_MODEL))


def test_v1_fixture_recipe_migrates_field_by_field():
    doc, recipe = v1_json(), read_recipe(V1_MODEL)
    assert sorted(recipe.towers) == sorted(doc["towers"])
    for name, layers in doc["towers"].items():
        assert len(recipe.towers[name]) == len(layers)
        for old, new in zip(layers, recipe.towers[name]):
            assert new.units == {"head": old["heads"], "neuron": old["neurons"]}
            assert new.keep_ratios == ({} if old["keep_ratio"] is None else {TOKEN_POOL: old["keep_ratio"]})
            assert new.keep_ratio == old["keep_ratio"]
    assert (recipe.options, recipe.reference) == (doc["options"], doc["reference"])
    assert (recipe.dense_flops, recipe.pruned_flops) == (doc["flops"]["dense"], doc["flops"]["pruned"])


def test_v1_fixture_round_trips_as_v2(tmp_path):
    model = load_pruned(V1_MODEL)
    v1 = read_recipe(V1_MODEL)
    # options written before a newer adapter option existed read as its default (options_from_recipe)
    assert options_from_recipe(v1.options) == get_adapter(model).options
    assert dataclasses.replace(get_adapter(model).recipe(), options=v1.options) == v1
    saved = save_pruned(model, tmp_path / "m")
    doc = json.loads((saved / RECIPE_FILE).read_text())
    assert doc["format_version"] == RECIPE_FORMAT_VERSION
    assert all(set(lay) == {"units", "keep_ratios"} for layers in doc["towers"].values() for lay in layers)
    assert dataclasses.replace(read_recipe(saved), options=v1.options) == v1
    assert_reference_outputs(load_pruned(saved))


def test_v1_recipe_applies_to_a_dense_model():
    model = v1_dense()
    v1 = read_recipe(V1_MODEL)
    comp_vlm.apply_recipe(model, v1)
    assert dataclasses.replace(get_adapter(model).recipe(), options=v1.options) == v1
    assert options_from_recipe(v1.options) == get_adapter(model).options


# ---- migrate_v1 on hand-written recipes --------------------------------------------------------------------------
def v1_doc(*layers: dict) -> dict:
    return {"format_version": 1, "family": "clip", "options": {"site_start": 0}, "towers": {"vision": list(layers)}}


def test_migrate_v1_hand_written():
    doc = v1_doc({"heads": [0, 2], "neurons": [1, 3, 4], "keep_ratio": 0.5},
                 {"heads": [], "neurons": [0], "keep_ratio": None},
                 {"heads": [1], "neurons": []})
    before = copy.deepcopy(doc)
    assert migrate_v1(doc) == {
        "format_version": 2, "family": "clip", "options": {"site_start": 0},
        "towers": {"vision": [{"units": {"head": [0, 2], "neuron": [1, 3, 4]}, "keep_ratios": {"tokens": 0.5}},
                              {"units": {"head": [], "neuron": [0]}, "keep_ratios": {}},
                              {"units": {"head": [1], "neuron": []}, "keep_ratios": {}}]},
    }
    assert doc == before
    migrated = migrate_v1(doc)
    migrated["towers"]["vision"][0]["units"]["head"].append(3)
    assert doc == before  # the result shares no lists with the input


@pytest.mark.parametrize(("doc", "message"), [
    (v1_doc({"neurons": [], "keep_ratio": None}), "malformed format-1 recipe: KeyError: 'heads'"),
    ({"format_version": 1}, "malformed format-1 recipe: KeyError: 'towers'"),
    ({"format_version": 1, "towers": {"vision": [[0, 1]]}}, "a format-1 recipe layer must be an object"),
    ({"format_version": 2, "towers": {}}, "format-1 recipe, got format_version 2"),
    ([1], "malformed format-1 recipe"),
])
def test_migrate_v1_refuses_what_is_not_format_1(doc, message):
    with raises_one_line(message):
        migrate_v1(doc)


# ---- format 2 as data --------------------------------------------------------------------------------------------
def v2_doc() -> dict:
    """The fixture's recipe as format 2, with a made-up unit kind and a second token pool in vision layer 0."""
    doc = read_recipe(V1_MODEL).to_dict()
    doc["towers"]["vision"][0]["units"]["cross_head"] = [0, 3]
    doc["towers"]["vision"][0]["keep_ratios"]["image"] = 0.25
    return doc


def test_v2_extra_kind_and_pool_round_trip_as_data():
    doc = v2_doc()
    recipe = Recipe.from_dict(doc)
    lay = recipe.towers["vision"][0]
    assert (lay.kept("cross_head"), lay.keep_ratios) == ([0, 3], {TOKEN_POOL: 0.5, "image": 0.25})
    assert recipe.to_dict() == doc
    assert Recipe.from_json(recipe.to_json()) == recipe
    with raises_one_line("token pools"):
        _ = lay.keep_ratio  # one ratio only where the site has one pool
    with raises_one_line("no 'kv_group' units"):
        lay.kept("kv_group")


def test_from_units_is_the_single_pool_form():
    assert LayerRecipe.from_units({"head": [1], "cross_head": []}, 0.5) == LayerRecipe(
        {"head": [1], "cross_head": []}, {TOKEN_POOL: 0.5})
    assert LayerRecipe.from_units({"neuron": [0, 1]}).keep_ratios == {}


@pytest.mark.parametrize("version", [0, 3, 99, "2", 2.0, True, None])
def test_unknown_format_version_is_named(version):
    doc = read_recipe(V1_MODEL).to_dict()
    doc["format_version"] = version
    with raises_one_line(f"unsupported recipe format_version {version!r}"):
        Recipe.from_dict(doc)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda lay: lay.update(units=[[0, 1]]), "units must be an object"),
    (lambda lay: lay["units"].update({"": [0]}), "units must be an object keyed by non-empty names"),
    (lambda lay: lay["units"].update(head=[2, 0]), "'head' unit indices must be non-negative, sorted and unique"),
    (lambda lay: lay["units"].update(head=[0, 0]), "'head' unit indices must be non-negative, sorted and unique"),
    (lambda lay: lay["units"].update(head=[-1, 0]), "'head' unit indices must be non-negative, sorted and unique"),
    (lambda lay: lay["units"].update(neuron=[0, 1.0]), "'neuron' unit indices must be a list of integers"),
    (lambda lay: lay["units"].update(neuron=[True]), "'neuron' unit indices must be a list of integers"),
    (lambda lay: lay["units"].update(cross_head="0"), "'cross_head' unit indices must be a list of integers"),
    (lambda lay: lay.update(keep_ratios=0.5), "keep_ratios must be an object"),
    (lambda lay: lay["keep_ratios"].update(tokens="all"), r"keep_ratios\['tokens'\] must be a number"),
    (lambda lay: lay["keep_ratios"].update(tokens=0), r"keep_ratios\['tokens'\] = 0 is outside \(0, 1\]"),
    (lambda lay: lay.pop("keep_ratios"), "malformed recipe layer: KeyError: 'keep_ratios'"),
])
def test_malformed_v2_layers_are_one_line_errors(edit, message):
    doc = read_recipe(V1_MODEL).to_dict()
    edit(doc["towers"]["text"][1])
    with raises_one_line(f"recipe text layer 1: {message}"):
        Recipe.from_dict(doc)


# ---- the adapter refuses kinds and pools its towers lack ------------------------------------------------------
@pytest.mark.parametrize(("edit", "message"), [
    (lambda lay: lay["units"].update(cross_head=[0]),
     r"vision layer 0: the recipe's unit kinds \['cross_head', 'head', 'neuron'\] are not the model's"),
    (lambda lay: lay["units"].pop("neuron"), r"vision layer 0: the recipe's unit kinds \['head'\] are not the model's"),
    (lambda lay: lay["keep_ratios"].update(image=0.5),
     r"vision layer 0: the recipe's token pools \['image'\] are not the model's \['tokens'\]"),
])
def test_apply_recipe_refuses_kinds_and_pools_the_model_lacks(edit, message):
    doc = read_recipe(V1_MODEL).to_dict()
    edit(doc["towers"]["vision"][0])
    recipe = Recipe.from_dict(doc)  # well-formed data ...
    model = v1_dense()
    with raises_one_line(message):  # ... that does not fit the model
        comp_vlm.apply_recipe(model, recipe)
