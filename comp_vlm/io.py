"""Saving and loading pruned models: ``model.safetensors`` + ``config.json`` + ``comp_recipe.json`` (no pickle).

Saving writes into a temporary sibling directory and renames it into place, so a crash never leaves a
half-written model. Loading builds the model from its (dense) config, slices it to the recipe's structure,
loads the weights strictly and installs the recipe's token sites.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters.base import adapter_class_for, get_adapter
from .errors import CheckpointError, RecipeError
from .recipe import RECIPE_FILE, Recipe

WEIGHTS_FILE = "model.safetensors"


def save_pruned(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    recipe: Recipe | None = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    processor: Any = None,
    overwrite: bool = True,
) -> Path:
    """Save a (sliced) model with its recipe, atomically. Extra ``tokenizer``/``image_processor``/``processor``
    objects are saved with their own ``save_pretrained`` so the directory also works in transformers pipelines."""
    from safetensors.torch import save_file

    adapter = get_adapter(model)
    for spec in adapter.tower_specs():
        for i in range(len(adapter.layers(spec))):
            if adapter.head_mask(spec.name, i) is not None or adapter.neuron_mask(spec.name, i) is not None:
                raise CheckpointError("model still has soft masks: call get_adapter(model).slice() before saving")
    recipe = recipe or adapter.recipe()
    target = Path(directory)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "comp_vlm": "1"})
        model.config.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(recipe.to_json())
        for extra in (tokenizer, image_processor, processor):
            if extra is not None:
                extra.save_pretrained(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_recipe(directory: str | os.PathLike) -> Recipe:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    recipe_path = path / RECIPE_FILE
    if not recipe_path.is_file():
        raise CheckpointError(f"{path} holds no {RECIPE_FILE}: not a comp-vlm pruned model directory")
    try:
        return Recipe.from_json(recipe_path.read_text())
    except RecipeError as exc:
        raise RecipeError(f"{recipe_path}: {exc}") from None


def load_pruned(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", attn_implementation: str | None = None
) -> nn.Module:
    """Load a directory written by :func:`save_pruned` as an ordinary transformers model instance (eval mode)
    with the recipe's token sites installed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    recipe = read_recipe(path)
    _, model_cls = adapter_class_for(recipe.model_class)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} holds no config.json")
    try:
        config = model_cls.config_class.from_json_file(str(config_path))
    except (json.JSONDecodeError, ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"{config_path} is unreadable: {exc}") from None
    model = model_cls._from_config(config, attn_implementation=attn_implementation or "sdpa")
    get_adapter(model).apply_recipe(recipe)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} holds no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:3]
        raise CheckpointError(f"{weights} does not match the recipe's shapes: {' '.join(first)}") from None
    return model.to(device).eval()
