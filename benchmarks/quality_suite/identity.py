"""What one quality-suite run is: the benchmark's identity (world, model, task, bench settings), the invocation's
base config, the suite key that groups runs, and the identity fields every record carries."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from bench_world import Bench, BenchSettings

import comp_vlm
from comp_vlm.dense import cache_key

from .arms import ARM_LEVEL, arm_label, config_dict, parse_overrides
from .provenance import git_state, versions

# PruneConfig fields added after suites were recorded, at the value that reproduces the engine before them: left out
# of the suite key at that value, so earlier suites stay the same suites (the records still hold the full config)
NEUTRAL: dict[str, Any] = comp_vlm.search.config.NEUTRAL
KEEP = object()


def suite_key(identity: dict[str, Any], base: dict[str, Any], default_selection: Any) -> str:
    """Short stable hash of the world, model, task and bench settings (``identity``), the invocation's PruneConfig
    ``base`` (a ``config_dict``, before arm options) minus the arm-level fields, and the default selection rule."""
    config = {k: v for k, v in base.items() if k not in ARM_LEVEL and NEUTRAL.get(k, KEEP) != v}
    payload = {**identity, "config": config,
               "default_selection": default_selection}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def bench_identity(bench: Bench) -> dict[str, Any]:
    """The world, model (bench settings name, the shapes and the dense model's cache key), task and bench
    settings of the benchmark: what a suite key and every record carry."""
    s = bench.settings
    cfg = bench.config()
    v, t = cfg.vision_config, cfg.text_config
    model = {"name": s.name, "dense_id": cache_key(cfg, s.dense, bench.data_id()), "projection_dim": cfg.projection_dim,
             "vision": {"hidden": v.hidden_size, "intermediate": v.intermediate_size, "layers": v.num_hidden_layers,
                        "heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size},
             "text": {"hidden": t.hidden_size, "intermediate": t.intermediate_size, "layers": t.num_hidden_layers,
                      "heads": t.num_attention_heads, "vocab": t.vocab_size,
                      "max_positions": t.max_position_embeddings}}
    task = {"name": "retrieval", "gallery_size": bench.task.gallery_size, "metric": bench.task.primary_metric}
    return {"world": bench.data_id(), "model": model, "task": task, "bench": s.record()}


def base_config(settings: BenchSettings, ratios: list[float], values: dict[str, Any]) -> Any:
    """The invocation's PruneConfig: the bench settings, every ratio as a snapshot, ``--set`` values on top."""
    bench = {"stage_steps": settings.stage_steps, "flops_step": settings.flops_step,
             "finetune_steps": settings.finetune_steps, "calibration_batches": settings.calibration_batches,
             "lr": settings.prune_lr, "finetune_budget": settings.finetune_budget}
    ratios = sorted(set(ratios))
    return comp_vlm.PruneConfig(ratio=ratios[-1], snapshots=tuple(ratios), progress=False, **(bench | values))


@dataclasses.dataclass
class Invocation:
    """What every run of one invocation shares: identity, suite key, commit, ``--set`` and the base config."""

    identity: dict[str, Any]
    base: Any
    overrides: dict[str, str]  # --set as typed (recorded, for the report's repeat commands)
    commit: str | None
    dirty: bool | None
    default_selection: Any
    device: str = "cpu"  # recorded with every run, not part of the suite key (the same suite on other hardware)
    versions: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance.versions: recorded, not keyed

    @property
    def suite(self) -> str:
        return suite_key(self.identity, config_dict(self.base), self.default_selection)

    def run_identity(self, arm: str, config: Any) -> dict[str, Any]:
        """The identity fields of one run of ``arm`` with ``config``."""
        return {"strategy": arm, "arm": arm_label(arm, getattr(config, "selection", None), self.default_selection),
                "seed": config.seed, "suite": self.suite, **self.identity, "commit": self.commit,
                "dirty": self.dirty, "overrides": self.overrides, "device": self.device, "versions": self.versions,
                "config": config_dict(config)}


def make_invocation(bench: Bench, ratios: list[float], set_items: list[str], device: str = "cpu") -> Invocation:
    """Parse ``--set``, build the base config and read the commit and versions; ``device`` ("cpu" or "cuda") is
    recorded with the GPU's name. ValueError / ConfigError (one line) on bad input."""
    values = parse_overrides(set_items)
    base = base_config(bench.settings, ratios, values)
    root = Path(comp_vlm.__file__).resolve().parents[1]
    if Path(__file__).resolve().parents[2] != root:  # benchmarks/quality_suite/identity.py
        print(f"note: comp_vlm is imported from {root}, not this checkout; recording that repository's commit")
    commit, dirty = git_state(root)
    overrides = dict(item.split("=", 1) for item in set_items)
    return Invocation(bench_identity(bench), base, {k.strip(): v for k, v in overrides.items()}, commit, dirty,
                      getattr(comp_vlm.PruneConfig(), "selection", None),
                      device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})", versions(root))
