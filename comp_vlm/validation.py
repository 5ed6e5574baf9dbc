"""Type and range checks of configuration dataclasses, driven by their fields' annotations plus a small table.

:func:`validate_prune_config` checks every field of a :class:`~comp_vlm.search.PruneConfig` against its type
annotation (so a new field is type-checked without touching this module), then the numeric ranges in
:data:`RANGES` and the content checks in :data:`CONTENT`, then the targets (:func:`targets_problem`). Every failure
is a :class:`FieldError` naming the field(s), which a caller can rename (the CLI names its flags). Rules that need the
engine's own tables (strategy names, cost measures) stay in ``PruneConfig``.

Target ratios are told apart by :func:`ratio_key` (at most :data:`KEY_DECIMALS` decimals): the key of a snapshot's
directory and report entry. Snapshots must lie below ``ratio``, and no two targets may share a key.

Type rules: ``bool`` is not an ``int``; an ``int`` is a ``float``; a float must be finite; ``tuple[X, ...]``
accepts a tuple or list of X; a ``str`` field named ``*_path`` or ``*_dir`` also accepts an ``os.PathLike``;
annotations it does not know (``Any``, protocols) are not checked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError


class FieldError(ConfigError):
    """A :class:`ConfigError` about configuration fields. ``template`` names them ``{0}``, ``{1}``, ... (other
    braces doubled), so :meth:`renamed` can give the message under the names the user knows (a CLI's flags)."""

    def __init__(self, template: str, *fields: str) -> None:
        self.template, self.fields = template, fields
        super().__init__(template.format(*fields))

    def renamed(self, names: dict[str, str]) -> str:
        """The message with every field ``f`` called ``names.get(f, f)``."""
        return self.template.format(*(names.get(f, f) for f in self.fields))


def _field_error(name: str, detail: str) -> FieldError:
    """``name detail`` as a :class:`FieldError` of the field ``name``."""
    return FieldError("{0} " + detail.replace("{", "{{").replace("}", "}}"), name)


#: decimals that tell target ratios apart (see :func:`ratio_key`)
KEY_DECIMALS = 4


def ratio_key(ratio: float) -> str:
    """The key of a target ratio (snapshot directory ``r<key>``, report entry): rounded to :data:`KEY_DECIMALS`
    decimals, written with at least two (0.3 -> ``0.30``, 0.333 -> ``0.333``)."""
    text = f"{ratio:.{KEY_DECIMALS}f}".rstrip("0")
    decimals = len(text.partition(".")[2])
    return text if decimals >= 2 else f"{ratio:.2f}"


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval; ``None`` is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


#: PruneConfig fields whose values (or elements) must lie in a range; the one table for the fields of the same
#: name in schedule.MPSConfig and adapters.AdapterOptions too
RANGES: dict[str, Range] = {
    "ratio": Range(0, 1, low_open=True, high_open=True),
    "snapshots": Range(0, 1, low_open=True, high_open=True),
    "flops_step": Range(0, 1, low_open=True),
    "stage_steps": Range(2),
    "min_stage_fraction": Range(0, 1, high_open=True),
    "calibration_batches": Range(1),
    "finetune_steps": Range(0),
    "lr": Range(0),  # 0 freezes the weights (tests measure costs without training)
    "weight_decay": Range(0),
    "seed": Range(0, 2**32 - 1),  # numpy's seed range
    "head_floor": Range(1),
    "neuron_floor": Range(0, 1),
    "sjp_token_share": Range(0, 1),
    "distill": Range(0),
    "bootstrap": Range(0),
    "rho": Range(0, 1),
    "tau": Range(0, low_open=True),
    "lambda0": Range(0, 1),
    "i_max": Range(1),
    "site_start": Range(0),
    "site_every": Range(1),
    "token_max_cut": Range(0, 1, low_open=True),
    "token_floor": Range(0, 1, low_open=True),
    "param_max_cut": Range(0, 1, low_open=True),
    "sliver_fraction": Range(0, 1, high_open=True),
    "finetune_warmup": Range(0, 1, high_open=True),
    "budget_slack_stages": Range(0),
}


def reference_problem(value: Any) -> str | None:
    """A FLOPs reference shape maps names (image_size, text_length, ...) to positive integers."""
    if value is None:
        return None
    for key, size in value.items():
        if not isinstance(key, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return f"must map names to positive integers (e.g. {{'image_size': 224, 'text_length': 16}}), got {value!r}"
    return None


def choice_problem(value: Any, choices: Any) -> str | None:
    """``value`` is one of ``choices`` (names, in the order the error lists them)."""
    return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def token_scorer_problem(value: str) -> str | None:
    """A token scorer is one of the built-in scorers, by name (imported here: this module needs no torch)."""
    from .adapters.runtime import TOKEN_SCORERS

    return choice_problem(value, TOKEN_SCORERS)


def token_reducer_problem(value: str) -> str | None:
    """A token reducer is one of the built-in reducers, by name."""
    from .adapters.runtime import TOKEN_REDUCERS

    return choice_problem(value, TOKEN_REDUCERS)


#: PruneConfig (and AdapterOptions) fields with a content check: a function returning what is wrong, or None.
CONTENT: dict[str, Callable[[Any], str | None]] = {"reference": reference_problem,
                                                   "token_scorer": token_scorer_problem,
                                                   "token_reducer": token_reducer_problem}


# ---- types ----------------------------------------------------------------------------------------------------
def _is_union(hint: Any) -> bool:
    return get_origin(hint) is Union or isinstance(hint, types.UnionType)


def matches(value: Any, hint: Any, path_like: bool = False) -> bool:
    """Whether ``value`` is of the annotated type (see the module docstring for the rules)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if _is_union(hint):
        return any(matches(value, a, path_like) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) or (path_like and isinstance(value, os.PathLike))
    if origin is Literal:
        return value in args
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return all(matches(v, args[0]) for v in value) if args else True
        return not args or (len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation these rules do not cover


def describe(hint: Any) -> str:
    """A readable name of an annotation: ``a float``, ``a tuple of floats``, ``a str or None``."""
    if _is_union(hint):
        return " or ".join(describe(a) for a in get_args(hint))
    if hint is None or hint is type(None):
        return "None"
    origin, args = get_origin(hint), get_args(hint)
    if origin in (tuple, list) and args:
        return f"a {origin.__name__} of {describe(args[0]).split(' ', 1)[-1]}s"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    name = getattr(origin or hint, "__name__", str(hint))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _numbers(value: Any) -> list[float]:
    """The numbers in a value (itself, or the elements of a tuple/list), booleans excluded."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_field(name: str, value: Any, hint: Any) -> None:
    """Type, finiteness, range and content checks of one field."""
    if not matches(value, hint, path_like=name.endswith(("_path", "_dir"))):
        raise _field_error(name, f"must be {describe(hint)}, got {type(value).__name__} {value!r}")
    for number in _numbers(value):
        if isinstance(number, float) and not math.isfinite(number):
            raise _field_error(name, f"must be finite, got {value!r}")
        if name in RANGES and not RANGES[name].contains(number):
            raise _field_error(name, f"must be {RANGES[name].describe()}, got {value!r}")
    problem = CONTENT[name](value) if name in CONTENT else None
    if problem:
        raise _field_error(name, problem)


def validate_dataclass(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` (see :func:`check_field`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check_field(f.name, getattr(obj, f.name), hints.get(f.name, Any))


def targets_problem(ratio: float, snapshots: tuple[float, ...]) -> FieldError | None:
    """What is wrong with a search's targets: a snapshot above the final ratio (the search would go past the ratio
    and the model at the ratio would be lost), or two targets with the same :func:`ratio_key`."""
    above = [s for s in snapshots if s > ratio]
    if above:
        return FieldError(f"{{0}} {', '.join(map(str, above))} exceed{'s' * (len(above) == 1)} {{1}} {ratio}: "
                          "snapshots are taken on the way to the ratio, so each must be below it", "snapshots", "ratio")
    seen: dict[str, float] = {ratio_key(ratio): ratio}
    for s in snapshots:
        key = ratio_key(s)
        if key in seen and seen[key] != s:
            pair = f"{{0}} {s} and {{1}} {ratio}" if seen[key] == ratio else f"{{0}} {seen[key]} and {s}"
            return FieldError(f"{pair} are the same target to {KEY_DECIMALS} decimals ({key}): give one of them",
                              "snapshots", "ratio")
        seen[key] = s
    return None


def validate_prune_config(config: Any) -> None:
    """Raise :class:`FieldError` on the first field of a ``PruneConfig`` with a wrong type or value, or on targets
    that do not fit together (:func:`targets_problem`)."""
    validate_dataclass(config)
    problem = targets_problem(config.ratio, tuple(config.snapshots))
    if problem is not None:
        raise problem
