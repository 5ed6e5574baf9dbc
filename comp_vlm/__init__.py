"""comp-vlm: CoMP, Collaborative Multi-Mode Pruning of vision-language models (parameters + tokens)."""

from __future__ import annotations

from torch import nn

from . import adapters  # noqa: F401  (registers the adapters)
from .adapters.base import AdapterOptions, ModelAdapter, get_adapter, register_adapter
from .api import bench_dir, evaluate_dir
from .errors import (
    CheckpointError,
    CompVLMError,
    ConfigError,
    DataError,
    NonFiniteError,
    OutputError,
    RecipeError,
    UnsupportedModelError,
)
from .io import load_pruned, read_recipe, save_pruned
from .recipe import Recipe
from .search import PruneConfig, Pruner, PruneResult, prune

__version__ = "0.1.0"


def count_flops(model: nn.Module, reference: dict | None = None) -> int:
    """Per-sample FLOPs (2 x MACs of matmuls/convolutions) of what ``model`` computes now, at the reference shape
    (default: the recipe's, else the model's image size and a 16-token text)."""
    return get_adapter(model).count_flops(reference)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_recipe(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Slice ``model`` (dense or already pruned) to ``recipe`` and install its token sites; returns the model."""
    get_adapter(model).apply_recipe(recipe)
    return model


__all__ = [
    "AdapterOptions",
    "CheckpointError",
    "CompVLMError",
    "ConfigError",
    "DataError",
    "ModelAdapter",
    "NonFiniteError",
    "OutputError",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "Recipe",
    "RecipeError",
    "UnsupportedModelError",
    "apply_recipe",
    "bench_dir",
    "count_flops",
    "count_params",
    "evaluate_dir",
    "get_adapter",
    "load_pruned",
    "prune",
    "read_recipe",
    "register_adapter",
    "save_pruned",
]
