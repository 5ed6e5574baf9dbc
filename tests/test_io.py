"""Recipes and save/load: round trips, strict shapes, and clear errors on bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_clip
from test_clip_adapter import assert_close, embeds, prune_all_sites, random_masks
from transformers import CLIPModel

import comp_vlm
from comp_vlm import CheckpointError, Recipe, RecipeError, get_adapter, load_pruned, save_pruned
from comp_vlm.io import WEIGHTS_FILE
from comp_vlm.recipe import RECIPE_FORMAT_VERSION


def pruned_model(seed=0):
    model = make_clip(seed)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, 0.6)
    random_masks(adapter, seed + 11)
    adapter.slice()
    return model


def test_save_load_identical_outputs(tmp_path, pixels, text_batch, tokenizer):
    model = pruned_model()
    out = save_pruned(model, tmp_path / "m", tokenizer=tokenizer)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [WEIGHTS_FILE, "config.json", "comp_recipe.json", "tokenizer.json", "tokenizer_config.json",
         "modeling_comp_vlm.py", "README.md", ".comp-vlm-output.json"])
    loaded = load_pruned(out)
    assert type(loaded) is CLIPModel
    assert_close(embeds(model, pixels, text_batch), embeds(loaded, pixels, text_batch), atol=1e-6)
    assert comp_vlm.count_flops(loaded) == comp_vlm.count_flops(model)
    assert comp_vlm.count_params(loaded) == comp_vlm.count_params(model) < comp_vlm.count_params(make_clip(0))
    # ordinary CLIPModel API works
    assert loaded.get_image_features(pixel_values=pixels).pooler_output.shape == (3, 24)
    # no temp directories left behind
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_recipe_json_round_trip_and_rebuild(pixels, text_batch):
    model = pruned_model(1)
    recipe = get_adapter(model).recipe()
    again = Recipe.from_json(recipe.to_json())
    assert again.to_dict() == recipe.to_dict()
    assert 0 < recipe.flops_kept < 1
    # the recipe alone + the base config rebuilds the shapes
    fresh = CLIPModel._from_config(model.config)
    comp_vlm.apply_recipe(fresh, again)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert_close(embeds(model, pixels, text_batch), embeds(fresh.eval(), pixels, text_batch), atol=1e-6)


def test_apply_recipe_to_dense_trained_model_equals_masking(pixels, text_batch):
    dense = make_clip(2)
    adapter = get_adapter(dense).install()
    random_masks(adapter, 3)
    prune_all_sites(adapter, 0.5)
    masked = embeds(dense, pixels, text_batch)
    recipe = adapter.recipe()
    adapter.clear_masks()
    comp_vlm.apply_recipe(dense, recipe)
    assert_close(masked, embeds(dense, pixels, text_batch))


def test_config_hash_mismatch_refused():
    recipe = get_adapter(pruned_model()).recipe()
    other = make_clip(0, hidden=48)
    with pytest.raises(RecipeError, match="hash"):
        comp_vlm.apply_recipe(other, recipe)


def recipe_dict():
    return get_adapter(pruned_model()).recipe().to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["towers"]["vision"].pop(), "layers"),
        (lambda d: d["towers"]["vision"][0]["units"]["head"].append(99), "out of range"),
        (lambda d: d["towers"]["text"][0]["units"]["neuron"].insert(0, 5), "sorted and unique"),
        (lambda d: d["towers"]["vision"][1]["keep_ratios"].update(tokens=1.5), r"outside \(0, 1\]"),
        (lambda d: d["towers"]["vision"][0]["keep_ratios"].update(tokens=0.5), "no token site"),
        (lambda d: d.update(family="blip"), "family"),
        (lambda d: d["towers"].pop("text"), "towers"),
        (lambda d: d["options"].update(turbo=True), "unknown options"),
        (lambda d: d["options"].update(dead_compute="no"), "must be bool"),
    ],
)
def test_recipe_mismatch_errors(mutate, message):
    d = recipe_dict()
    mutate(d)
    with pytest.raises(RecipeError, match=message):
        comp_vlm.apply_recipe(make_clip(0), Recipe.from_dict(d))


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"format_version": 1, "towers": ', "not valid JSON"), ('{"format_version": 7}', "format_version"),
     ('{"format_version": 1}', "malformed"), ("[1, 2]", "object"),
     ('{"format_version": 1, "towers": {"t": [{"heads": [], "neurons": [], "keep_ratio": true}]}}', "keep_ratio")],
)
def test_corrupt_recipe_json(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_json(text)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pruned(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no comp_recipe.json"):
        load_pruned(tmp_path / "empty")


def test_truncated_files_are_refused(tmp_path):
    path = save_pruned(pruned_model(), tmp_path / "m")
    weights = path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pruned(path)
    recipe_path = path / "comp_recipe.json"
    recipe_path.write_text(recipe_path.read_text()[:100])
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_pruned(path)


def test_weights_that_do_not_match_recipe_are_refused(tmp_path):
    a = save_pruned(pruned_model(0), tmp_path / "a")
    b = save_pruned(pruned_model(5), tmp_path / "b")
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        load_pruned(a)


def test_save_refuses_unsliced_masks(tmp_path):
    model = make_clip(0)
    get_adapter(model).install().set_head_mask("vision", 0, [1, 0, 1, 1])
    with pytest.raises(CheckpointError, match="slice"):
        save_pruned(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_overwrite_replaces_atomically(tmp_path, pixels):
    first = save_pruned(pruned_model(0), tmp_path / "m")
    second_model = pruned_model(4)
    save_pruned(second_model, first)
    loaded = load_pruned(first)
    with torch.no_grad():
        assert torch.allclose(loaded.get_image_features(pixel_values=pixels).pooler_output,
                              second_model.get_image_features(pixel_values=pixels).pooler_output, atol=1e-6)
    assert json.loads((first / "comp_recipe.json").read_text())["format_version"] == RECIPE_FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_weights_mismatch_names_the_first_tensor_only(tmp_path):
    a = save_pruned(pruned_model(0), tmp_path / "a")
    b = save_pruned(pruned_model(5), tmp_path / "b")
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_pruned(a)
    message = str(exc.value)
    assert re.search(r"shapes: [\w.]+\.weight has shape \([\d, ]+\), the recipe gives \([\d, ]+\)$", message), message
    assert len(message) < 250
