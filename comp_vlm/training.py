"""The training loops of the search and around it: endless batches, seeding, the training loss (with the
distillation option), the learning-rate schedules of the search and of fine-tuning, fine-tuning itself, the
'dense + the same training' control, and the mean training-text length that sets the FLOPs reference."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, NonFiniteError
from .search import budget
from .tasks.base import mean_reference_lengths, model_device

if TYPE_CHECKING:
    from .search.config import PruneConfig


def cycle_batches(data: Iterable) -> Iterator:
    """Endless batches. A stateful re-iterable (it resumes mid-epoch) may yield nothing once at an epoch end;
    two empty passes in a row mean there is no data."""
    empty_passes = 0
    while True:
        empty = True
        for batch in data:
            empty, empty_passes = False, 0
            yield batch
        if empty:
            empty_passes += 1
            if empty_passes >= 2:
                raise ConfigError("the training data yielded no batch")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_reference(train_data: Any, task: Any = None) -> dict[str, int]:
    """The FLOPs reference lengths of one pass over the training data: the means of ``task.reference_lengths``
    (the unpadded text length without a task), rounded; a stateful loader is left where it was."""
    state = train_data.state_dict() if hasattr(train_data, "state_dict") else None
    try:  # a stateful loader at the end of an epoch yields nothing once: then read the next pass
        for _ in range(2):
            means = mean_reference_lengths(task, train_data)
            if means:
                return {key: round(value) for key, value in means.items()}
        return {}
    finally:
        if state is not None:
            train_data.load_state_dict(state)


def training_text_length(train_data: Any, task: Any = None) -> int | None:
    """The reference text length of :func:`training_reference` (None if the batches give none)."""
    return training_reference(train_data, task).get("text_length")


def training_loss(task: Any, model: nn.Module, batch: Any, teacher: nn.Module | None, distill: float,
                  where: str) -> torch.Tensor:
    """Task loss (+ distillation towards ``teacher``), on the model's device; non-finite losses stop the run."""
    batch = task.batch_to(batch, model_device(model))
    if teacher is not None and distill > 0:
        loss = task.loss_with_distill(model, teacher, batch, distill)
    else:
        loss = task.loss(model, batch)
    if not torch.isfinite(loss):
        raise NonFiniteError(f"training loss is {loss.item()} during {where}")
    return loss


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def adamw(model: nn.Module, config: PruneConfig) -> torch.optim.Optimizer:
    """The optimizer of the search and of fine-tuning: AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def frozen_teacher(model: nn.Module, distill: float) -> nn.Module | None:
    """A frozen copy of ``model`` to distil from, when ``distill`` > 0."""
    return copy.deepcopy(model).eval().requires_grad_(False) if distill > 0 else None


def train_step(model: nn.Module, task: Any, opt: torch.optim.Optimizer, batch: Any, lr: float,
               teacher: nn.Module | None, distill: float, where: str) -> None:
    """One optimizer step on ``batch`` at learning rate ``lr`` (:func:`training_loss`)."""
    set_lr(opt, lr)
    loss = training_loss(task, model, batch, teacher, distill, where)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_steps(model: nn.Module, task: Any, batches: Iterator, steps: int, config: PruneConfig,
                teacher: nn.Module | None = None, desc: str = "train") -> None:
    """Fine-tuning: AdamW, ``steps`` batches, ``config.finetune_schedule`` (warm-up + cosine decay to 0 by default;
    method.md §3 "Recovery must not hurt"), with the same distillation option as the search."""
    opt = adamw(model, config)
    model.train()
    for i in tqdm(range(steps), desc=desc, disable=not config.progress, leave=False):
        lr = config.lr * budget.lr_factor(i, steps, config.finetune_schedule, config.finetune_warmup)
        train_step(model, task, opt, next(batches), lr, teacher, config.distill, desc)
    model.eval()


def search_lr_factor(config: PruneConfig, step: int) -> float:
    """The search's learning-rate multiplier at search step ``step`` (cosine: over the nominal search)."""
    total = budget.nominal_search_steps(config.ratio, config.flops_step, config.stage_steps)
    return budget.lr_factor(step, total, config.lr_schedule)


def snapshot_finetune_steps(config: PruneConfig, ratio: float, search_steps: int) -> int:
    """Fine-tuning steps of a snapshot at ``ratio`` taken after ``search_steps`` (``config.finetune_budget``)."""
    return budget.finetune_steps_for(ratio, search_steps, config.finetune_steps, config.finetune_budget,
                                     config.flops_step, config.stage_steps, config.budget_slack_stages)


def train_dense_control(model: nn.Module, task: Any, train_data: Iterable, config: PruneConfig,
                        search_steps: int) -> int:
    """The 'dense + the same training' control: ``search_steps`` steps exactly as the search trains (optimizer,
    learning-rate schedule, distillation from a frozen copy of the dense model), then the fine-tuning a snapshot
    at ``config.ratio`` reached after that many steps gets. Returns the total steps trained."""
    seed_everything(config.seed)
    teacher = frozen_teacher(model, config.distill)
    batches = cycle_batches(train_data)
    opt = adamw(model, config)
    model.train()
    for step in tqdm(range(search_steps), desc="dense control", disable=not config.progress, leave=False):
        lr = config.lr * search_lr_factor(config, step)
        train_step(model, task, opt, next(batches), lr, teacher, config.distill, "dense control")
    ft = snapshot_finetune_steps(config, config.ratio, search_steps)
    seed_everything(config.seed)
    train_steps(model, task, cycle_batches(train_data), ft, config, teacher, desc="dense control fine-tune")
    model.eval()
    return search_steps + ft


__all__ = ["adamw", "cycle_batches", "frozen_teacher", "search_lr_factor", "seed_everything",
           "set_lr", "snapshot_finetune_steps", "train_dense_control", "train_step", "train_steps",
           "training_loss", "training_reference", "training_text_length"]
