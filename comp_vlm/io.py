"""Saving and loading pruned models: ``comp_vlm_model.safetensors`` + ``config.json`` + ``comp_recipe.json`` (no
pickle), with what transformers' Auto classes need to load them through comp-vlm (:mod:`comp_vlm.remote`).

Saving writes into a temporary sibling directory and renames it into place, so a crash never leaves a
half-written model, and it never replaces a directory comp-vlm did not write (:mod:`comp_vlm.outputs`). Loading
builds the model from its (dense) config, slices it to the recipe's structure, loads the weights strictly and
installs the recipe's token sites.

The weights are not named ``model.safetensors``: transformers would read them into the dense model that
``config.json`` describes (with ``ignore_mismatched_sizes=True``, re-initialising every pruned tensor at random).
Under this name the model class's ``from_pretrained`` finds no weights and raises. Directories saved before the rename hold
``model.safetensors`` (:data:`LEGACY_WEIGHTS_FILE`), which loading still reads.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import outputs, remote
from .adapters.base import adapter_class_for, get_adapter
from .checkpoint import safetensors_bytes, unshared
from .errors import CheckpointError, RecipeError
from .recipe import RECIPE_FILE, Recipe

WEIGHTS_FILE = "comp_vlm_model.safetensors"
LEGACY_WEIGHTS_FILE = "model.safetensors"  # what comp-vlm wrote before WEIGHTS_FILE (read, never written)


def _check_sliced(model: nn.Module) -> None:
    adapter = get_adapter(model)
    if any(adapter.unit_mask(group) is not None for group in adapter.unit_groups()):
        raise CheckpointError("model still has soft masks: call get_adapter(model).slice() before saving")


def write_pruned_files(model: nn.Module, directory: Path, *, recipe: Recipe | None = None, tokenizer: Any = None,
                       image_processor: Any = None, processor: Any = None) -> None:
    """Write a sliced model's files into the existing ``directory`` (no staging: :func:`save_pruned` stages, and
    ``comp-vlm prune`` writes them into its own staged run directory)."""
    from safetensors.torch import save_file

    _check_sliced(model)
    recipe = recipe or get_adapter(model).recipe()
    state = unshared(model.state_dict())  # tied weights (BLIP's LM head) copied: safetensors refuses them
    metadata = {"format": "pt", "comp_vlm": "1"}
    with outputs.writing(directory / WEIGHTS_FILE, safetensors_bytes(state, metadata)):
        save_file(state, str(directory / WEIGHTS_FILE), metadata=metadata)
    auto_classes = type(get_adapter(model)).auto_classes
    config = copy.deepcopy(model.config)
    config.auto_map = remote.auto_map(auto_classes)
    config.save_pretrained(directory)
    (directory / RECIPE_FILE).write_text(recipe.to_json())
    remote.write_remote_files(directory, auto_classes, recipe, WEIGHTS_FILE)
    for extra in (tokenizer, image_processor, processor):
        if extra is not None:
            extra.save_pretrained(directory)


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
    """Save a (sliced) model with its recipe, complete or not at all (see :mod:`comp_vlm.outputs`). Extra
    ``tokenizer``/``image_processor``/``processor`` objects are saved with their own ``save_pretrained`` so the
    directory also works in transformers pipelines (``trust_remote_code=True``, :mod:`comp_vlm.remote`).
    ``overwrite`` lets it replace a model it saved earlier; any other non-empty directory (another comp-vlm output,
    or one comp-vlm did not write) is refused either way."""
    _check_sliced(model)
    with outputs.staged(directory, "pruned", overwrite=overwrite, replace_kinds=("pruned",)) as tmp:
        write_pruned_files(model, tmp, recipe=recipe, tokenizer=tokenizer, image_processor=image_processor,
                           processor=processor)
    return Path(directory)


def first_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first tensor (in the model's order) that ``state`` lacks, holds in another shape, or has extra."""
    for key, value in expected.items():
        if key not in state:
            return f"it lacks {key}"
        if tuple(state[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(state[key].shape)}, the recipe gives {tuple(value.shape)}"
    extra = sorted(set(state) - set(expected))
    return f"it has {extra[0]}, which the model does not" if extra else None


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
    with the recipe's token sites installed; ``attn_implementation`` defaults to the family's
    (:attr:`comp_vlm.adapters.base.ModelAdapter.attn_implementation`). Its ``save_pretrained`` writes a pruned
    directory again (:func:`comp_vlm.remote.enable_save_pretrained`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    recipe = read_recipe(path)
    adapter_cls, model_cls = adapter_class_for(recipe.model_class)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} holds no config.json")
    try:
        config = remote.without_auto_map(model_cls.config_class.from_json_file(str(config_path)))
    except (json.JSONDecodeError, ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"{config_path} is unreadable: {exc}") from None
    model = model_cls._from_config(config, attn_implementation=attn_implementation or adapter_cls.attn_implementation)
    get_adapter(model).apply_recipe(recipe)
    weights = weights_path(path)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated: {exc}") from None
    mismatch = first_mismatch(state, model.state_dict())
    if mismatch:
        raise CheckpointError(f"{weights} does not match the recipe's shapes: {mismatch}")
    model.load_state_dict(state, strict=True)
    remote.enable_save_pretrained(model, recipe.extra)
    return model.to(device).eval()


def weights_path(directory: Path) -> Path:
    """The weights file of a pruned directory: :data:`WEIGHTS_FILE`, or :data:`LEGACY_WEIGHTS_FILE` in one saved
    before the rename."""
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory} holds no {WEIGHTS_FILE} (nor the {LEGACY_WEIGHTS_FILE} of earlier versions)")
