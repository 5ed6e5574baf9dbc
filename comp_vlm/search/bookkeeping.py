"""The search's FLOPs bookkeeping as data (method.md §1: during the search FLOPs are structural).

The pruner reads the model's dense structure once (:meth:`comp_vlm.adapters.base.ModelAdapter.dense_structure`)
and derives every candidate's structure from it with these pure functions: the units each layer keeps (from the
pruner's selection) and the keep ratio of each token site. No model, no adapter: planning a stage, its token
bisection included, never walks the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch

from ..adapters.base import TowerSpec, structure_fields
from ..adapters.units import UnitKey
from ..structure import TowerStructure

SiteKeeps = Mapping[str, Mapping[int, float | Mapping[str, float]]]
"""Per tower, per site layer: the site's keep ratio (one for every pool, or a ratio per pool name); a layer not
listed keeps all its tokens."""


def kept_units(selected: Mapping[UnitKey, torch.Tensor]) -> dict[UnitKey, int]:
    """Units each group keeps: those not ``selected`` (a boolean mask per group, True: removed)."""
    return {key: int((~sel).sum()) for key, sel in selected.items()}


def dense_counts(specs: Iterable[TowerSpec], layers: Mapping[str, int]) -> dict[UnitKey, int]:
    """Every group of ``specs`` (``layers[tower]`` layers each) at its kind's dense count."""
    return {(u.kind, s.name, i): u.dense for s in specs for i in range(layers[s.name]) for u in s.units}


def at_floors(counts: Mapping[UnitKey, int], floors: Mapping[UnitKey, int]) -> dict[UnitKey, int]:
    """``counts`` with each group of ``floors`` cut to its floor (none added back)."""
    return {key: min(n, floors[key]) if key in floors else n for key, n in counts.items()}


def derive_structure(dense: Sequence[TowerStructure], specs: Mapping[str, TowerSpec],
                     counts: Mapping[UnitKey, int], keeps: SiteKeeps) -> list[TowerStructure]:
    """The towers of ``dense`` with ``counts[(kind, tower, layer)]`` units of each kind (every structure field of a
    kind follows its count) and the site keep ratios ``keeps``; everything else as in ``dense``."""
    towers = []
    for t in dense:
        spec, tower_keeps = specs[t.name], keeps.get(t.name, {})
        layers = tuple(replace(lay, site_keep=tower_keeps.get(i),
                               **structure_fields(spec, {u.kind: counts[(u.kind, t.name, i)] for u in spec.units}))
                       for i, lay in enumerate(t.layers))
        towers.append(replace(t, layers=layers))
    return towers


__all__ = ["SiteKeeps", "at_floors", "dense_counts", "derive_structure", "kept_units"]
