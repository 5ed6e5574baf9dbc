"""The one-call CoMP search, :func:`prune`: calibrate, search with MPS to the ratio (snapshots on the way, search
checkpoints at every stage boundary), fine-tune every snapshot, slice, evaluate."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint
from ..errors import ConfigError
from ..recipe import Recipe
from ..remote import enable_save_pretrained
from ..training import (
    adamw,
    cycle_batches,
    frozen_teacher,
    search_lr_factor,
    seed_everything,
    snapshot_finetune_steps,
    train_step,
    train_steps,
    training_reference,
)
from ..validation import ratio_key
from . import state
from .config import PruneConfig
from .pruner import Pruner

log = logging.getLogger("comp_vlm")


@dataclass
class PruneResult:
    """What :func:`prune` returns: the pruned model at the final ratio, every snapshot's model and recipe, the
    per-stage log, and the ratios not reached."""

    model: nn.Module
    recipe: Recipe
    snapshots: dict[float, tuple[nn.Module, Recipe]]
    stage_log: list[dict]
    not_reached: list[float]
    metrics: dict[float, dict[str, float]]
    seconds: float = 0.0  # search + fine-tuning, the interrupted runs a resumed search continues included

    def save(self, directory: str, **extras: Any) -> Path:
        from ..io import save_pruned

        return save_pruned(self.model, directory, recipe=self.recipe, **extras)


def prune(model: nn.Module, task: Any, train_data: Iterable, val_batches: list, config: PruneConfig | None = None,
          test_data: Iterable | None = None, identity: dict | None = None) -> PruneResult:
    """One-call CoMP: calibrate, search with MPS to ``config.ratio`` (snapshotting ``config.snapshots`` on the
    way), fine-tune every snapshot ``config.finetune_steps`` steps, slice, and (if ``test_data``) evaluate.
    ``identity``: the model and data the checkpoints record and a resumed search must match
    (:func:`state.run_identity`; default: the model's alone)."""
    config = config or PruneConfig()
    if config.checkpoint_dir:
        identity = state.check_resume(config, identity or state.run_identity(model))
    seed_everything(config.seed)
    config = _training_reference(config, task, train_data)
    teacher = frozen_teacher(model, config.distill)
    pruner = Pruner(model, task, val_batches, config)
    batches = cycle_batches(train_data)
    opt = adamw(model, config)
    if config.resume and not config.checkpoint_dir:
        raise ConfigError("resume needs a checkpoint directory")
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume and ckpt is not None and checkpoint.has_checkpoint(ckpt):
        with checkpoint.reading(ckpt):
            state.load_search_checkpoint(ckpt, model, pruner, opt, train_data, config)
        log.info("resumed the search from %s at stage %d", ckpt, pruner.stage_index)
    else:
        pruner.calibrate(cycle_batches(train_data))
        if ckpt is not None:
            state.save_search_checkpoint(ckpt, model, pruner, opt, train_data, config, identity)
    bar = tqdm(desc=f"CoMP {config.strategy}", total=None, disable=not config.progress)
    model.train()
    while not pruner.done:
        lr = config.lr * search_lr_factor(config, pruner.search_steps)
        train_step(model, task, opt, next(batches), lr, teacher, config.distill, f"search stage {pruner.stage_index}")
        pruner.step()
        if pruner.stage_step == 0 and pruner.stage_log:
            last = pruner.stage_log[-1]
            bar.set_postfix(stage=last["stage"], mode=last["mode"], flops=f"{last['flops_kept']:.3f}",
                            val=f"{last['b_after']:.3f}")
            bar.update(1)
            if ckpt is not None:
                state.save_search_checkpoint(ckpt, model, pruner, opt, train_data, config, identity)
    bar.close()
    return _finetune_snapshots(pruner, task, train_data, config, teacher, test_data)


def _training_reference(config: PruneConfig, task: Any, train_data: Iterable) -> PruneConfig:
    """``config`` with the reference lengths it lacks set to the task's means over the training data
    (:meth:`comp_vlm.tasks.base.Task.reference_lengths`; method.md §1: FLOPs at the mean unpadded text length)."""
    given = config.reference or {}
    if all(given.get(key) for key in getattr(task, "reference_keys", ("text_length",))):
        return config
    lengths = {k: v for k, v in training_reference(train_data, task).items() if not given.get(k)}
    for key, value in lengths.items():
        log.info("FLOPs reference %s: %d (mean over the training data)", key, value)
    return replace(config, reference={**given, **lengths}) if lengths else config


def _finetune_snapshots(pruner: Pruner, task: Any, train_data: Iterable, config: PruneConfig,
                        teacher: nn.Module | None, test_data: Iterable | None) -> PruneResult:
    """Fine-tune and evaluate every snapshot the search took; the result at the final (or highest reached) ratio."""
    results: dict[float, tuple[nn.Module, Recipe]] = {}
    metrics: dict[float, dict[str, float]] = {}
    for snap in pruner.snapshots:
        seed_everything(config.seed)
        pruned = pruner.materialize(snap)
        steps = snapshot_finetune_steps(config, snap.ratio, snap.stage * config.stage_steps)
        snap.recipe.extra["finetune_steps"] = steps
        if steps > 0:
            train_steps(pruned, task, cycle_batches(train_data), steps, config, teacher,
                        desc=f"fine-tune {ratio_key(snap.ratio)}")
        pruned.eval()
        enable_save_pretrained(pruned, snap.recipe.extra)  # its save_pretrained writes a pruned directory
        if test_data is not None:
            metrics[snap.ratio] = task.evaluate(pruned, test_data)
        results[snap.ratio] = (pruned, snap.recipe)
    if config.ratio not in results:
        reached = sorted(results)
        if not reached:
            raise ConfigError(f"no requested ratio was reached (not reached: {pruner.not_reached})")
        final_ratio = reached[-1]
    else:
        final_ratio = config.ratio
    final_model, final_recipe = results[final_ratio]
    return PruneResult(final_model, final_recipe, results, pruner.stage_log, sorted(pruner.not_reached), metrics,
                       pruner.elapsed_s)


__all__ = ["PruneResult", "prune"]
