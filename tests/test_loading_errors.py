"""A dense model directory whose config.json does not describe its weights (issue 19 §7): fewer layers, another
width, missing weights. Each is one line naming the tensors, never a model with layers dropped or weights
re-initialised at random."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from test_cli import dense_dir, one_error_line  # noqa: F401  (fixture)

from comp_vlm.cli import main
from comp_vlm.errors import CheckpointError
from comp_vlm.loading import load_dense_dir


def edited(dense, tmp_path, edit=None, drop: str | None = None):
    """A copy of ``dense`` with its config's text_config edited, or the weight ``drop`` removed."""
    path = tmp_path / "model"
    shutil.copytree(dense, path)
    if edit:
        config = json.loads((path / "config.json").read_text())
        config["text_config"].update(edit)
        (path / "config.json").write_text(json.dumps(config))
    if drop:
        weights = load_file(str(path / "model.safetensors"))
        del weights[drop]
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def refused(path, capsys) -> str:
    with pytest.raises(CheckpointError):
        load_dense_dir(path)
    capsys.readouterr()  # transformers' own progress bar (the command line mutes it)
    assert main(["eval", str(path)]) == 1
    return one_error_line(capsys.readouterr().err)


def test_fewer_layers_in_the_config_than_in_the_weights(dense_dir, tmp_path, capsys):  # noqa: F811
    layers = json.loads((dense_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    path = edited(dense_dir, tmp_path, {"num_hidden_layers": layers - 1})
    line = refused(path, capsys)
    assert f"{path}/config.json does not match {path}/model.safetensors: weights the config has no place for" in line
    assert f"text_model.encoder.layers.{layers - 1}.layer_norm1.bias" in line


def test_another_width_in_the_config_names_the_tensor_and_both_shapes(dense_dir, tmp_path, capsys):  # noqa: F811
    config = json.loads((dense_dir / "config.json").read_text())["text_config"]
    width = config["hidden_size"]
    path = edited(dense_dir, tmp_path, {"hidden_size": width + 8})
    line = refused(path, capsys)
    positions = config["max_position_embeddings"]
    assert (f"text_model.embeddings.position_embedding.weight has shape ({positions}, {width}) in the weights, "
            f"({positions}, {width + 8}) in the model the config describes") in line


def test_missing_weights_are_named(dense_dir, tmp_path, capsys):  # noqa: F811
    path = edited(dense_dir, tmp_path, drop="logit_scale")
    assert "parameters the weights lack (logit_scale)" in refused(path, capsys)
