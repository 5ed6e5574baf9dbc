"""The search configuration: :class:`PruneConfig`, the strategy names and the option tables its own checks use
(field types and ranges are :mod:`comp_vlm.validation`'s)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .. import importance
from ..adapters.base import AdapterOptions
from ..errors import ConfigError
from ..schedule import STRATEGIES as SCHEDULES
from ..schedule import WARMUP_ORDERS, MPSConfig
from ..validation import validate_prune_config
from . import budget

VARIANTS = {"no-cip": "comp", "uniform-rms": "comp", "no-cit": "comp"}
"""Strategies that run another's mode schedule with other unit weights or token scores (ablations of CoMP)."""
STRATEGIES = SCHEDULES + tuple(VARIANTS)
COST_MEASURES = ("recovered", "immediate", "probe")
LR_SCHEDULES = ("constant", "cosine")
FINETUNE_BUDGETS = ("fixed", "equal-total")

NEUTRAL: dict[str, Any] = {"token_scorer": "attention", "param_max_cut": 1.0, "token_reducer": "drop"}
"""PruneConfig fields added after searches were recorded, at the value that reproduces the search before them: a
search checkpoint without the field resumes at it, and the quality suite leaves a field at it out of its suite key
(earlier suites keep their keys)."""


@dataclass
class PruneConfig:
    """Everything that shapes a search. ``ratio`` is the fraction of dense FLOPs removed (0.8 keeps 20%)."""

    ratio: float = 0.8
    snapshots: tuple[float, ...] = ()
    strategy: str = "comp"
    flops_step: float = 0.04
    stage_steps: int = 50
    calibration_batches: int = 8
    finetune_steps: int = 100
    lr: float = 5e-5
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # search learning rate: constant, or cosine to 0 over the nominal search
    finetune_schedule: str = "cosine"  # fine-tuning: warm-up then cosine decay to 0, or constant
    finetune_warmup: float = 0.1  # share of the fine-tuning steps spent warming up
    finetune_budget: str = "fixed"  # or "equal-total": fine-tuning tops every snapshot up to the same total steps
    budget_slack_stages: int = 4  # equal-total: the total allows this many stages beyond the nominal search
    seed: int = 0
    badness: str = "val_loss"  # or "metric" (B = -metric, the paper's choice)
    cost_measure: str = "recovered"  # or "immediate": B with the stage's units/tokens removed, before any training
    normalization: str = "rank"  # per-layer normaliser of the per-flop selection rule
    selection: str = "kind-rank"  # unit selection rule (importance.SELECTIONS; "per-flop" = the first rule)
    token_plan: str = "linear"  # per-site pyramid of a token mode (budget.TOKEN_PLANS; "legacy" = the first rule)
    token_max_cut: float = 0.5  # a stage removes at most this share of the tokens left at any site
    token_floor: float = 0.1  # every site keeps >= this share of the prunable tokens entering its tower
    param_max_cut: float = 1.0  # a parameter stage removes at most this share of what its mode can still remove
    warmup_order: str = MPSConfig.warmup_order  # MPS warm-up order of the untried modes (schedule.WARMUP_ORDERS)
    sliver_fraction: float = 0.25  # no remainder below this share of flops_step before a snapshot; no HI from it
    head_floor: int = 1
    neuron_floor: float = 0.05
    sjp_token_share: float = 0.5
    min_stage_fraction: float = 0.25  # a mode at its floors that can remove less than this share is exhausted
    distill: float = 0.0  # weight of the distillation loss towards the dense model (search and fine-tuning)
    stage_metric: bool = True  # also log the task metric on the validation batches after every stage
    bootstrap: int = 200
    rho: float = MPSConfig.rho  # MPS (schedule.MPSConfig): RE probability, temperature; HI decay
    tau: float = MPSConfig.tau
    lambda0: float = MPSConfig.lambda0
    i_max: int = MPSConfig.i_max
    dead_compute: bool = AdapterOptions.dead_compute  # what the model computes (adapters.AdapterOptions)
    site_start: int = AdapterOptions.site_start
    site_every: int = AdapterOptions.site_every
    token_scorer: str = AdapterOptions.token_scorer  # how token sites rank tokens, seeded by seed
    token_reducer: str = AdapterOptions.token_reducer  # what sites do with the tokens they do not keep
    reference: dict | None = None
    log_path: str | None = None
    checkpoint_dir: str | None = None  # search checkpoints at every stage boundary
    resume: bool = False  # continue from checkpoint_dir (same arguments) if a checkpoint is there
    progress: bool = True

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        skip = {"log_path", "checkpoint_dir", "resume", "progress"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}

    def __post_init__(self) -> None:
        validate_prune_config(self)  # types of every field, ranges from validation.RANGES, the targets
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.badness not in ("val_loss", "metric"):
            raise ConfigError(f"badness must be 'val_loss' or 'metric', got {self.badness!r}")
        if self.cost_measure not in COST_MEASURES:
            raise ConfigError(f"cost_measure must be one of {', '.join(COST_MEASURES)}, got {self.cost_measure!r}")
        if self.normalization not in importance.NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {importance.NORMALIZATIONS}")
        for name, allowed in (("selection", importance.SELECTIONS), ("token_plan", budget.TOKEN_PLANS),
                              ("warmup_order", WARMUP_ORDERS), ("lr_schedule", LR_SCHEDULES),
                              ("finetune_schedule", LR_SCHEDULES), ("finetune_budget", FINETUNE_BUDGETS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def targets(self) -> list[float]:
        return sorted(set(self.snapshots) | {self.ratio})

    def weighting(self) -> str:
        return {"no-cip": "no-cip", "uniform-rms": "uniform-rms"}.get(self.strategy, "cip")

    def scheduler_strategy(self) -> str:
        return VARIANTS.get(self.strategy, self.strategy)


__all__ = ["COST_MEASURES", "FINETUNE_BUDGETS", "LR_SCHEDULES", "NEUTRAL", "STRATEGIES", "VARIANTS", "WARMUP_ORDERS",
           "PruneConfig"]
