"""The staged CoMP search (method.md §3): pick a mode (MPS) -> raise its threshold by one FLOPs step -> train K
steps with the symmetric decay/recovery schedule -> measure the cost -> ... -> snapshot.

Architecture-free: it talks to a model adapter (units, sites, masks, structure) through the adapter protocol and
to a task (loss, validation). :class:`Pruner` is driven step by step (``pruner.step()`` after each optimizer step,
from the user's own loop); :func:`comp_vlm.search.prune` is the one-call loop built on it. The numbers of the
plan (steps, floors, token levels) are :mod:`comp_vlm.search.budget`'s.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import importance
from ..adapters.base import AdapterOptions, ModelAdapter, Site, get_adapter
from ..adapters.units import UnitGroup, UnitKey, UnitSpec
from ..collect import StatsCollector
from ..errors import ConfigError, NonFiniteError
from ..flops import model_flops, tower_flops
from ..jsontext import json_text
from ..recipe import Recipe
from ..schedule import MPSConfig, MultiModeScheduler, NoModeLeftError, mode_kind, mode_part, stage_cost
from ..structure import TowerStructure, resolve_couplings
from ..tasks.base import model_device
from . import bookkeeping, budget
from .config import PruneConfig

log = logging.getLogger("comp_vlm")

PARAM_ALL = "P"  # param-only ranks every parameter mode together (UPop-like global ranking)
SCORER_PREFIX = "scorer/"  # the token scorer's state among a checkpoint's tensors (a random scorer's generator)


@dataclass
class Snapshot:
    ratio: float
    recipe: Recipe
    weights: dict[str, torch.Tensor] = field(repr=False)
    stage: int


@dataclass
class StagePlan:
    """What one stage does: the mode, the units it newly selects, or the token level it moves to."""

    mode: str
    units: dict[UnitKey, torch.Tensor] = field(default_factory=dict)  # new (local) unit indices per unit group
    token_level: float | None = None  # the token mode's new level q
    prev_level: float = 1.0  # its level before the stage (live until K/2)
    requested: float = 0.0  # FLOPs fraction the step asked for
    flops_before: float = 0.0
    flops_after: float = 0.0
    b_before: float = 0.0
    losses_before: list[float] = field(default_factory=list)
    b_removed: float | None = None  # cost_measure "immediate": B with the stage's removal applied outright
    losses_removed: list[float] = field(default_factory=list)
    floor_limited: bool = True  # a shortfall of this stage means floors, not a per-stage bound
    unbounded: float | None = None  # the planned step when param_max_cut cut this stage to ``requested``
    removed_by: dict[str, float] = field(default_factory=dict)  # FLOPs fraction removed per "tower/kind" part
    probe_s: float = 0.0  # cost_measure "probe": seconds spent measuring every live mode before this stage began


def removed_part(group: UnitGroup) -> str:
    """A unit group's name in stage logs' ``removed_by``: ``tower/kinds`` ("text/cross_heads", "vision/neurons")."""
    return f"{group.tower}/{group.spec.plural}"


def bootstrap_se(deltas: list[float], resamples: int, seed: int) -> float:
    """Standard error of the mean of paired per-batch deltas, by bootstrap."""
    if len(deltas) < 2 or resamples < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    arr = np.asarray(deltas)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    return float(means.std(ddof=1))



class Pruner:
    """Step-wise CoMP search on a model instance. Call :meth:`calibrate` once, then :meth:`step` after every
    optimizer step of the training loop (the forward that produced the loss must run in train mode, so the
    collector sees it); :attr:`done` turns True when the final target is reached."""

    def __init__(self, model: nn.Module, task: Any, val_batches: list, config: PruneConfig) -> None:
        self.model, self.task, self.val_batches, self.config = model, task, list(val_batches), config
        if not self.val_batches:
            raise ConfigError("the search needs at least one validation batch (for the pruning cost)")
        self.adapter: ModelAdapter = get_adapter(model)
        self.adapter.clear_masks()
        self.adapter.install(AdapterOptions(config.dead_compute, config.site_start, config.site_every,
                                            cit=config.strategy != "no-cit", token_scorer=config.token_scorer,
                                            token_scorer_seed=config.seed, token_reducer=config.token_reducer))
        self.reference = self.adapter.reference(config.reference)
        object.__setattr__(model, "comp_vlm_reference", dict(self.reference))
        self.couplings = self.adapter.couplings()
        self.collector = StatsCollector(config.weighting())
        self.collector.enabled = True  # collects in train-mode forwards until the search ends (also after resume)
        self.adapter.attach_collector(self.collector)
        self.specs = {s.name: s for s in self.adapter.tower_specs()}
        # the FLOPs bookkeeping's data, read once: every candidate's structure derives from it (bookkeeping.py)
        self.dense_towers = tuple(self.adapter.dense_structure(self.reference))
        self.dense_flops = float(model_flops(self.dense_towers, self.couplings))
        self.site_layers = {name: self.adapter.site_layers(spec) for name, spec in self.specs.items()}
        self.groups: dict[UnitKey, UnitGroup] = {g.key: g for g in self.adapter.unit_groups()}
        self.kinds = list(dict.fromkeys(key[0] for key in self.groups))  # the unit kinds, in adapter order
        self.plurals = {g.kind: g.spec.plural for g in self.groups.values()}  # their names in logs, checkpoints
        self.selected = {key: torch.zeros(g.size, dtype=torch.bool) for key, g in self.groups.items()}
        self.token_levels = {m: 1.0 for m in self.adapter.modes() if mode_kind(m) == "token"}
        modes = self._search_modes()
        self.scheduler = MultiModeScheduler(modes, MPSConfig(
            strategy=config.scheduler_strategy(), rho=config.rho, tau=config.tau, lambda0=config.lambda0,
            i_max=config.i_max, warmup_order=config.warmup_order), seed=config.seed)
        self.pending_targets = list(config.targets)
        self.snapshots: list[Snapshot] = []
        self.not_reached: list[float] = []
        self.stage_log: list[dict] = []
        self.plan: StagePlan | None = None
        self.stage_step = 0
        self.stage_index = 0
        self.done = False
        self._stage_t0 = time.perf_counter()
        self._t_start, self.elapsed_before = time.perf_counter(), 0.0  # seconds of the run(s) a resume continues
        self._b_last: tuple[float, list[float]] | None = None
        self._check_floors()

    # ---- modes and floors ----------------------------------------------------------------------------------------
    def _search_modes(self) -> list[str]:
        modes = self.adapter.modes()
        if self.config.strategy == "param-only":
            return [PARAM_ALL]
        return modes

    def _param_modes(self, mode: str) -> list[str]:
        if mode == PARAM_ALL:
            return [m for m in self.adapter.modes() if mode_kind(m) == "param"]
        return [mode]

    def floor_flops(self, strategy: str | None = None) -> float:
        """The lowest FLOPs fraction the strategy can reach (all floors hit / every site keeps one token)."""
        strategy = strategy or self.config.strategy
        counts = bookkeeping.kept_units(self.selected)
        if strategy != "token-only":
            counts = bookkeeping.at_floors(counts, self._floors())
        keeps = None
        if strategy != "param-only":
            level = budget.floor_level(self.config.token_plan, self.config.token_floor)
            keeps = {name: self._site_keeps(name, level) for name in self.specs}
        return self._kept(self.structural_towers(counts, keeps))

    def _kept(self, towers: list[TowerStructure]) -> float:
        """FLOPs fraction of the dense model that ``towers`` keep, all towers together through the model's
        couplings (a T_v stage is credited with what the towers its tokens feed save)."""
        return model_flops(towers, self.couplings) / self.dense_flops

    def _site_keeps(self, tower: str, level: float) -> dict[int, float]:
        """Per-site keep ratios of a tower's token mode at ``level`` (its deepest site's cumulative keep)."""
        return budget.site_keeps(self.site_layers[tower], level, self.config.token_plan)

    def _unit_floor(self, unit: UnitSpec) -> int:
        return budget.unit_floor(unit.share_floor, unit.dense, self.config.head_floor, self.config.neuron_floor)

    def _floors(self, modes: Iterable[str] | None = None) -> dict[UnitKey, int]:
        """The floor of every unit group (of a parameter mode among ``modes``, if given)."""
        return {key: self._unit_floor(g.spec) for key, g in self.groups.items() if modes is None or g.mode in modes}

    def _param_removable(self, mode: str) -> float:
        """FLOPs fraction the parameter mode can still remove: everything else as planned, its units at floors."""
        counts = bookkeeping.at_floors(bookkeeping.kept_units(self.selected), self._floors(self._param_modes(mode)))
        return self.flops_kept() - self._kept(self.structural_towers(counts))

    def _check_floors(self) -> None:
        floor = self.floor_flops()
        reachable, self.not_reached = budget.reachable_targets(self.pending_targets, floor)
        if not reachable:
            raise ConfigError(
                f"strategy {self.config.strategy!r} cannot remove {max(self.pending_targets):.0%} of FLOPs: its floor "
                f"keeps {floor:.1%} of dense FLOPs (at most {1 - floor:.1%} removable)"
            )
        for t in self.not_reached:
            log.warning("snapshot %.2f is below the %s floor (keeps %.1f%%): not reached", t, self.config.strategy,
                        100 * floor)
        self.pending_targets = reachable

    # ---- structure -----------------------------------------------------------------------------------------------
    def structural_towers(self, counts: dict[UnitKey, int] | None = None,
                          keeps: bookkeeping.SiteKeeps | None = None) -> list[TowerStructure]:
        """The structure with every selected unit removed and the planned keep ratios (method.md §1: during
        the search FLOPs are structural), derived from the dense structure; ``counts`` (units kept per group) and
        ``keeps`` (keep ratio per tower and site) replace the planned ones."""
        counts = bookkeeping.kept_units(self.selected) if counts is None else counts
        keeps = {name: self._pool_site_keeps(name) for name in self.specs} if keeps is None else keeps
        return bookkeeping.derive_structure(self.dense_towers, self.specs, counts, keeps)

    @property
    def search_steps(self) -> int:
        """Training steps the search has taken so far (finished stages plus the current one)."""
        return max(0, self.stage_index - 1) * self.config.stage_steps + self.stage_step

    def flops_kept(self) -> float:
        return self._kept(self.structural_towers())

    @property
    def elapsed_s(self) -> float:
        """Seconds since the search started, the interrupted runs it resumed included."""
        return self.elapsed_before + time.perf_counter() - self._t_start

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def _badness(self) -> tuple[float, list[float]]:
        if self.config.badness == "metric":
            metrics = self.task.evaluate(self.model, self.val_batches)
            value = -float(metrics[self.task.primary_metric])
            return value, [value]
        losses = [self.task.validation_loss(self.model, [b]) for b in self.val_batches]
        for v in losses:
            if not math.isfinite(v):
                raise NonFiniteError(f"validation loss is NaN/inf at stage {self.stage_index}: the search diverged")
        return float(np.mean(losses)), losses

    # ---- stages --------------------------------------------------------------------------------------------------
    def calibrate(self, batches: Iterable) -> None:
        """Statistics-only pass (no pruning, no update) before stage 1."""
        was = self.model.training
        self.model.train()
        self.collector.reset()
        device = model_device(self.model)
        for i, batch in enumerate(batches):
            if i >= self.config.calibration_batches:
                break
            self.task.loss(self.model, self.task.batch_to(batch, device))
            self.collector.end_batch()
        self.model.train(was)
        self._b_last = self._badness()
        self._start_stage()

    def _next_step_flops(self) -> float:
        """Absolute FLOPs to remove this stage: the fixed step, cut short to land on the next target."""
        step = budget.next_step(self.flops_kept(), 1 - min(self.pending_targets), self.config.flops_step,
                                self.config.sliver_fraction)
        return step * self.dense_flops

    def _plan(self, mode: str) -> StagePlan | None:
        """Plan one stage of ``mode`` (structurally applied), or None, restored, if the mode is exhausted."""
        target = self._next_step_flops()
        before = self.flops_kept()
        if mode_kind(mode) == "token":
            plan = self._plan_tokens(mode, target)
        else:  # the stage bound: at most param_max_cut of what the mode can still remove
            step, bounded = budget.param_stage_step(target / self.dense_flops, self._param_removable(mode),
                                                    self.config.param_max_cut, self.config.flops_step,
                                                    self.config.sliver_fraction, before - (1 - min(self.pending_targets)))
            planned, target = target, step * self.dense_flops if bounded else target
            plan = self._plan_params(mode, target)
            if bounded:  # held back by the bound, not by the floors: a shortfall does not exhaust the mode
                plan.unbounded, plan.floor_limited = planned / self.dense_flops, False
        plan.requested = target / self.dense_flops
        plan.flops_before = before
        removed = before - plan.flops_after
        if plan.token_level is not None:
            plan.removed_by = {mode_part(mode): removed}
        if budget.mode_exhausted(removed, plan.requested, plan.floor_limited, self.config.min_stage_fraction):
            # at its floors: nothing (or, by option, only a sliver) left to remove
            log.info("mode %s can remove only %.4f of %.4f requested: exhausted", mode, max(removed, 0.0),
                     plan.requested)
            self._restore_plan(plan)
            return None
        return plan

    def _probe_costs(self) -> dict[str, tuple[float, list[float]]]:
        """cost_measure "probe": the immediate cost of every live mode on the current weights, fed to MPS before
        it chooses (method.md §3, beyond the paper). Returns each probed mode's (B_removed, per-batch losses)."""
        measured = {}
        b_before = self._b_last[0]
        for mode in self.scheduler.candidates():
            plan = self._plan(mode)
            if plan is None:
                self.scheduler.mark_exhausted(mode)
                continue
            self.plan = plan
            measured[mode] = self._badness_removed()
            self._restore_plan(plan)
            self.plan = None
            self.scheduler.observe(mode, stage_cost(b_before, measured[mode][0], plan.flops_before, plan.flops_after))
        return measured

    def _start_stage(self) -> None:
        t_probe = time.perf_counter()
        probed = self._probe_costs() if self.config.cost_measure == "probe" else {}
        probe_s = time.perf_counter() - t_probe if probed else 0.0
        while True:
            try:
                mode = self.scheduler.choose()
            except NoModeLeftError:
                log.warning("every mode is exhausted before the target: stopping at FLOPs kept %.3f", self.flops_kept())
                self.not_reached.extend(self.pending_targets)
                self.pending_targets = []
                self._finish()
                return
            plan = self._plan(mode)
            if plan is None:
                self.scheduler.mark_exhausted(mode)
                continue
            plan.b_before, plan.losses_before = self._b_last
            self.plan = plan
            self.stage_step = 0
            self.stage_index += 1
            self._stage_t0 = time.perf_counter()
            self.collector.reset()
            plan.probe_s = probe_s
            if mode in probed:
                plan.b_removed, plan.losses_removed = probed[mode]
            elif self.config.cost_measure == "immediate":  # part of the stage: its wall time, its index in errors
                plan.b_removed, plan.losses_removed = self._badness_removed()
            if plan.token_level is not None:
                log.info("stage %d %s: level %.4f -> %.4f, per-site keep %s", self.stage_index, mode,
                         plan.prev_level, plan.token_level,
                         {f"{s.tower}.{s.layer}": round(r, 4) for s, r in self._mode_site_keeps(mode).items()})
            return

    def _badness_removed(self) -> tuple[float, list[float]]:
        """B on the current weights with the planned removal applied at once (new units' masks at 0, the token mode
        at its new level): the stage's immediate damage, free of the training drift that the recovered measure
        also credits to the stage. The live masks are put back to the stage's first step afterwards."""
        was = self.model.training
        self.model.eval()
        self.stage_step = self.config.stage_steps // 2  # the schedule's fully-removed point
        self._apply_masks()
        value = self._badness()
        self.stage_step = 0
        self._apply_masks()
        self.model.train(was)
        return value

    def _restore_plan(self, plan: StagePlan) -> None:
        if plan.token_level is not None:
            self.token_levels[plan.mode] = plan.prev_level
        for key, idx in plan.units.items():
            self.selected[key][idx] = False

    def _group_scores(self, group: UnitGroup) -> torch.Tensor:
        """The group's importance scores (finite), from the statistics collected since the stage began."""
        scores = self.adapter.unit_scores(group, self.collector)
        if scores is None:
            raise ConfigError(
                f"no importance statistics for {group.tower} layer {group.layer} {group.spec.plural}: the search "
                "saw no training forward in train mode (calibration or stage training)")
        return importance.check_finite(scores, f"{group.tower} layer {group.layer} {group.kind} score")

    def _plan_params(self, mode: str, target: float) -> StagePlan:
        """Greedy fill of the FLOPs step with the mode's unselected units in the order of the selection rule
        (method.md §2 "Selection": importance decides which units go, ΔF how many fill the step)."""
        # resolved: a unit's layer sees the tokens its sources keep (a cross-attention head's K/V)
        towers = {t.name: t for t in resolve_couplings(self.structural_towers(), self.couplings)}
        modes = self._param_modes(mode)
        flops = {name: tower_flops(towers[name]) for name in {g.tower for g in self.groups.values() if g.mode in modes}}
        keys, scores, costs, groups, floors, kinds = [], [], [], [], [], []
        kind_ids: dict[tuple[str, str], int] = {}
        for group in self.groups.values():
            if group.mode not in modes:
                continue
            free = torch.nonzero(~self.selected[group.key]).flatten()
            if len(free) == 0:
                continue
            s = self._group_scores(group)
            tf = flops[group.tower]
            unit = self.adapter.unit_flops(group, towers[group.tower].layers[group.layer],
                                           tf.tokens_in[group.layer], tf.tokens_mlp[group.layer])
            g = len(floors)
            floors.append(self._unit_floor(group.spec))
            k = kind_ids.setdefault((group.tower, group.kind), len(kind_ids))
            for u in free.tolist():
                keys.append((group, u))
                scores.append(float(s[u]))
                costs.append(float(max(unit, 1)))
                groups.append(g)
                kinds.append(k)
        plan = StagePlan(mode)
        if not keys:
            plan.flops_after = self.flops_kept()
            return plan
        groups_t = torch.tensor(groups, dtype=torch.long)
        costs_t = torch.tensor(costs, dtype=torch.float64)
        order = importance.selection_keys(torch.tensor(scores, dtype=torch.float64), costs_t, groups_t,
                                          torch.tensor(kinds, dtype=torch.long), self.config.selection,
                                          self.config.normalization)
        new, _ = importance.greedy_fill(order, costs_t, target, torch.zeros(len(keys), dtype=torch.bool),
                                        groups_t, torch.tensor(floors, dtype=torch.long))
        chosen: dict[UnitKey, list[int]] = {}
        for j in torch.nonzero(new).flatten().tolist():
            group, u = keys[j]
            part = removed_part(group)
            plan.removed_by[part] = plan.removed_by.get(part, 0.0) + costs[j] / self.dense_flops
            self.selected[group.key][u] = True
            chosen.setdefault(group.key, []).append(u)
        plan.units = {key: torch.tensor(v) for key, v in chosen.items()}
        plan.flops_after = self.flops_kept()
        return plan

    def _plan_tokens(self, mode: str, target: float) -> StagePlan:
        """Bisection on the mode's level q (its deepest site's cumulative keep; the per-site pyramid follows from
        it, :mod:`comp_vlm.search.budget`) for the FLOPs step, within the stage bound and the mode's floor."""
        current = self.token_levels[mode]
        goal = self.flops_kept() - target / self.dense_flops
        counts = bookkeeping.kept_units(self.selected)  # a token stage moves no unit

        def kept_at(q: float) -> float:
            self.token_levels[mode] = q
            return self._kept(self.structural_towers(counts))

        lo, hi = budget.token_level_range(current, self.config.token_plan, self.config.token_floor,
                                          self.config.token_max_cut)
        best, short = budget.bisect_level(kept_at, lo, hi, goal)  # short: the range's lower end
        floor_limited = budget.token_floor_limited(short, best, self.config.token_plan, self.config.token_floor)
        # structurally counted from now on; the live keep ratios switch at K/2
        return StagePlan(mode, token_level=best, prev_level=current, flops_after=kept_at(best),
                         floor_limited=floor_limited)

    def _pool_site_keeps(self, tower: str) -> dict[int, dict[str, float]]:
        """Per site layer of ``tower``, the keep ratio of each token pool whose mode's planned level is below 1."""
        keeps: dict[int, dict[str, float]] = {}
        for pool in self.specs[tower].site_pools():
            level = self.token_levels.get(pool.mode, 1.0)
            for i, r in (self._site_keeps(tower, level) if level < 1.0 else {}).items():
                keeps.setdefault(i, {})[pool.name] = r
        return keeps

    def _mode_site_keeps(self, mode: str, level: float | None = None) -> dict[Site, float]:
        """Per-site keep ratios of every token pool of a token mode at ``level`` (default: its planned level)."""
        level = self.token_levels[mode] if level is None else level
        keeps: dict[Site, float] = {}
        for spec in self.specs.values():
            for pool in spec.site_pools():
                if pool.mode == mode:
                    keeps.update({Site(spec.name, mode, i, pool.name): r
                                  for i, r in self._site_keeps(spec.name, level).items()})
        return keeps

    # ---- per-step schedule -----------------------------------------------------------------------------------------
    def _apply_masks(self) -> None:
        """Symmetric stage schedule: new units fade 1 -> 0 over the first K/2 steps; the token mode switches to
        its new level at K/2; then K/2 steps of recovery."""
        plan = self.plan
        half = self.config.stage_steps // 2
        fade = max(0.0, 1.0 - self.stage_step / half)
        for key, sel in self.selected.items():
            if not sel.any():
                continue
            values = (~sel).float()
            if key in plan.units and fade > 0:
                values[plan.units[key]] = fade
            self.adapter.set_unit_mask(self.groups[key], values)
        for mode, level in self.token_levels.items():
            live = level if (mode != plan.mode or self.stage_step >= half) else plan.prev_level
            for site, keep in self._mode_site_keeps(mode, live).items():
                self.adapter.set_keep_ratio(site.tower, site.layer, min(1.0, max(keep, 1e-6)), site.pool)

    def step(self) -> None:
        """Call after each optimizer step during the search."""
        if self.done or self.plan is None:
            return
        self.stage_step += 1
        self.collector.end_batch()
        self._apply_masks()
        if self.stage_step >= self.config.stage_steps:
            self._end_stage()

    def _end_stage(self) -> None:
        plan = self.plan
        self.model.eval()
        b_after, losses_after = self._badness()
        metric = None
        if self.config.stage_metric and self.config.badness != "metric":
            metric = float(self.task.evaluate(self.model, self.val_batches)[self.task.primary_metric])
        self.model.train()
        f_before, f_after = plan.flops_before, self.flops_kept()
        if self.config.cost_measure in ("immediate", "probe"):
            b_cost, losses_cost = plan.b_removed, plan.losses_removed
        else:
            b_cost, losses_cost = b_after, losses_after
        r = stage_cost(plan.b_before, b_cost, f_before, f_after)
        deltas = [a - b for a, b in zip(losses_cost, plan.losses_before)]
        se = bootstrap_se(deltas, self.config.bootstrap, self.config.seed + self.stage_index) / (f_before - f_after)
        sliver = budget.is_sliver(f_before - f_after, self.config.flops_step, self.config.sliver_fraction)
        if sliver:
            log.info("stage %d removed only %.4f of FLOPs (a sliver): its cost does not update MPS history",
                     self.stage_index, f_before - f_after)
        # probe: the chosen mode's cost already entered R_m before the choice
        hi = not sliver and self.config.cost_measure != "probe"
        R = self.scheduler.update(plan.mode, r, info={"se": se if math.isfinite(se) else None}, hi=hi)
        record = {
            "stage": self.stage_index, "mode": plan.mode, "chosen": self.scheduler.history[-1].get("how"),
            "flops_kept": f_after, "flops_removed_step": f_before - f_after, "b_before": plan.b_before,
            "b_after": b_after, "b_removed": plan.b_removed, "metric": metric, "cost": r, "cost_se": se, "R": R,
            "token_level": plan.token_level,
            **{f"{self.plurals[kind]}_pruned": sum(len(v) for key, v in plan.units.items() if key[0] == kind) for kind in self.kinds},
            "removed_by": dict(plan.removed_by), "sliver": sliver,
            "bounded": plan.unbounded is not None, "unbounded_step": plan.unbounded,
            "wall_s": time.perf_counter() - self._stage_t0, "probe_s": plan.probe_s,
        }
        self.stage_log.append(record)
        self._write_log(record)
        self._b_last = (b_after, losses_after)
        if budget.short_of_step(f_before - f_after, plan.requested, plan.floor_limited):  # floors hit before the step
            log.info("mode %s removed %.4f of %.4f requested: exhausted", plan.mode, f_before - f_after, plan.requested)
            self.scheduler.mark_exhausted(plan.mode)
        if self.config.strategy == "sjp" and self.scheduler.phase == "token":
            token_removed = 1.0 - self._token_only_kept()
            if token_removed >= self.config.sjp_token_share * self.config.ratio:
                self.scheduler.set_token_share_reached()
        self._take_snapshots()
        if not self.pending_targets:
            self._finish()
        else:
            self._start_stage()

    def _token_only_kept(self) -> float:
        layers = {t.name: len(t.layers) for t in self.dense_towers}
        return self._kept(self.structural_towers(bookkeeping.dense_counts(self.specs.values(), layers)))

    def _take_snapshots(self) -> None:
        kept = self.flops_kept()
        for t in sorted(self.pending_targets):
            if budget.target_reached(kept, t):
                recipe = self.adapter.recipe(self.reference)
                recipe.extra.update({"strategy": self.config.strategy, "ratio": t, "seed": self.config.seed,
                                     "stage": self.stage_index})
                weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.snapshots.append(Snapshot(t, recipe, weights, self.stage_index))
                self.pending_targets.remove(t)
                log.info("snapshot at ratio %.2f (FLOPs kept %.3f) after stage %d", t, kept, self.stage_index)

    def _finish(self) -> None:
        self.done = True
        self.plan = None
        self.collector.enabled = False
        self.adapter.detach_collector()

    def _write_log(self, record: dict) -> None:
        if self.config.log_path:
            path = Path(self.config.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.write(json_text(record) + "\n")

    # ---- checkpoint state ------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON-able state and tensors of the search (the model and optimizer are saved by the caller)."""
        tensors: dict[str, torch.Tensor] = {}
        for (kind, tower, i), sel in self.selected.items():
            tensors[f"sel/{kind}/{tower}/{i}"] = sel.to(torch.uint8)
        for key, value in self.collector.state_dict().items():
            tensors[f"stats/{key}"] = value
        for n, snap in enumerate(self.snapshots):
            for key, value in snap.weights.items():
                tensors[f"snap/{n}/{key}"] = value
        scorer = self.adapter.token_scorer  # one scorer serves every site of the model (ModelAdapter.install)
        if hasattr(scorer, "state_dict"):  # the random scorer's generator; the attention scorer holds none
            tensors.update({f"{SCORER_PREFIX}{k}": v for k, v in scorer.state_dict().items()})
        plan = None
        if self.plan is not None:
            plan = {k: v for k, v in self.plan.__dict__.items() if k != "units"}
            for kind in self.kinds:  # per kind, as {"tower/layer": indices} under "heads", "neurons", ...
                plan[self.plurals[kind]] = {f"{t}/{i}": v.tolist() for (k, t, i), v in self.plan.units.items() if k == kind}
        meta = {
            "token_levels": self.token_levels, "scheduler": self.scheduler.state_dict(), "stage_log": self.stage_log,
            "pending_targets": self.pending_targets, "not_reached": self.not_reached,
            "stage_index": self.stage_index, "stage_step": self.stage_step, "b_last": self._b_last, "plan": plan,
            "snapshots": [{"ratio": s.ratio, "stage": s.stage, "recipe": s.recipe.to_dict()} for s in self.snapshots],
            "done": self.done, "elapsed_s": self.elapsed_s,
        }
        return meta, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        for kind, tower, i in self.selected:
            self.selected[(kind, tower, i)] = tensors[f"sel/{kind}/{tower}/{i}"].bool().clone()
        # a checkpoint reads back on the CPU; the statistics live where the model's forwards add to them
        device = model_device(self.model)
        self.collector.load_state_dict({k[len("stats/"):]: v.to(device) for k, v in tensors.items()
                                        if k.startswith("stats/")})
        scorer = self.adapter.token_scorer
        scorer_state = {k[len(SCORER_PREFIX):]: v for k, v in tensors.items() if k.startswith(SCORER_PREFIX)}
        if hasattr(scorer, "load_state_dict") and scorer_state:
            scorer.load_state_dict(scorer_state)
        elif hasattr(scorer, "load_state_dict"):  # a checkpoint written before the scorer state was kept
            log.warning("the search checkpoint holds no token-scorer state (written by an earlier comp-vlm): the "
                        "%s scorer restarts from its seed, so the resumed search can differ from an uninterrupted "
                        "one", self.config.token_scorer)
        self.token_levels = {k: float(v) for k, v in meta["token_levels"].items()}
        self.scheduler.load_state_dict(meta["scheduler"])
        self.stage_log = list(meta["stage_log"])
        self.pending_targets = list(meta["pending_targets"])
        self.not_reached = list(meta["not_reached"])
        self.stage_index, self.stage_step = int(meta["stage_index"]), int(meta["stage_step"])
        self._b_last = None if meta["b_last"] is None else (meta["b_last"][0], list(meta["b_last"][1]))
        self.snapshots = []
        for n, snap in enumerate(meta["snapshots"]):
            prefix = f"snap/{n}/"
            weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.snapshots.append(Snapshot(snap["ratio"], Recipe.from_dict(snap["recipe"]), weights, snap["stage"]))
        self.plan = None
        if meta["plan"] is not None:
            plan = dict(meta["plan"])

            units = {}
            for kind in self.kinds:
                for where, idx in plan.pop(self.plurals[kind]).items():
                    tower, layer = where.rsplit("/", 1)
                    units[(kind, tower, int(layer))] = torch.tensor(idx, dtype=torch.long)
            self.plan = StagePlan(units=units, **plan)
            self._apply_masks()
        self.done = bool(meta["done"])
        self._t_start, self.elapsed_before = time.perf_counter(), float(meta.get("elapsed_s", 0.0))
        if self.done:
            self._finish()

    # ---- snapshot -> pruned model ----------------------------------------------------------------------------------
    def materialize(self, snapshot: Snapshot) -> nn.Module:
        """A sliced copy of the model at a snapshot (weights and structure of that moment)."""
        model = copy.deepcopy(self.model)
        adapter = get_adapter(model)
        adapter.detach_collector()
        adapter.clear_masks()
        model.load_state_dict(snapshot.weights)
        adapter.apply_recipe(snapshot.recipe)
        return model


__all__ = ["PARAM_ALL", "Pruner", "Snapshot", "StagePlan", "bootstrap_se"]
