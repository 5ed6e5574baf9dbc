"""One source of defaults (issue 20 item 12): ``comp-vlm prune`` and the Python API share PruneConfig's defaults, a
built-in preset is a model plus the PruneConfig fields it changes, and each option table is defined once."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

import pytest

from comp_vlm import schedule, zoo
from comp_vlm.adapters.base import AdapterOptions
from comp_vlm.cli import build_parser, search_settings
from comp_vlm.errors import ConfigError
from comp_vlm.search import config as search_config
from comp_vlm.search.config import PruneConfig

#: prune flags that are PruneConfig fields but whose CLI default is the CLI's own: the checkpoint lives next to --out
CLI_OWNED = {"checkpoint_dir", "resume"}


def prune_parser() -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def config_flags() -> list[argparse.Action]:
    """The prune flags that set a PruneConfig field of the same name."""
    names = {f.name for f in dataclasses.fields(PruneConfig)} - CLI_OWNED
    return [a for a in prune_parser()._actions if a.dest in names]


def shown_default(action: argparse.Action) -> object:
    """The default ``--help`` prints for ``action``, read back through the flag's own type."""
    match = re.search(r"\(default: ([^)]*)\)", " ".join(action.help.split()))
    assert match, f"{action.option_strings[0]}: its help names no default"
    text = match.group(1)
    if text == "none":
        return ()
    return action.type(text) if action.type is not None else text


def test_help_shows_prune_configs_defaults_for_every_flag():
    defaults = PruneConfig()
    actions = config_flags()
    assert {a.dest for a in actions} >= {"ratio", "strategy", "snapshots", "seed", "stage_steps", "finetune_steps",
                                         "lr", "flops_step", "calibration_batches", "distill", "token_scorer"}
    for action in actions:
        expected = getattr(defaults, action.dest)
        assert shown_default(action) == expected, action.option_strings[0]
        if action.default is not None:  # None: unset, PruneConfig's default (or a built-in preset's) applies
            assert action.default == expected, action.option_strings[0]


def test_help_names_what_each_builtin_preset_overrides():
    text = " ".join(prune_parser().format_help().split())
    assert "demo-clip overrides stage_steps=20, finetune_steps=300, lr=0.0002;" in text
    assert ("demo-clip-quick overrides stage_steps=6, flops_step=0.2, finetune_steps=30, lr=0.0005, "
            "calibration_batches=2") in text


def _config(argv: list[str]) -> PruneConfig:
    """The search fields ``comp-vlm prune argv`` hands to PruneConfig (nothing is loaded or run)."""
    args = prune_parser().parse_args(argv)
    return PruneConfig(ratio=args.ratio, snapshots=args.snapshots, strategy=args.strategy, seed=args.seed,
                       **search_settings(args))


def test_a_model_directory_gets_prune_configs_defaults(tmp_path):
    config = _config(["--model", str(tmp_path / "my-clip"), "--out", str(tmp_path / "o")])
    assert dataclasses.asdict(config) == dataclasses.asdict(PruneConfig())
    flags = _config(["--model", str(tmp_path / "my-clip"), "--out", "o", "--stage-steps", "7", "--lr", "0.01"])
    assert (flags.stage_steps, flags.lr, flags.finetune_steps) == (7, 0.01, PruneConfig().finetune_steps)


@pytest.mark.parametrize("name", list(zoo.BUILTINS))
def test_a_builtin_model_gets_its_presets_overrides_and_flags_win(name):
    preset = zoo.BUILTINS[name]
    config = _config(["--model", name, "--out", "o"])
    assert dataclasses.asdict(config) == dataclasses.asdict(PruneConfig(**preset.prune_overrides))
    assert _config(["--model", name, "--out", "o", "--stage-steps", "9"]).stage_steps == 9


def test_builtin_presets_override_exactly_the_documented_fields():
    """The searches of the demo and ``prune --model demo-clip[-quick]`` before presets became data."""
    assert zoo.BUILTINS["demo-clip"].prune_overrides == {"stage_steps": 20, "finetune_steps": 300, "lr": 2e-4}
    assert zoo.BUILTINS["demo-clip-quick"].prune_overrides == {
        "stage_steps": 6, "flops_step": 0.2, "finetune_steps": 30, "lr": 5e-4, "calibration_batches": 2}
    demo = zoo.BUILTINS["demo-clip"].prune_config(snapshots=(0.5,), finetune_budget="equal-total")
    assert (demo.stage_steps, demo.flops_step, demo.finetune_steps, demo.lr, demo.calibration_batches) == \
        (20, 0.04, 300, 2e-4, 8)


def test_a_preset_overrides_search_fields_only():
    with pytest.raises(ConfigError, match="not ratio, stage_stepz"):
        zoo.ModelPreset("x", prune_overrides={"ratio": 0.5, "stage_stepz": 3})
    with pytest.raises(ConfigError, match="stage_steps"):
        zoo.ModelPreset("x", prune_overrides={"stage_steps": 1})  # checked as PruneConfig's


def test_the_benchmark_preset_fields_are_its_overrides():
    """``zoo.Preset`` (the benchmarks' BenchSettings base) derives ``prune_overrides`` from its search fields."""
    preset = zoo.Preset("b", stage_steps=50, prune_lr=2e-4)
    assert preset.prune_overrides == {"stage_steps": 50, "lr": 2e-4, "finetune_budget": "equal-total"}
    changed = dataclasses.replace(preset, stage_steps=6)
    assert changed.prune_config().stage_steps == 6 and changed.prune_config().lr == 2e-4


def test_option_tables_are_defined_once():
    assert search_config.WARMUP_ORDERS is schedule.WARMUP_ORDERS
    assert search_config.STRATEGIES == schedule.STRATEGIES + tuple(search_config.VARIANTS)
    assert set(search_config.VARIANTS.values()) <= set(schedule.STRATEGIES)


def test_mps_and_site_defaults_are_defined_once():
    config, mps, options = PruneConfig(), schedule.MPSConfig(), AdapterOptions()
    for name in ("rho", "tau", "lambda0", "i_max", "warmup_order"):
        assert getattr(config, name) == getattr(mps, name), name
    for name in ("dead_compute", "site_start", "site_every", "token_scorer"):
        assert getattr(config, name) == getattr(options, name), name


@pytest.mark.parametrize("field,value", [("i_max", 0.5), ("i_max", 0), ("tau", math.inf)])
def test_mps_ranges_are_prune_configs(field, value):
    """MPSConfig and PruneConfig refuse the same values of the fields they share, with the same message."""
    with pytest.raises(ConfigError) as via_prune:
        PruneConfig(**{field: value})
    with pytest.raises(ConfigError) as via_mps:
        schedule.MPSConfig(**{field: value})
    assert str(via_mps.value) == str(via_prune.value)


@pytest.mark.parametrize("field,value", [("site_start", -1), ("site_every", 0), ("token_scorer", "nope"),
                                         ("dead_compute", 1)])
def test_adapter_option_rules_are_prune_configs(field, value):
    with pytest.raises(ConfigError) as via_prune:
        PruneConfig(**{field: value})
    with pytest.raises(ConfigError) as via_options:
        AdapterOptions(**{field: value})
    assert str(via_options.value) == str(via_prune.value)
