"""MPS — the Multi-Mode Pruning Strategy (method.md §3) and the baseline mode schedules (§4).

Pure Python: no torch, no model code. One small state machine, :class:`MultiModeScheduler`, decides which
mode (``"P_v"``, ``"P_l"``, ``"P_c"``, ``"T_v"``, ``"T_l"``, any subset) each pruning stage runs.

Stage protocol (one evaluation per stage, "before" of stage T is "after" of stage T-1)::

    sched = MultiModeScheduler(["P_v", "P_l", "T_v", "T_l"], MPSConfig(strategy="comp"), seed=0)
    m = sched.choose()                        # stage T += 1; mode m is now pending
    ... raise theta_m by one FLOPs step, train K steps, evaluate B_after ...
    sched.update(m, stage_cost(b_before, b_after, f_before, f_after))  # Eq.8 cost, HI update (Eq.10)
    # or, if m could not prune at all (floors reached): sched.mark_exhausted(m)  -> the stage is cancelled
    # if m pruned part of a step and is now at its floors: update(...) first, then mark_exhausted(m)

Strategies (``MPSConfig.strategy``) and the flags they resolve to (:func:`resolve_strategy`)::

    name          rule              RE   HI   modes used
    comp          CAS (Eq.8)        yes  yes  all
    greedy        CAS               no   no   all (HI off: R_m = latest r)
    no-re         CAS               no   yes  all
    no-hi         CAS               yes  no   all
    cycle         round-robin       -    -    all
    random-mode   uniform random    -    -    all
    param-only    subset_rule       -    -    P* modes only
    token-only    subset_rule       -    -    T* modes only
    sjp           subset_rule       -    -    T* until set_token_share_reached() (or all T* exhausted), then P*

``subset_rule`` (default ``"cycle"``) is the rule *within* the restricted set of ``param-only``,
``token-only`` and ``sjp``: ``"cycle"`` (round-robin: these are the non-MPS baselines — the paper's ablation
adds CAS on top of SJP), ``"comp"`` (CAS+RE+HI restricted to the subset) or ``"greedy"`` (CAS only). An
engine that implements UPop-style ``param-only`` as one merged global parameter mode just passes that one
mode; the rule is then moot.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import CompVLMError, ConfigError
from .validation import validate_dataclass

STRATEGIES = ("comp", "param-only", "token-only", "sjp", "cycle", "random-mode", "greedy", "no-re", "no-hi")
SUBSET_RULES = ("cycle", "comp", "greedy")
WARMUP_ORDERS = ("random", "fixed")
STATE_VERSION = 1


class ScheduleError(CompVLMError, RuntimeError):
    """The scheduler's stage protocol was broken (e.g. ``choose()`` while a stage awaits ``update()``)."""


class NoModeLeftError(ScheduleError):
    """Every mode the strategy may use is exhausted: no stage can prune further."""


# ----------------------------------------------------------------------------------------------- pure parts


def stage_cost(b_before: float, b_after: float, f_before: float, f_after: float) -> float:
    """CAS cost of one stage (Eq.8): ``r = (B_after - B_before) / (F_before - F_after)``.

    ``B`` is a *badness* (validation loss, or -metric); ``F`` the realised structural FLOPs. Lower r is
    better (less damage per FLOP removed); r < 0 means the stage improved B. Raises ``ValueError`` unless
    ``f_before > f_after`` (a stage that removed no FLOPs has no cost — mark the mode exhausted instead).
    """
    if not f_before > f_after:
        raise ValueError(f"stage_cost needs F_before > F_after (FLOPs must drop), got {f_before} -> {f_after}")
    r = (b_after - b_before) / (f_before - f_after)
    if not math.isfinite(r):
        raise ValueError(f"stage_cost is not finite: B {b_before} -> {b_after}, F {f_before} -> {f_after}")
    return float(r)


def history_lambda(i_m: int, lambda0: float = 0.4, i_max: float = 5) -> float:
    """HI decay weight (Eq.10): ``lambda = max(lambda0 - (lambda0 / I_max) * (I_m - 1), 0)``.

    ``I_m >= 1`` is the number of stages since mode m last ran. Defaults give .40, .32, .24, .16, .08 for
    I_m = 1..5 and 0 beyond (old history is forgotten).
    """
    if i_m < 1:
        raise ValueError(f"I_m (stages since the mode last ran) must be >= 1, got {i_m}")
    if i_max <= 0:
        raise ValueError(f"I_max must be > 0, got {i_max}")
    return max(lambda0 - (lambda0 / i_max) * (i_m - 1), 0.0)


def history_update(r_prev: float | None, r: float, i_m: int | None, lambda0: float = 0.4,
                   i_max: float = 5) -> float:
    """HI update (Eq.10): ``R_m <- lambda * R_m_prev + (1 - lambda) * r``; the first update (``r_prev`` None)
    sets ``R_m = r``."""
    if r_prev is None:
        return float(r)
    if i_m is None:
        raise ValueError("I_m is needed for a non-first HI update")
    lam = history_lambda(i_m, lambda0, i_max)
    return lam * r_prev + (1.0 - lam) * r


def exploration_probabilities(stages_since: Sequence[float], tau: float = 5.0) -> list[float]:
    """RE sampling distribution (Eq.9): ``softmax_m(I_m / tau)`` — modes idle longer are likelier.

    Numerically stable (max-shifted); returns probabilities in the input order.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if len(stages_since) == 0:
        raise ValueError("exploration_probabilities needs at least one mode")
    logits = [float(i) / tau for i in stages_since]
    top = max(logits)
    w = [math.exp(x - top) for x in logits]
    s = sum(w)
    return [x / s for x in w]


#: what a token mode's stages remove, by ``tower/kind`` name in stage logs (``removed_by``) and reports
TOKEN_MODE_PARTS = {"T_v": "vision/tokens", "T_l": "text/tokens"}


def mode_part(mode: str) -> str:
    """The name a token stage's removal goes by in stage logs (:data:`TOKEN_MODE_PARTS`; another mode's own)."""
    return TOKEN_MODE_PARTS.get(mode, mode)


def mode_kind(mode: str) -> str:
    """``"param"`` for modes named ``P...`` (``P_v``, ``P_l``, ``P_c``), ``"token"`` for ``T...``."""
    if mode.startswith("P"):
        return "param"
    if mode.startswith("T"):
        return "token"
    raise ConfigError(f"mode {mode!r} is neither a parameter mode (P...) nor a token mode (T...)")


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MPSConfig:
    """Hyperparameters of the mode schedule.

    strategy: one of :data:`STRATEGIES` (see the module docstring). rho: RE probability (Eq.9).
    tau: RE softmax temperature (Eq.9). lambda0, i_max: HI decay (Eq.10). subset_rule: rule within the
    restricted mode set of ``param-only`` / ``token-only`` / ``sjp`` (one of :data:`SUBSET_RULES`).
    warmup_order: ``fixed`` (untried modes run in the given order) or ``random`` (a seeded permutation; method.md
    §3 REVISED: a fixed order credits every token mode's first cost with the recovery of a parameter stage).
    """

    strategy: str = "comp"
    rho: float = 0.2
    tau: float = 5.0
    lambda0: float = 0.4
    i_max: int = 5
    subset_rule: str = "cycle"
    warmup_order: str = "random"

    def __post_init__(self) -> None:
        validate_dataclass(self)  # types, and the ranges of rho, tau, lambda0, i_max: validation.RANGES, as PruneConfig's
        if self.warmup_order not in WARMUP_ORDERS:
            raise ConfigError(f"unknown warmup_order {self.warmup_order!r}; choose one of {', '.join(WARMUP_ORDERS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown MPS strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.subset_rule not in SUBSET_RULES:
            raise ConfigError(f"unknown subset_rule {self.subset_rule!r}; choose one of {', '.join(SUBSET_RULES)}")


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy name resolves to. rule: ``"cas" | "cycle" | "random"``; use_re / use_hi: Eq.9 / Eq.10
    on; kinds: mode kinds allowed (``None`` = all); sjp: token phase first, then parameter phase."""

    rule: str
    use_re: bool
    use_hi: bool
    kinds: tuple[str, ...] | None = None
    sjp: bool = False


def resolve_strategy(config: MPSConfig) -> StrategySpec:
    """Map ``config.strategy`` (+ ``subset_rule``) to its flags; the table is in the module docstring."""
    named = {
        "comp": StrategySpec("cas", True, True),
        "greedy": StrategySpec("cas", False, False),
        "no-re": StrategySpec("cas", False, True),
        "no-hi": StrategySpec("cas", True, False),
        "cycle": StrategySpec("cycle", False, False),
        "random-mode": StrategySpec("random", False, False),
    }
    if config.strategy in named:
        return named[config.strategy]
    sub = {"cycle": ("cycle", False, False), "comp": ("cas", True, True), "greedy": ("cas", False, False)}
    rule, re_on, hi_on = sub[config.subset_rule]
    if config.strategy == "param-only":
        return StrategySpec(rule, re_on, hi_on, kinds=("param",))
    if config.strategy == "token-only":
        return StrategySpec(rule, re_on, hi_on, kinds=("token",))
    return StrategySpec(rule, re_on, hi_on, kinds=("token", "param"), sjp=True)  # sjp


# ------------------------------------------------------------------------------------------------ scheduler


class MultiModeScheduler:
    """Chooses the mode of each pruning stage: CAS greedy (Eq.8) + RE exploration (Eq.9) + HI history (Eq.10),
    or one of the baseline schedules, with a JSON-serialisable state and its own seeded RNG.

    Rules common to the CAS strategies: untried modes (no cost R_m yet) run first, in the warm-up order (the
    given order, or a seeded permutation of it; no RE); afterwards, with probability ``rho`` (RE on) a mode is drawn from softmax(I_m / tau) over the
    available modes, else ``argmin_m R_m`` (ties: first in the given order). ``I_m = T - T_m`` is counted
    at the stage being chosen. Exhausted modes leave both the greedy set and the RE softmax.

    Public state (read-only): ``modes``, ``config``, ``seed``, ``stage`` (T of the latest chosen stage),
    ``costs`` (R_m, None until first update), ``last_run`` (T_m), ``exhausted``, ``phase`` (sjp), ``pending``
    (mode awaiting ``update``), ``history`` (one dict per stage: stage, mode, how ∈ {warmup, greedy, random,
    cycle, uniform}, candidates, i_m, R_before, status ∈ {pending, done, cancelled}, r, lam, R, info).
    """

    def __init__(self, modes: Sequence[str], config: MPSConfig | None = None, seed: int = 0) -> None:
        modes = list(modes)
        if not modes:
            raise ConfigError("the scheduler needs at least one mode")
        if any(not isinstance(m, str) or not m for m in modes) or len(set(modes)) != len(modes):
            raise ConfigError(f"modes must be unique non-empty strings, got {modes}")
        self.config = config if config is not None else MPSConfig()
        self.spec = resolve_strategy(self.config)
        if self.spec.kinds is not None:
            allowed = [m for m in modes if mode_kind(m) in self.spec.kinds]
            if not allowed:
                raise ConfigError(f"strategy {self.config.strategy!r} has no usable mode among {modes}")
        self.modes: list[str] = modes
        self.seed = int(seed)
        self._rng = random.Random(self.seed)
        self.stage = 0
        self.costs: dict[str, float | None] = {m: None for m in modes}
        self.last_run: dict[str, int | None] = {m: None for m in modes}
        self.exhausted: list[str] = []
        self.phase: str | None = "token" if self.spec.sjp else None
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._observed: dict[str, float] = {}
        self.warmup = list(modes)
        if self.config.warmup_order == "random":  # its own RNG: the RE stream stays that of a fixed-order run
            random.Random(f"warmup-{self.seed}").shuffle(self.warmup)

    # ------------------------------------------------------------------------------------------ queries

    @property
    def pending(self) -> str | None:
        """Mode chosen for the current stage that still awaits ``update`` (or ``mark_exhausted``)."""
        return None if self._pending is None else self._pending["mode"]

    def candidates(self) -> list[str]:
        """Modes the next ``choose()`` may pick (strategy/phase filter, minus exhausted), in the given order."""
        out = [m for m in self.modes if m not in self.exhausted]
        if self.spec.sjp:
            out = [m for m in out if mode_kind(m) == self.phase]
        elif self.spec.kinds is not None:
            out = [m for m in out if mode_kind(m) in self.spec.kinds]
        return out

    def stages_since(self, mode: str, stage: int | None = None) -> int | None:
        """``I_m = T - T_m`` at ``stage`` (default: the next stage); None if the mode never ran."""
        t_m = self.last_run[mode]
        t = self.stage + 1 if stage is None else stage
        return None if t_m is None else t - t_m

    # ------------------------------------------------------------------------------------------ protocol

    def choose(self) -> str:
        """Start stage T+1 and return its mode (recorded as pending in ``history``).

        Raises :class:`ScheduleError` if the previous stage is still pending, :class:`NoModeLeftError` if no
        mode is left.
        """
        if self._pending is not None:
            raise ScheduleError(f"stage {self.stage} (mode {self._pending['mode']!r}) awaits update() or "
                                f"mark_exhausted() before the next choose()")
        if self.spec.sjp and self.phase == "token" and not self.candidates():
            self.phase = "param"  # every token mode exhausted: the token phase cannot go on
        cands = self.candidates()
        if not cands:
            raise NoModeLeftError(
                f"no mode left for strategy {self.config.strategy!r}: exhausted {self.exhausted} of {self.modes}"
                + (f" (sjp phase {self.phase!r})" if self.spec.sjp else ""))
        t = self.stage + 1
        untried = sorted((m for m in cands if self.costs[m] is None), key=self.warmup.index)
        rule = self.spec.rule
        if rule == "random":
            mode, how = cands[self._rng.randrange(len(cands))], "uniform"
        elif rule == "cycle":
            # round-robin = least recently run first (never-run first, ties in the given order);
            # skips exhausted modes and carries over sjp phase switches without extra state
            mode = min(cands, key=lambda m: (-1 if self.last_run[m] is None else self.last_run[m],
                                             self.modes.index(m)))
            how = "cycle"
        elif untried:
            mode, how = untried[0], "warmup"
        elif self.spec.use_re and self._rng.random() < self.config.rho:
            # I_m = T - T_m (Eq. 9); a mode that never ran (its cost seen by observe(), as under the probe) has T_m = 0
            probs = exploration_probabilities([t - (self.last_run[m] or 0) for m in cands], self.config.tau)
            mode, how = cands[_sample_index(self._rng, probs)], "random"
        else:
            mode, how = min(cands, key=lambda m: self.costs[m]), "greedy"  # min keeps the first on ties
        prev = self.last_run[mode]
        self.stage = t
        self.last_run[mode] = t
        rec = {
            "stage": t, "mode": mode, "how": how, "candidates": list(cands),
            "i_m": None if prev is None else t - prev, "R_before": {m: self.costs[m] for m in cands},
            "status": "pending", "r": None, "lam": None, "R": None, "info": None,
        }
        if self._observed:
            rec["observed"], self._observed = dict(self._observed), {}
        if self.spec.sjp:
            rec["phase"] = self.phase
        self.history.append(rec)
        self._pending = {"mode": mode, "prev_last_run": prev}
        return mode

    def update(self, mode: str, cost: float, info: Mapping[str, Any] | None = None, hi: bool = True) -> float | None:
        """Record the measured CAS cost r (Eq.8) of the pending stage and apply HI (Eq.10); returns the new R_m.

        With HI off, R_m = r. ``info`` (JSON-serialisable, e.g. a bootstrap SE) is stored in the history.
        ``hi=False`` records r but leaves R_m as it is (a sliver stage, or a cost already seen by :meth:`observe`).
        """
        if self._pending is None:
            raise ScheduleError("update() without a pending stage: call choose() first")
        if mode != self._pending["mode"]:
            raise ScheduleError(f"update({mode!r}) but stage {self.stage} ran {self._pending['mode']!r}")
        cost = float(cost)
        if not math.isfinite(cost):
            raise ValueError(f"stage cost must be finite, got {cost}")
        if info is not None:
            info = dict(info)
            json.dumps(info)  # fail now, not at checkpoint time
        prev_run = self._pending["prev_last_run"]
        i_m = None if prev_run is None else self.stage - prev_run
        r_prev = self.costs[mode]
        if not hi:
            lam, new = None, r_prev
        elif self.spec.use_hi and r_prev is not None:
            lam = history_lambda(i_m, self.config.lambda0, self.config.i_max)
            new = history_update(r_prev, cost, i_m, self.config.lambda0, self.config.i_max)
        else:
            lam, new = None, cost  # first update, or HI off: R_m = r
        self.costs[mode] = new
        self.history[-1].update(status="done", r=cost, lam=lam, R=new, info=info)
        self._pending = None
        return new

    def observe(self, mode: str, cost: float) -> float:
        """Probe cost measure (method.md §3, beyond the paper): before the next ``choose()``, a cost r measured for
        ``mode`` on the current weights updates R_m by HI (Eq.10, I_m = stages since the mode last ran; the first
        observation sets R_m = r). Returns the new R_m."""
        if self._pending is not None:
            raise ScheduleError("observe() while a stage is pending: observe before choose()")
        cost = float(cost)
        if not math.isfinite(cost):
            raise ValueError(f"probe cost must be finite, got {cost}")
        r_prev = self.costs[mode]
        i_m = self.stages_since(mode) or self.stage + 1  # never ran: stages since the search began
        if self.spec.use_hi and r_prev is not None:
            self.costs[mode] = history_update(r_prev, cost, i_m, self.config.lambda0, self.config.i_max)
        else:
            self.costs[mode] = cost
        self._observed[mode] = cost
        return self.costs[mode]

    def mark_exhausted(self, mode: str) -> None:
        """Mode ``mode`` cannot prune further: it leaves the greedy set and the RE softmax for good.

        If it is the pending mode (it could not prune at all this stage), the stage is cancelled: T and T_m
        roll back and the next ``choose()`` reuses the stage number (the record stays, status ``cancelled``).
        Idempotent.
        """
        if mode not in self.costs:
            raise ConfigError(f"unknown mode {mode!r}; modes are {self.modes}")
        if self._pending is not None and self._pending["mode"] == mode:
            self.last_run[mode] = self._pending["prev_last_run"]
            self.stage -= 1
            self.history[-1]["status"] = "cancelled"
            self._pending = None
        if mode not in self.exhausted:
            self.exhausted.append(mode)

    def set_token_share_reached(self) -> None:
        """``sjp`` only: the token modes reached their FLOPs share — from now on only parameter modes run."""
        if not self.spec.sjp:
            raise ScheduleError(f"set_token_share_reached() is for strategy 'sjp', not {self.config.strategy!r}")
        self.phase = "param"

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything, RNG included, as plain JSON types (``json.dumps`` works)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": STATE_VERSION,
            "modes": list(self.modes),
            "config": asdict(self.config),
            "seed": self.seed,
            "stage": self.stage,
            "costs": dict(self.costs),
            "last_run": dict(self.last_run),
            "exhausted": list(self.exhausted),
            "phase": self.phase,
            "pending": None if self._pending is None else dict(self._pending),
            "history": json.loads(json.dumps(self.history)),  # deep copy, JSON types only
            "warmup": list(self.warmup),
            "observed": dict(self._observed),
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also after a JSON round trip). Modes and config must match this
        scheduler's; afterwards it continues exactly as the saved one would have."""
        if state.get("version") != STATE_VERSION:
            raise ScheduleError(f"unsupported scheduler state version {state.get('version')!r}")
        if list(state["modes"]) != self.modes:
            raise ScheduleError(f"scheduler state has modes {state['modes']}, this scheduler {self.modes}")
        if MPSConfig(**state["config"]) != self.config:
            raise ScheduleError(f"scheduler state has config {state['config']}, this one {asdict(self.config)}")
        self.seed = int(state["seed"])
        self.stage = int(state["stage"])
        self.costs = {m: None if state["costs"][m] is None else float(state["costs"][m]) for m in self.modes}
        self.last_run = {m: None if state["last_run"][m] is None else int(state["last_run"][m])
                         for m in self.modes}
        self.exhausted = [m for m in state["exhausted"]]
        self.phase = state["phase"]
        self._pending = None if state["pending"] is None else dict(state["pending"])
        self.history = json.loads(json.dumps(state["history"]))
        self.warmup = list(state.get("warmup", self.modes))
        self._observed = {m: float(v) for m, v in state.get("observed", {}).items()}
        version, internal, gauss = state["rng"]
        self._rng.setstate((int(version), tuple(int(x) for x in internal), gauss))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> MultiModeScheduler:
        """Build a scheduler from a :meth:`state_dict` (modes, config, seed and all state)."""
        sched = cls(state["modes"], MPSConfig(**state["config"]), seed=state["seed"])
        sched.load_state_dict(state)
        return sched


def _sample_index(rng: random.Random, probs: Sequence[float]) -> int:
    """Index drawn from a categorical distribution with one uniform draw (inverse CDF)."""
    u = rng.random()
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


__all__ = [
    "STRATEGIES", "SUBSET_RULES", "MPSConfig", "MultiModeScheduler", "NoModeLeftError", "ScheduleError",
    "StrategySpec", "exploration_probabilities", "history_lambda", "history_update", "mode_kind",
    "resolve_strategy", "stage_cost",
]
