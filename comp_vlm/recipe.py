"""The pruning recipe: a JSON description of a pruned model's structure (no weights, no pickle).

It records, per tower and layer, the kept units of each kind (indices into the dense model, under the kind's name:
"head", "neuron", "cross_head", ...) and the keep ratio of each token pool at the layer's token site (CLIP: one pool,
:data:`TOKEN_POOL`; none: no site); the adapter options; the reference input shape for FLOPs; the dense and pruned
FLOPs; and a hash of the base (dense) config, so a recipe cannot be applied to a different architecture. An option
a recipe lacks reads as its legacy value (:data:`LEGACY_OPTIONS`): a recipe without ``token_reducer`` loads as
``drop``, whatever the default.

Format 2 writes a layer as ``{"units": {kind: [indices]}, "keep_ratios": {pool: ratio}}``. Format 1 (comp-vlm up to
commit 0d57e16) wrote ``{"heads": [...], "neurons": [...], "keep_ratio": ratio or null}``; reading migrates it
(:func:`migrate_v1`), writing always gives format 2.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import RecipeError
from .structure import TOKEN_POOL
from .validation import reference_problem

RECIPE_FORMAT_VERSION = 2
RECIPE_FILE = "comp_recipe.json"
# TOKEN_POOL (from structure): the one token pool of a single-pool site (CLIP); format 1's "keep_ratio" is its ratio
LEGACY_OPTIONS = {"dead_compute": True, "site_start": 1, "site_every": 1, "cit": True, "token_scorer": "attention",
                  "token_scorer_seed": 0, "token_reducer": "drop"}
"""The value of every adapter option in the comp-vlm that wrote a recipe without it (what that model computed): a
recipe that lacks an option loads with it from here, never with the current default (an option added later joins
this table at the value that reproduces the models before it)."""


@dataclass
class LayerRecipe:
    """One layer: the kept (dense) indices per unit kind and the keep ratio per token pool of its site (checked on
    construction: indices sorted, unique and non-negative; ratios in (0, 1])."""

    units: dict[str, list[int]]
    keep_ratios: dict[str, float] = field(default_factory=dict)  # empty: no token site at this layer

    def __post_init__(self) -> None:
        self.units = {kind: _indices(kind, idx) for kind, idx in _named(self.units, "units").items()}
        self.keep_ratios = {pool: _ratio(pool, r) for pool, r in _named(self.keep_ratios, "keep_ratios").items()}

    @staticmethod
    def from_units(kept: dict[str, list[int]], keep_ratio: float | None = None) -> LayerRecipe:
        """A layer entry from the kept (dense) unit indices per kind and the keep ratio of a single-pool site."""
        return LayerRecipe(dict(kept), {} if keep_ratio is None else {TOKEN_POOL: keep_ratio})

    def kept(self, kind: str) -> list[int]:
        """The kept (dense) indices of one unit kind."""
        if kind not in self.units:
            raise RecipeError(f"recipe layer holds no {kind!r} units (it holds {sorted(self.units)})")
        return self.units[kind]

    @property
    def keep_ratio(self) -> float | None:
        """The keep ratio of a single-pool token site (None: no site)."""
        if len(self.keep_ratios) > 1:
            raise RecipeError(f"recipe layer has token pools {sorted(self.keep_ratios)}: read keep_ratios")
        return next(iter(self.keep_ratios.values()), None)

    def to_dict(self) -> dict:
        return {"units": {kind: list(idx) for kind, idx in self.units.items()}, "keep_ratios": dict(self.keep_ratios)}

    @staticmethod
    def from_dict(data: Any) -> LayerRecipe:
        with _malformed("recipe layer"):
            if not isinstance(data, dict):
                raise RecipeError("a recipe layer must be an object")
            return LayerRecipe(data["units"], data["keep_ratios"])


@dataclass
class Recipe:
    format_version: ClassVar[int] = RECIPE_FORMAT_VERSION  # what to_dict writes (from_dict migrates older ones)
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
        """A recipe from its JSON object, format 1 (migrated) or 2; anything malformed is a RecipeError."""
        with _malformed("recipe"):
            if not isinstance(data, dict):
                raise RecipeError("recipe JSON must be an object")
            version = data["format_version"]
            if version == 1 and type(version) is int:
                data = migrate_v1(data)
            elif version != RECIPE_FORMAT_VERSION or type(version) is not int:
                raise RecipeError(f"unsupported recipe format_version {version!r} "
                                  f"(this comp-vlm reads 1 to {RECIPE_FORMAT_VERSION})")
            towers = {name: _tower(name, layers) for name, layers in data["towers"].items()}
            flops = data["flops"]
            problem = reference_problem(data["reference"])
            if problem:
                raise RecipeError(f"recipe reference {problem}")
            return Recipe(
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

    @staticmethod
    def from_json(text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe is not valid JSON (truncated or corrupt?): {exc}") from None
        return Recipe.from_dict(data)


def migrate_v1(data: dict) -> dict:
    """A format-1 recipe object as format 2 (a new object; ``data`` is left as it is): each layer's "heads" and
    "neurons" become its "head" and "neuron" units, its "keep_ratio" the ratio of pool :data:`TOKEN_POOL` (null or
    absent: no pools). Only the layout changes; :meth:`Recipe.from_dict` checks the values."""
    with _malformed("format-1 recipe"):
        if data["format_version"] != 1:
            raise RecipeError(f"migrate_v1 needs a format-1 recipe, got format_version {data['format_version']!r}")
        out = copy.deepcopy(data)
        out["format_version"] = 2
        out["towers"] = {name: [_layer_v1(lay) for lay in layers] for name, layers in out["towers"].items()}
        return out


def _layer_v1(lay: Any) -> dict:
    if not isinstance(lay, dict):
        raise RecipeError("a format-1 recipe layer must be an object")
    keep = lay.get("keep_ratio")
    return {"units": {"head": lay["heads"], "neuron": lay["neurons"]},
            "keep_ratios": {} if keep is None else {TOKEN_POOL: keep}}


@contextmanager
def _malformed(what: str) -> Iterator[None]:
    """Reading an untrusted object: a missing key or a wrong type becomes a one-line RecipeError."""
    try:
        yield
    except RecipeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise RecipeError(f"malformed {what}: {type(exc).__name__}: {exc}") from None


def _tower(name: str, layers: Any) -> list[LayerRecipe]:
    if not isinstance(layers, list):
        raise RecipeError(f"recipe tower {name!r} must be a list of layers")
    out = []
    for i, lay in enumerate(layers):
        try:
            out.append(LayerRecipe.from_dict(lay))
        except RecipeError as exc:
            raise RecipeError(f"recipe {name} layer {i}: {exc}") from None
    return out


def _named(values: Any, what: str) -> dict:
    if not isinstance(values, dict) or not all(isinstance(k, str) and k for k in values):
        raise RecipeError(f"{what} must be an object keyed by non-empty names")
    return values


def _indices(kind: str, values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RecipeError(f"{kind!r} unit indices must be a list of integers")
    if values != sorted(set(values)) or (values and values[0] < 0):
        raise RecipeError(f"{kind!r} unit indices must be non-negative, sorted and unique")
    return list(values)


def _ratio(pool: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"keep_ratios[{pool!r}] must be a number, got {value!r}")
    if not 0.0 < value <= 1.0:
        raise RecipeError(f"keep_ratios[{pool!r}] = {value!r} is outside (0, 1]")
    return float(value)
