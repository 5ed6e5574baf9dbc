"""The pruning recipe: a JSON description of a pruned model's structure (no weights, no pickle).

It records, per tower and layer, the kept heads and neurons (indices into the dense model) and the keep ratio
of the layer's token site; the adapter options; the reference input shape for FLOPs; the dense and pruned FLOPs;
and a hash of the base (dense) config, so a recipe cannot be applied to a different architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import RecipeError
from .validation import reference_problem

RECIPE_FORMAT_VERSION = 1
RECIPE_FILE = "comp_recipe.json"
RECIPE_UNIT_KINDS = ("head", "neuron")  # the unit kinds format 1 holds, as the layer fields "heads"/"neurons"


@dataclass
class LayerRecipe:
    heads: list[int]
    neurons: list[int]
    keep_ratio: float | None = None  # None: no token site at this layer

    @staticmethod
    def from_units(kept: dict[str, list[int]], keep_ratio: float | None = None) -> LayerRecipe:
        """A layer entry from the kept (dense) unit indices per kind."""
        unknown = sorted(set(kept) - set(RECIPE_UNIT_KINDS))
        if unknown:
            raise RecipeError(f"recipe format {RECIPE_FORMAT_VERSION} cannot hold unit kinds {unknown}")
        return LayerRecipe(**{kind + "s": list(idx) for kind, idx in kept.items()}, keep_ratio=keep_ratio)

    def kept(self, kind: str) -> list[int]:
        """The kept (dense) indices of one unit kind."""
        if kind not in RECIPE_UNIT_KINDS:
            raise RecipeError(f"recipe format {RECIPE_FORMAT_VERSION} holds no {kind!r} units")
        return getattr(self, kind + "s")

    def to_dict(self) -> dict:
        return {"heads": list(self.heads), "neurons": list(self.neurons), "keep_ratio": self.keep_ratio}


@dataclass
class Recipe:
    format_version: int
    family: str
    model_class: str
    base_config_hash: str
    options: dict
    reference: dict
    towers: dict[str, list[LayerRecipe]]
    dense_flops: int
    pruned_flops: int
    extra: dict = field(default_factory=dict)  # free-form provenance (strategy, ratio, seed, ...)

    @property
    def flops_kept(self) -> float:
        return self.pruned_flops / self.dense_flops if self.dense_flops else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "family": self.family,
            "model_class": self.model_class,
            "base_config_hash": self.base_config_hash,
            "options": dict(self.options),
            "reference": dict(self.reference),
            "flops": {"dense": self.dense_flops, "pruned": self.pruned_flops},
            "towers": {name: [lay.to_dict() for lay in layers] for name, layers in self.towers.items()},
            "extra": dict(self.extra),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_dict(data: Any) -> Recipe:
        try:
            if not isinstance(data, dict):
                raise RecipeError("recipe JSON must be an object")
            version = data["format_version"]
            if version != RECIPE_FORMAT_VERSION:
                raise RecipeError(f"unsupported recipe format_version {version!r} (this comp-vlm reads {RECIPE_FORMAT_VERSION})")
            towers = {}
            for name, layers in data["towers"].items():
                towers[name] = []
                for lay in layers:
                    keep = lay.get("keep_ratio")
                    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float))
                                             or not math.isfinite(keep)):
                        raise RecipeError(f"recipe {name}: keep_ratio must be a number or null, got {keep!r}")
                    towers[name].append(
                        LayerRecipe(heads=_int_list(lay["heads"]), neurons=_int_list(lay["neurons"]),
                                    keep_ratio=None if keep is None else float(keep))
                    )
            flops = data["flops"]
            problem = reference_problem(data["reference"])
            if problem:
                raise RecipeError(f"recipe reference {problem}")
            return Recipe(
                format_version=version,
                family=str(data["family"]),
                model_class=str(data["model_class"]),
                base_config_hash=str(data["base_config_hash"]),
                options=dict(data.get("options", {})),
                reference=dict(data["reference"]),
                towers=towers,
                dense_flops=int(flops["dense"]),
                pruned_flops=int(flops["pruned"]),
                extra=dict(data.get("extra", {})),
            )
        except RecipeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise RecipeError(f"malformed recipe: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def from_json(text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe is not valid JSON (truncated or corrupt?): {exc}") from None
        return Recipe.from_dict(data)


def _int_list(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RecipeError("recipe unit indices must be lists of integers")
    return list(values)
