"""The CoMP search: its configuration (:mod:`.config`), the pure FLOPs budget (:mod:`.budget`), the step-wise
:class:`Pruner` (:mod:`.pruner`), its checkpoints (:mod:`.state`) and the one-call :func:`prune` (:mod:`.run`)."""

from __future__ import annotations

from . import budget
from .config import STRATEGIES, PruneConfig
from .pruner import Pruner, Snapshot, StagePlan, bootstrap_se
from .run import PruneResult, prune

__all__ = ["STRATEGIES", "PruneConfig", "PruneResult", "Pruner", "Snapshot", "StagePlan", "bootstrap_se", "budget",
           "prune"]
