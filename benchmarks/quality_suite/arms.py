"""The arm catalogue of the quality suite: the arms (engine strategies, their variants, the search-fix and sanity
arms), the PruneConfig each arm runs from the invocation's base config, arm labels, and ``--set`` parsing."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import comp_vlm

MAIN = ("comp", "param-only", "token-only", "sjp", "cycle", "random-mode")
ABLATIONS = ("greedy", "no-cip", "uniform-rms", "no-cit", "no-re", "no-hi")
# arms that are a strategy run with other engine options (recorded under the arm's name in the "strategy" field)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "comp-immediate": ("comp", {"cost_measure": "immediate"}),  # MPS cost = damage before any recovery training
    "comp-metric": ("comp", {"badness": "metric"}),  # B = -validation R@1 (the paper's choice) instead of val loss
}
# the PruneConfig options that reproduce the engine as it was before the search fixes, and the fields of each fix
LEGACY_OPTIONS: dict[str, Any] = {"selection": "per-flop", "token_plan": "legacy", "warmup_order": "fixed",
                                  "sliver_fraction": 0.0, "min_stage_fraction": 0.25, "lr_schedule": "constant",
                                  "finetune_schedule": "constant", "distill": 0.0}
FIXES: dict[str, tuple[str, ...]] = {"selection": ("selection",), "tokens": ("token_plan", "min_stage_fraction"),
                                     "warmup": ("warmup_order",), "sliver": ("sliver_fraction",),
                                     "recovery": ("lr_schedule", "finetune_schedule", "distill")}


FROM_SUITE = "<suite value>"  # an arm option that takes the suite's value: the engine default, or --set


def fix_arms(legacy: dict[str, Any], fixes: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``old`` = comp with the legacy options; ``old+<fix>`` = the legacy options with that fix's fields at the
    suite's value (the engine default unless ``--set`` changes it)."""
    arms = {"old": ("comp", dict(legacy))}
    for fix, fields in fixes.items():
        arms[f"old+{fix}"] = ("comp", legacy | dict.fromkeys(fields, FROM_SUITE))
    return arms


# sanity baselines (method.md §4) that recent VLM-pruning benchmarks found strong; run by run.SPECIAL where not a config
SANITY: dict[str, tuple[str, dict[str, Any]]] = {
    "sjp-random": ("sjp", {"token_scorer": "random"}),  # sjp with its tokens chosen at random (seeded)
    "downsample": ("param-only", {}),  # tokens removed by a lower input resolution (run_downsample)
}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {**VARIANTS, **SANITY, **fix_arms(LEGACY_OPTIONS, FIXES)}
COMP_FAMILY = ("comp", *(a for a in ARMS if a not in SANITY))  # comp with other options: MPS sections in the report
SINGLE_MODE = ("param-only", "token-only")
NAIVE_JOINT = ("sjp", "cycle", "random-mode", *SANITY)
CONTROL = "dense+ft"  # the dense model trained as long as a comp run
LEGACY = "legacy"  # the suite of records written before runs carried their identity
UNRECORDED = ("log_path", "checkpoint_dir", "resume", "progress")  # PruneConfig fields that are no part of a run
ARM_LEVEL = ("strategy", "seed", "selection")  # fields that differ between the arms of one suite (+ arm options)
NOT_SETTABLE = {"strategy": "--strategies", "seed": "--seeds", "ratio": "--ratios", "snapshots": "--ratios",
                **{k: "nothing (not recorded)" for k in UNRECORDED}}


def arm_strategy(arm: str) -> tuple[str, dict[str, Any]]:
    """The engine strategy and extra PruneConfig options of an arm name."""
    return ARMS.get(arm, (arm, {}))


def config_fields(config_type: type = comp_vlm.PruneConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(config_type)]


def arm_config(base: Any, arm: str, seed: int, progress: bool = False) -> Any:
    """``base`` (the invocation's PruneConfig) as the arm runs it: its strategy and options (which win over
    ``--set``), ``seed``. Raises ConfigError naming any option the engine's PruneConfig lacks."""
    strategy, options = arm_strategy(arm)
    missing = [k for k in options if k not in config_fields(type(base))]
    if missing:
        raise comp_vlm.ConfigError(f"arm {arm}: PruneConfig has no field {', '.join(missing)} "
                                   "(the arm needs the engine's search fixes)")
    options = {k: getattr(base, k) if v == FROM_SUITE else v for k, v in options.items()}
    return dataclasses.replace(base, strategy=strategy, seed=seed, progress=progress, **options)


def config_dict(config: Any) -> dict[str, Any]:
    """Every PruneConfig field but paths and switches, as JSON values (tuples become lists)."""
    return {k: json.loads(json.dumps(v)) for k, v in dataclasses.asdict(config).items() if k not in UNRECORDED}


def arm_label(arm: str, selection: Any, default_selection: Any) -> str:
    """The arm name, plus ``@<selection>`` when the run's unit-selection rule is not the one the arm implies (its
    own option, else the suite's default)."""
    expected = arm_strategy(arm)[1].get("selection", FROM_SUITE)
    return arm if selection == (default_selection if expected == FROM_SUITE else expected) else f"{arm}@{selection}"


def suite_of(record: dict) -> str:
    return record.get("suite", LEGACY)


def label_of(record: dict) -> str:
    return record.get("arm", record["strategy"])


def base_name(label: str) -> str:
    return label.split("@", 1)[0]


def parse_value(text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint`` (bool, int, float, str, tuple[X, ...] as comma-separated, dict as
    JSON, ``X | None`` with ``none``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise ValueError(f"cannot parse a value of type {hint}")
        return parse_value(text, options[0])
    if hint is bool:
        word = text.strip().lower()
        if word in ("1", "true", "yes", "on") or word in ("0", "false", "no", "off"):
            return word in ("1", "true", "yes", "on")
        raise ValueError(f"expected a bool (true/false), got {text!r}")
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"expected {hint.__name__}, got {text!r}") from None
    if origin is tuple:
        return tuple(parse_value(x.strip(), args[0] if args else str) for x in text.split(",") if x.strip())
    if hint is dict or origin is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {text!r}")
        return value
    raise ValueError(f"cannot parse a value of type {hint}")


def parse_overrides(items: list[str], config_type: type = comp_vlm.PruneConfig) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as PruneConfig values parsed by each field's type; ValueError (one line) for a
    malformed item, an unknown field or one the suite sets itself."""
    hints = typing.get_type_hints(config_type)
    fields = config_fields(config_type)
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"--set {key}: PruneConfig has no field {key!r}")
        if key in NOT_SETTABLE:
            raise ValueError(f"--set {key}: set by {NOT_SETTABLE[key]}, not --set")
        try:
            values[key] = parse_value(text, hints[key])
        except ValueError as exc:
            raise ValueError(f"--set {item}: {exc}") from None
    return values


def order_key(label: str) -> tuple[int, str]:
    known = (CONTROL,) + MAIN + ABLATIONS + tuple(ARMS)
    name = base_name(label)
    return (known.index(name) if name in known else len(known), label)


def is_baseline(name: str) -> bool:
    """Single-mode and naive joint arms, and any arm the suite does not know (not comp, its ablations or options)."""
    return name in SINGLE_MODE + NAIVE_JOINT or name not in (CONTROL,) + MAIN + ABLATIONS + tuple(ARMS)
