"""Quality suite: CoMP vs single-mode and naive joint pruning on the offline benchmark world, paired seeds.

One search per (arm, seed) passes through every requested ratio (snapshots), each snapshot fine-tuned and
evaluated; every finished run appends its records to ``benchmarks/results/quality.json`` (a list of flat records)
and its stage log to ``quality_stages.jsonl``. Every record names what produced it: the world, model, task and
bench settings, the git commit, and the full PruneConfig. A *suite* is the set of runs that share all of that
except the arm-level fields (strategy, seed, the arm's own options, the unit-selection rule); its key is a short
hash. A restart skips a run whose (suite, arm label, seed) is recorded, so the suite can run in the background
across sessions, and arms are paired by seed only within one suite. ``--report`` renders the markdown tables
(means, mean paired differences vs comp with 95% CIs) and the PNG plots per suite from whatever is recorded;
records written before the suite keys form the suite ``legacy``.

    python benchmarks/quality.py --smoke                 # minutes: tiny everything, writes to /tmp
    python benchmarks/quality.py                         # the suite (hours on 2 CPU cores)
    python benchmarks/quality.py --set distill=0.5       # every arm with that PruneConfig field changed
    python benchmarks/quality.py --strategies comp,old,old+tokens   # the search fixes one at a time
    python benchmarks/quality.py --report                # tables + plots from the recorded runs
    python benchmarks/quality.py --report --out benchmarks/results/before   # the results before the search fixes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import comp_vlm
import comp_vlm.training
from comp_vlm.dense import cache_key
from comp_vlm.outputs import pid_alive

sys.path.insert(0, str(Path(__file__).resolve().parent))
import downsample
import emoji_bench
from bench_world import FULL, SMOKE, Bench, BenchSettings, make_bench

MAIN = ("comp", "param-only", "token-only", "sjp", "cycle", "random-mode")
ABLATIONS = ("greedy", "no-cip", "uniform-rms", "no-cit", "no-re", "no-hi")
# arms that are a strategy run with other engine options (recorded under the arm's name in the "strategy" field)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "comp-immediate": ("comp", {"cost_measure": "immediate"}),  # MPS cost = damage before any recovery training
    "comp-metric": ("comp", {"badness": "metric"}),  # B = -validation R@1 (the paper's choice) instead of val loss
}
# arms with their own run function instead of one prune() call (filled below, next to each function)
SPECIAL: dict[str, Callable] = {}
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


# sanity baselines (method.md §4) that recent VLM-pruning benchmarks found strong; run by SPECIAL where not a config
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


# ---- arms, configs and suites ----------------------------------------------------------------------------------
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


def suite_of(record: dict) -> str:
    return record.get("suite", LEGACY)


def label_of(record: dict) -> str:
    return record.get("arm", record["strategy"])


def base_name(label: str) -> str:
    return label.split("@", 1)[0]


def done_runs(records: list[dict]) -> set[tuple[str, str, int]]:
    """The (suite, arm label, seed) of every recorded run: what a restart skips."""
    return {(suite_of(r), label_of(r), r["seed"]) for r in records}


def by_suite(items: list[dict]) -> dict[str, list[dict]]:
    """Records or stage records per suite key, in the order the suites first appear."""
    out: dict[str, list[dict]] = {}
    for item in items:
        out.setdefault(suite_of(item), []).append(item)
    return out


# ---- --set KEY=VALUE ---------------------------------------------------------------------------------------------
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


# ---- provenance --------------------------------------------------------------------------------------------------
def git_state(root: Path) -> tuple[str | None, bool | None]:
    """HEAD of the repository at ``root`` and whether tracked files under comp_vlm/ or benchmarks/ (results
    excluded: the suite writes them) differ from it; (None, None) outside git. ``COMP_VLM_COMMIT``, set by
    whoever copied the checkout to another machine, overrides both (dirty unknown): a copy's git metadata can be
    stale (seen on a lent GPU machine, which read an older HEAD)."""
    if os.environ.get("COMP_VLM_COMMIT"):
        return os.environ["COMP_VLM_COMMIT"], None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "comp_vlm", "benchmarks",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, bool(changed.strip())


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

    @property
    def suite(self) -> str:
        return suite_key(self.identity, config_dict(self.base), self.default_selection)

    def run_identity(self, arm: str, config: Any) -> dict[str, Any]:
        """The identity fields of one run of ``arm`` with ``config``."""
        return {"strategy": arm, "arm": arm_label(arm, getattr(config, "selection", None), self.default_selection),
                "seed": config.seed, "suite": self.suite, **self.identity, "commit": self.commit,
                "dirty": self.dirty, "overrides": self.overrides, "device": self.device, "config": config_dict(config)}


# ---- results files -----------------------------------------------------------------------------------------------
def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def load_stages(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``'s lock file: suite processes side by side never interleave their writes."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: Path, change: Callable[[Any], Any], empty: Any) -> None:
    """Read ``path`` (``empty`` if absent), apply ``change``, write it back through a temp file and rename, under an
    exclusive lock: a crash never leaves a truncated results file, and suite processes running side by side (e.g.
    one per core) never lose each other's updates."""
    with locked(path):
        value = change(json.loads(path.read_text()) if path.is_file() else empty)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=1)
        os.replace(tmp, path)


@contextlib.contextmanager
def claimed(claims: Path, suite: str, arm: str, seed: int) -> Iterator[bool]:
    """Claim the run (suite, arm, seed) for this process while it runs: yields False when another live process
    holds it, so suite processes side by side (one per core, or per GPU share) split the work instead of repeating
    it. A claim is a file naming host and pid; one left by a dead process on this host is taken over, one from
    another host is respected (delete it by hand if that machine is gone)."""
    import socket

    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{suite}-{arm}-{seed}"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = path.read_text().partition(" ") if path.is_file() else ("", "", "")
            if host != socket.gethostname() or not pid.strip().isdigit() or pid_alive(int(pid)):
                yield False
                return
            path.unlink(missing_ok=True)  # its process is gone: the run was never recorded
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def append_records(path: Path, new: list[dict]) -> None:
    update_json(path, lambda records: records + new, [])


def append_line(path: Path, value: Any) -> None:
    """Append ``value`` as one JSON line, under the lock (a long line may take several writes)."""
    with locked(path), path.open("a") as fh:
        fh.write(json.dumps(value) + "\n")


def merge_floors(recorded: dict, suite: str, floors: dict[str, float]) -> dict:
    """``recorded`` floors ({suite: {arm: floor}}) with ``floors`` added under ``suite``; a flat file of the
    legacy format ({arm: floor}) becomes the suite ``legacy``."""
    if recorded and not all(isinstance(v, dict) for v in recorded.values()):
        recorded = {LEGACY: recorded}
    return recorded | {suite: recorded.get(suite, {}) | floors}


# ---- statistics --------------------------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (nan for fewer than 2 values)."""
    from scipy.stats import t as student_t  # optional dependency, only for the report

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def order_key(label: str) -> tuple[int, str]:
    known = (CONTROL,) + MAIN + ABLATIONS + tuple(ARMS)
    name = base_name(label)
    return (known.index(name) if name in known else len(known), label)


def is_baseline(name: str) -> bool:
    """Single-mode and naive joint arms, and any arm the suite does not know (not comp, its ablations or options)."""
    return name in SINGLE_MODE + NAIVE_JOINT or name not in (CONTROL,) + MAIN + ABLATIONS + tuple(ARMS)


def paired(records: list[dict], ratio: float, a: str, b: str) -> list[float]:
    """Per-seed differences a - b (arm labels) at ``ratio`` over the seeds where both reached it, within a suite."""
    keyed = {(suite_of(r), label_of(r), r["seed"]): r for r in records if r["ratio"] == ratio and r["reached"]}
    return [keyed[(suite, a, seed)]["metric"] - rec["metric"]
            for (suite, label, seed), rec in sorted(keyed.items()) if label == b and (suite, a, seed) in keyed]


def arm_mean(records: list[dict], ratio: float, label: str) -> float:
    rows = [r["metric"] for r in records if label_of(r) == label and r["ratio"] == ratio and r["reached"]]
    return statistics.fmean(rows) if rows else -math.inf


def labels_of(items: list[dict]) -> list[str]:
    return sorted({label_of(x) for x in items}, key=order_key)


def best_rule(records: list[dict], ratio: float, name: str) -> str | None:
    """The label of arm ``name`` under its best unit-selection rule at ``ratio`` (highest mean; None: unreached)."""
    reached = [x for x in labels_of(records) if base_name(x) == name and arm_mean(records, ratio, x) > -math.inf]
    return max(reached, key=lambda x: arm_mean(records, ratio, x)) if reached else None


def delta(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return ""
    m, h = mean_ci(diffs)
    return f"{m:+.2f} ± {h:.2f}"


def verdict(diffs: list[float]) -> str:
    m, h = mean_ci(diffs)
    return "CI excludes 0" if m - h > 0 or m + h < 0 else "CI includes 0"


def headline(records: list[dict], ratio: float, arm: str = "comp") -> list[str]:
    """``arm`` (CoMP) vs the best single-mode arm and vs the best naive joint arm (best = highest mean at ``ratio``
    over the arms and their selection rules)."""
    lines = []
    for label, group in (("best single-mode arm", SINGLE_MODE), ("best naive joint arm", NAIVE_JOINT)):
        present = [x for x in labels_of(records) if base_name(x) in group and arm_mean(records, ratio, x) > -math.inf]
        if not present or arm_mean(records, ratio, arm) == -math.inf:
            continue
        best = max(present, key=lambda g: arm_mean(records, ratio, g))
        diffs = paired(records, ratio, arm, best)
        if len(diffs) < 2:
            continue
        m, h = mean_ci(diffs)
        lines.append(f"- at {ratio}: {arm} − {label} ({best}) = **{m:+.2f} ± {h:.2f}** R@1 points "
                     f"(n = {len(diffs)} paired seeds; {verdict(diffs)})")
    return lines


# ---- report ------------------------------------------------------------------------------------------------------
def switches(record: dict, stem: str) -> tuple[str, ...]:
    """The command-line switches that select a record's bench settings and results files."""
    bench = record.get("bench") or {}
    model = record.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    out: tuple[str, ...] = ("--smoke",) if name == SMOKE.name else ()
    default = SMOKE if name == SMOKE.name else FULL
    emoji = str(record.get("world", "")).startswith("emoji-world")
    if emoji:  # the emoji world's bench settings come from its calibration attempt, named in the model
        out += ("--world", "emoji", "--attempt", str(name).removeprefix("emoji-clip-"))
    elif bench.get("stage_steps", default.stage_steps) != default.stage_steps:
        out += ("--stage-steps", str(bench["stage_steps"]))
    if str(record.get("device", "cpu")).startswith("cuda"):
        out += ("--device", "cuda")
    if stem.startswith("quality-") and not (emoji and stem == "quality-emoji"):
        out += ("--tag", stem[len("quality-"):])
    return out


def repeat_commands(records: list[dict], stem: str) -> list[str]:
    """Commands that run ``records``' arms and seeds again (into a fresh ``--out``): one per group of arms that
    share ratios, seeds, ``--set`` and bench switches; the dense+ft seeds go with the first group holding comp."""
    ratios: dict[tuple, set[float]] = {}
    for r in records:
        if r["strategy"] != CONTROL:
            setting = (tuple(sorted((r.get("overrides") or {}).items())), switches(r, stem))
            ratios.setdefault((setting, r["strategy"], r["seed"]), set()).add(r["ratio"])
    seeds: dict[tuple, list[int]] = {}
    for (setting, arm, seed), rs in ratios.items():
        seeds.setdefault((setting, arm, tuple(sorted(rs))), []).append(seed)
    groups: dict[tuple, list[str]] = {}
    for (setting, arm, rs), ss in seeds.items():
        groups.setdefault((setting, rs, tuple(sorted(ss))), []).append(arm)
    controls = sorted({r["seed"] for r in records if r["strategy"] == CONTROL})
    commands = []
    for ((overrides, flags), rs, ss), arms in groups.items():
        control = controls if "comp" in arms else []
        controls = [] if control else controls
        args = [*flags, "--strategies", ",".join(sorted(arms, key=order_key)), "--ratios", ",".join(map(str, rs)),
                "--seeds", ",".join(map(str, ss)), "--control-seeds", ",".join(map(str, control))]
        for key, value in overrides:
            args += ["--set", f"{key}={value}"]
        commands.append("python benchmarks/quality.py " + shlex.join(args))
    return commands


def repeat_line(records: list[dict], stem: str, labels: list[str] | set[str]) -> list[str]:
    """The line under a table naming the command(s) that repeat its arms."""
    commands = repeat_commands([r for r in records if label_of(r) in labels], stem)
    return ["", "Repeat: " + "; ".join(f"`{c}`" for c in commands)] if commands else []


def suite_line(key: str, records: list[dict]) -> str:
    """Where a suite's records come from: world, task, dense model, commits, ``--set``."""
    if key == LEGACY:
        return ("Suite `legacy`: records written before runs carried their world, config and commit. The repeat "
                "commands below name their arms, seeds, ratios and tag only (bench switches such as `--stage-steps` "
                "were not recorded), and today's engine runs them as a new suite.")
    r = records[0]
    commits: dict[str, int] = {}
    for rec in records:
        name = f"`{(rec['commit'] or 'unknown')[:10]}`" + (" (uncommitted changes)" if rec["dirty"] else "")
        commits[name] = commits.get(name, 0) + 1
    sets = sorted({" ".join(f"{k}={v}" for k, v in sorted((rec.get("overrides") or {}).items())) or "none"
                   for rec in records})
    return (f"Suite `{key}`: world `{r['world']}`, task {r['task']['name']} (galleries of "
            f"{r['task']['gallery_size']}), dense model `{r['model']['dense_id']}`; commit "
            + ", ".join(f"{c} ({n} records)" for c, n in commits.items()) + "; `--set`: " + "; ".join(sets) + ".")


def baseline_section(records: list[dict], ratios: list[float], h: str, arm: str = "comp") -> list[str]:
    """``arm`` at its default rule vs every baseline present, each under its best selection rule per ratio."""
    names = list(dict.fromkeys(base_name(x) for x in labels_of(records) if is_baseline(base_name(x))))
    rows = []
    for ratio in ratios:
        if arm_mean(records, ratio, arm) == -math.inf:
            continue
        for name in names:
            best = best_rule(records, ratio, name)
            if best is None:
                rows.append(f"| {ratio} | {name} | not reached | | | | |")
                continue
            diffs = paired(records, ratio, arm, best)
            rows.append(f"| {ratio} | {best} | {arm_mean(records, ratio, best):.2f} | {arm_mean(records, ratio, arm):.2f} "
                        f"| {delta(diffs)} | {len(diffs)} | {verdict(diffs) if len(diffs) >= 2 else ''} |")
    if not rows:
        return []
    return (["", f"{h} {arm} vs each baseline (its best selection rule at each ratio)", "",
             f"| ratio | baseline (best rule) | baseline mean | {arm} mean | Δ {arm} − baseline | n | |",
             "|---|---|---|---|---|---|---|", *rows])


def fixes_section(records: list[dict], ratios: list[float], h: str) -> list[str]:
    """The search fixes one at a time: each ``old+<fix>`` and comp vs ``old``, paired by seed."""
    present = labels_of(records)
    if "old" not in present:
        return []
    order = ["old", *(f"old+{fix}" for fix in FIXES), "comp"]
    arms = sorted((x for x in present if x in order), key=order.index)
    lines = ["", f"{h} The search fixes one at a time", "",
             ("old = comp with `LEGACY_OPTIONS` (the engine before the fixes); old+<fix> turns one fix on; comp has "
              "them all. Δ = arm − old, paired by seed."), "",
             "| ratio | arm | mean ± 95% CI | Δ arm − old | n |", "|---|---|---|---|---|"]
    for ratio in ratios:
        for x in arms:
            rows = [r["metric"] for r in records if label_of(r) == x and r["ratio"] == ratio and r["reached"]]
            if not rows:
                continue
            m, hw = mean_ci(rows)
            diffs = paired(records, ratio, x, "old") if x != "old" else []
            lines.append(f"| {ratio} | {x} | {m:.2f} ± {hw:.2f} | {delta(diffs)} | {len(diffs) or len(rows)} |")
    return lines


TOKEN_PARTS = {"T_v": "vision_tokens", "T_l": "text_tokens"}
REMOVED_PARTS = ("heads", "neurons", "vision_tokens", "text_tokens")


def snapshot_position(stage: dict, ratio: str) -> int | None:
    """Position in a stage record's lists of the last stage before the ``ratio`` snapshot (None: not reached).
    Logs without snapshot stages: the first stage that keeps at most 1 - ratio (the engine's snapshot rule)."""
    if "snapshot_stage" in stage:
        last = stage["snapshot_stage"].get(ratio)
        positions = [i for i, s in enumerate(stage["stage"]) if last is not None and s <= last]
        return positions[-1] if positions else None
    return next((i for i, kept in enumerate(stage["flops_kept"]) if kept <= 1 - float(ratio) + 1e-9), None)


def flops_went_where(stage: dict, ratio: str = "0.8") -> dict[str, float | None] | None:
    """Fractions of the dense FLOPs removed up to the ``ratio`` snapshot by heads, neurons, vision tokens and text
    tokens (the stages' ``removed_by``), with ``params`` = heads + neurons. A log without ``removed_by``
    attributes each stage's removal by its mode: T_v / T_l to vision / text tokens, the rest to ``params`` (heads
    and neurons then None). None where the run did not reach ``ratio``."""
    last = snapshot_position(stage, ratio)
    if last is None:
        return None
    removed_by = (stage.get("removed_by") or [None] * (last + 1))[:last + 1]
    if all(x is not None for x in removed_by):
        parts: dict[str, float | None] = {p: sum(x.get(p, 0.0) for x in removed_by) for p in REMOVED_PARTS}
        parts["params"] = parts["heads"] + parts["neurons"]
        return parts
    kept = [1.0] + list(stage["flops_kept"])
    steps = stage.get("flops_removed_step") or [a - b for a, b in itertools.pairwise(kept)]
    out = {"heads": None, "neurons": None, "params": 0.0, "vision_tokens": 0.0, "text_tokens": 0.0}
    for mode, removed in zip(stage["modes"][:last + 1], steps[:last + 1]):
        out[TOKEN_PARTS.get(mode, "params")] += removed
    return out


def flops_section(stages: list[dict], h: str, ratio: str = "0.8") -> list[str]:
    """Per arm, the mean over seeds of where the FLOPs removed up to the ``ratio`` snapshot came from."""
    by_arm: dict[str, list[dict]] = {}
    for st in stages:
        parts = flops_went_where(st, ratio)
        if parts is not None:
            by_arm.setdefault(label_of(st), []).append(parts)
    if not by_arm:
        return []
    lines = ["", f"{h} Where each arm's FLOPs went at {ratio} (mean over seeds)", "",
             (f"Fraction of the dense FLOPs removed up to the {ratio} snapshot, by what removed it. Heads and neurons "
              "apart where the stage log records it (`removed_by`); older logs only attribute a stage by its mode "
              "(params = heads + neurons)."), "",
             "| arm | runs | heads | neurons | params | vision tokens | text tokens | total |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in sorted(by_arm, key=order_key):
        runs = by_arm[arm]
        cells = []
        for part in ("heads", "neurons", "params", "vision_tokens", "text_tokens"):
            values = [run[part] for run in runs]
            cells.append("–" if any(v is None for v in values) else f"{statistics.fmean(values):.3f}")
        total = statistics.fmean(run["params"] + run["vision_tokens"] + run["text_tokens"] for run in runs)
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + f" | {total:.3f} |")
    return lines


def structure_section(stages: list[dict], h: str = "##", ratio: str = "0.8") -> list[str]:
    """How each arm spent its FLOPs at ``ratio``: mean kept fraction of heads and neurons, and the fraction of
    tokens that survive to the last layer (product of the site keep ratios), per tower."""
    by_arm: dict[str, list[dict]] = {}
    for st in stages:
        if ratio in st.get("layers", {}):
            by_arm.setdefault(label_of(st), []).append(st["layers"][ratio])
    if not by_arm:
        return []
    lines = ["", f"{h} Structure at {ratio} (mean over seeds)", "",
             "| strategy | tower | heads kept | neurons kept | tokens reaching the last layer |", "|---|---|---|---|---|"]
    for arm in sorted(by_arm, key=order_key):
        runs = by_arm[arm]
        for tower in runs[0]:
            heads = statistics.fmean(statistics.fmean(lay["heads"] for lay in run[tower]) for run in runs)
            neurons = statistics.fmean(statistics.fmean(lay["neurons"] for lay in run[tower]) for run in runs)
            tokens = statistics.fmean(math.prod(lay["keep"] for lay in run[tower]) for run in runs)
            lines.append(f"| {arm} | {tower} | {heads:.2f} | {neurons:.2f} | {tokens:.2f} |")
    return lines


def cost_section(stages: list[dict], h: str = "##") -> list[str]:
    """The MPS cost signal: how often a stage's measured cost (validation loss gained per FLOP removed) is
    negative, i.e. the loss fell while pruning -- recovery from earlier stages outweighing this stage's damage."""
    lines = ["", f"{h} MPS cost signal", "",
             "| strategy | stages | negative cost | median cost | median abs(cost) | median bootstrap SE |",
             "|---|---|---|---|---|---|"]
    rows = 0
    for arm in labels_of(stages):
        costs = [c for st in stages if label_of(st) == arm for c in st.get("cost", []) if c is not None]
        if not costs:
            continue
        rows += 1
        negative = sum(c < 0 for c in costs) / len(costs)
        ses = [x for st in stages if label_of(st) == arm for x in st.get("cost_se", []) if x is not None]
        se = f"{statistics.median(ses):.2f}" if ses else "not recorded"
        lines.append(f"| {arm} | {len(costs)} | {100 * negative:.0f}% | {statistics.median(costs):.2f} | "
                     f"{statistics.median(abs(c) for c in costs):.2f} | {se} |")
    return lines if rows else []


GAP_ARMS = ("comp", "cycle", "random-mode", *ARMS)


def mode_gap_section(stages: list[dict]) -> list[str]:
    """Cost per mode: whether the modes differ by more than a mode's own stage-to-stage spread (a gap MPS can
    exploit) or not (then the choice is mostly noise). cycle and random-mode sample every mode regardless of cost."""
    lines = ["", "Measured cost per mode (all stages of all seeds): median and interquartile range.", "",
             "| arm | mode | stages | median cost | IQR |", "|---|---|---|---|---|"]
    rows = 0
    for arm in [x for x in labels_of(stages) if base_name(x) in GAP_ARMS]:
        by_mode: dict[str, list[float]] = {}
        for st in stages:
            if label_of(st) == arm:
                for mode, cost in zip(st["modes"], st.get("cost", [])):
                    if cost is not None:
                        by_mode.setdefault(mode, []).append(cost)
        for mode, costs in sorted(by_mode.items()):
            rows += 1
            q1, _, q3 = statistics.quantiles(costs, n=4) if len(costs) >= 2 else (costs[0], 0, costs[0])
            lines.append(f"| {arm} | {mode} | {len(costs)} | {statistics.median(costs):.2f} | {q1:.2f} to {q3:.2f} |")
    return lines if rows else []


def mps_section(stages: list[dict], h: str) -> list[str]:
    """Stages per mode over all seeds, for comp and the arms that are comp with other options."""
    lines = []
    for arm in [x for x in labels_of(stages) if base_name(x) in COMP_FAMILY]:
        counts: dict[str, int] = {}
        for st in stages:
            if label_of(st) == arm:
                for mode in st["modes"]:
                    counts[mode] = counts.get(mode, 0) + 1
        total = sum(counts.values())
        lines += ["", f"{h} MPS ({arm}): stages per mode over all seeds", "",
                  ", ".join(f"{m}: {c} ({100 * c / total:.0f}%)" for m, c in sorted(counts.items()))]
    return lines


def suite_report(key: str, records: list[dict], stages: list[dict], stem: str, multi: bool) -> list[str]:
    """The markdown of one suite (headings one level down when the file holds several suites)."""
    h = "###" if multi else "##"
    labels = labels_of(records)
    ratios = sorted({r["ratio"] for r in records if r["strategy"] != CONTROL})
    dense = statistics.fmean(r["dense_metric"] for r in records)
    model = records[0]["model"]
    lines = [""] + ([f"## Suite `{key}`", ""] if multi else [])
    name = model["name"] if isinstance(model, dict) else model
    lines += [f"Model `{name}`, {len(records)} records. Dense R@1: {dense:.2f}.", suite_line(key, records),
              ("Mean over seeds of the arms that reached the ratio; Δ = mean paired difference comp − arm (same dense "
               "model, same data order per seed) ± 95% t-interval half-width; n = paired seeds."), ""]

    def repeat(section: list[str], arms: list[str] | set[str]) -> list[str]:
        return section + repeat_line(records, stem, arms) if section else []

    control = [r for r in records if label_of(r) == CONTROL]
    if control:
        m, hw = mean_ci([r["metric"] for r in control])
        lines += [(f"Control, dense + the same training steps as a comp run ({control[0]['steps']} steps): "
                   f"{m:.2f} ± {hw:.2f} (n = {len(control)})."), ""]
    lines += [f"{h} Headline", ""]
    for ratio in ratios:
        lines += headline(records, ratio)
    baselines = [x for x in labels if is_baseline(base_name(x))]
    lines += repeat(baseline_section(records, ratios, h), ["comp", *baselines])
    variants = [x for x in labels if base_name(x) in VARIANTS]
    if variants:
        lines += ["", "Variants of comp (same seeds; Δ in the table below is comp − variant):", ""]
        for ratio in ratios:
            for v in variants:
                lines += headline(records, ratio, v)
    lines += repeat(fixes_section(records, ratios, h), [x for x in labels if x == "comp" or x.startswith("old")])
    table = ["", f"{h} All arms", "", "| ratio | strategy | mean ± 95% CI | FLOPs kept | Δ comp − arm | n | reached |",
             "|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        for s in labels:
            if s == CONTROL:
                continue
            all_rows = [r for r in records if label_of(r) == s and r["ratio"] == ratio]
            rows = [r for r in all_rows if r["reached"]]
            if not all_rows:
                continue
            if not rows:
                table.append(f"| {ratio} | {s} | not reached | | | | 0/{len(all_rows)} |")
                continue
            m, hw = mean_ci([r["metric"] for r in rows])
            kept = statistics.fmean(r["flops_kept"] for r in rows)
            diffs = paired(records, ratio, "comp", s) if s != "comp" else []
            table.append(f"| {ratio} | {s} | {m:.2f} ± {hw:.2f} | {kept:.3f} | {delta(diffs)} | {len(diffs) or len(rows)} "
                         f"| {len(rows)}/{len(all_rows)} |")
    lines += repeat(table, [x for x in labels if x != CONTROL])
    staged = labels_of(stages)
    lines += repeat(flops_section(stages, h), staged)
    lines += repeat(structure_section(stages, h), staged)
    lines += repeat(cost_section(stages, h), staged)
    lines += repeat(mode_gap_section(stages), [x for x in staged if base_name(x) in GAP_ARMS])
    lines += mps_section(stages, h)
    return lines


def report(records: list[dict], stages: list[dict], out: Path, stem: str) -> None:
    """``stem``.md (every suite in the records, in order of appearance) and its plots (``stem``.png for a single
    suite, else ``stem``-<suite>.png per suite)."""
    if not records:
        return
    suites, stage_suites = by_suite(records), by_suite(stages)
    lines = ["# Quality: retrieval R@1 (mean of image→text and text→image, fixed-size galleries) after pruning"]
    for key, recs in suites.items():
        lines += suite_report(key, recs, stage_suites.get(key, []), stem, len(suites) > 1)
        ratios = sorted({r["ratio"] for r in recs if r["strategy"] != CONTROL})
        png = f"{stem}.png" if len(suites) == 1 else f"{stem}-{key}.png"
        plot(recs, stage_suites.get(key, []), labels_of(recs), ratios, out / png)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def plot(records: list[dict], stages: list[dict], labels: list[str], ratios: list[float], path: Path) -> None:
    """Metric vs FLOPs kept per arm; the MPS mode per stage (comp, all seeds; like the paper's Fig. 6); and
    the per-layer heads / neurons / token keep ratios of comp's 0.8 recipes (mean over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for s in labels:
        if s == CONTROL:
            continue
        pts = []
        for ratio in ratios:
            rows = [r for r in records if label_of(r) == s and r["ratio"] == ratio and r["reached"]]
            if rows:
                pts.append((statistics.fmean(r["flops_kept"] for r in rows), statistics.fmean(r["metric"] for r in rows)))
        if pts:
            axes[0].plot(*zip(*sorted(pts)), marker="o", label=s, lw=2.5 if s == "comp" else 1.2)
    axes[0].axhline(statistics.fmean(r["dense_metric"] for r in records), color="k", ls="--", lw=0.8, label="dense")
    axes[0].set_xlabel("FLOPs kept")
    axes[0].set_ylabel("R@1 (mean of both directions)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("accuracy vs FLOPs")
    comp_runs = [st for st in stages if label_of(st) == "comp"]
    if comp_runs:
        modes = sorted({m for st in comp_runs for m in st["modes"]})
        longest = max(len(st["modes"]) for st in comp_runs)
        bottom = [0.0] * longest
        for mode in modes:
            share = [sum(1 for st in comp_runs if len(st["modes"]) > i and st["modes"][i] == mode) / len(comp_runs)
                     for i in range(longest)]
            axes[1].bar(range(1, longest + 1), share, bottom=bottom, label=mode)
            bottom = [b + x for b, x in zip(bottom, share)]
        axes[1].set_xlabel("stage")
        axes[1].set_ylabel("share of seeds")
        axes[1].set_title(f"mode chosen by MPS per stage (comp, {len(comp_runs)} seeds)")
        axes[1].legend(fontsize=7)
        key = str(0.8) if any(str(0.8) in st["layers"] for st in comp_runs) else None
        runs = [st["layers"][key] for st in comp_runs if key in st["layers"]] if key else []
        if runs:
            ticks: list[str] = []
            for field, marker in (("heads", "o"), ("neurons", "s"), ("keep", "^")):
                x = 0
                for k, tower in enumerate(runs[0]):
                    n_layers = len(runs[0][tower])
                    vals = [statistics.fmean(run[tower][i][field] for run in runs) for i in range(n_layers)]
                    axes[2].plot(range(x, x + n_layers), vals, marker=marker, color=f"C{k}",
                                 ls=("-", "--", ":")[("heads", "neurons", "keep").index(field)],
                                 label=f"{tower} {field if field != 'keep' else 'token keep ratio'}")
                    if field == "heads":
                        ticks += [f"{tower[:1]}{i}" for i in range(n_layers)]
                    x += n_layers
            axes[2].set_xticks(range(len(ticks)), ticks)
            axes[2].set_ylim(0, 1.05)
            axes[2].set_title("comp at 0.8: kept fraction per layer (mean over seeds)")
            axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- running -----------------------------------------------------------------------------------------------------
def stage_record(identity: dict[str, Any], res: Any, dense: torch.nn.Module) -> dict:
    """What the report needs from one search: per stage its index, mode, FLOPs kept and removed (and by what,
    where the engine logs ``removed_by``), cost; per snapshot the stage it was taken after and the per-layer
    fractions of heads and neurons kept and the token keep ratio (1 where no site) of its recipe."""
    specs = {spec.name: spec for spec in comp_vlm.get_adapter(dense).tower_specs()}
    layers = {str(ratio): {tower: [{"heads": len(lay.kept("head")) / specs[tower].num_heads,
                                    "neurons": len(lay.kept("neuron")) / specs[tower].neurons,
                                    "keep": 1.0 if lay.keep_ratio is None else lay.keep_ratio}
                                   for lay in tower_layers] for tower, tower_layers in recipe.towers.items()}
              for ratio, (_, recipe) in res.snapshots.items()}
    log = res.stage_log
    return {"strategy": identity["strategy"], "seed": identity["seed"],
            "stage": [r.get("stage", i) for i, r in enumerate(log)], "modes": [r["mode"] for r in log],
            "chosen": [r["chosen"] for r in log], "flops_kept": [r["flops_kept"] for r in log],
            "flops_removed_step": [r.get("flops_removed_step") for r in log],
            "removed_by": [r.get("removed_by") for r in log],
            "cost": [r["cost"] for r in log], "cost_se": [r["cost_se"] for r in log],
            "b_after": [r["b_after"] for r in log], "val_metric": [r["metric"] for r in log],
            "snapshot_stage": {str(ratio): recipe.extra.get("stage") for ratio, (_, recipe) in res.snapshots.items()},
            "layers": layers, **identity}


def strategy_floors(bench: Bench, dense: torch.nn.Module, arms: list[str], base: Any) -> dict[str, float]:
    """FLOPs fraction each arm keeps at its floors (all floors hit / one token per site)."""
    floors = {}
    length = comp_vlm.training.training_text_length(bench.train_order(0))  # the reference prune() uses
    for arm in arms:
        config = dataclasses.replace(arm_config(base, arm, 0), ratio=0.01, snapshots=(),
                                     reference={"text_length": length})
        try:
            floors[arm] = comp_vlm.Pruner(copy.deepcopy(dense), bench.task, bench.data.val[:1], config).floor_flops()
        except comp_vlm.ConfigError:  # no usable mode on this model (e.g. no token site): it can remove nothing
            floors[arm] = 1.0
    return floors


def ratio_record(identity: dict[str, Any], config: Any, ratio: float, dense_metric: float, reached: bool,
                 metric: float, flops_kept: float, steps: int, search_steps: int, wall: float, **extra: Any) -> dict:
    """One record of a run at one ratio (``steps``: the training steps of that snapshot; 0 when not reached)."""
    return {"strategy": identity["strategy"], "ratio": ratio, "seed": config.seed, "metric_name": "r1_mean",
            "metric": metric, "dense_metric": dense_metric, "flops_kept": flops_kept, "reached": reached,
            "steps": steps if reached else 0, "search_steps": search_steps, **extra, "wall_s": wall, **identity}


def run_arm(bench: Bench, dense: torch.nn.Module, dense_metric: float, config: Any, identity: dict[str, Any],
            ratios: list[float]) -> tuple[list[dict], dict | None]:
    """One search of an arm (``config``) through every ratio: a record per ratio and the stage record."""
    t0 = time.perf_counter()
    try:
        res = comp_vlm.prune(copy.deepcopy(dense), bench.task, bench.train_order(config.seed), bench.data.val, config,
                             test_data=bench.data.test)
    except comp_vlm.ConfigError as exc:  # every ratio below the strategy's floor
        print(f"{identity['arm']} seed {config.seed}: {exc}")
        res = None
    wall = time.perf_counter() - t0
    search = len(res.stage_log) * config.stage_steps if res is not None else 0
    records = []
    for ratio in ratios:
        reached = res is not None and ratio in res.snapshots
        extra = res.snapshots[ratio][1].extra if reached else {}
        snap_search = extra.get("stage", 0) * config.stage_steps
        records.append(ratio_record(
            identity, config, ratio, dense_metric, reached,
            res.metrics[ratio]["r1_mean"] if reached else float("nan"),
            res.snapshots[ratio][1].flops_kept if reached else float("nan"),
            # steps that trained this snapshot: the search up to it plus its own fine-tuning
            snap_search + extra.get("finetune_steps", config.finetune_steps), search, wall))
    return records, (stage_record(identity, res, dense) if res is not None else None)


def run_downsample(bench: Bench, dense: torch.nn.Module, dense_metric: float, config: Any, identity: dict[str, Any],
                   ratios: list[float]) -> tuple[list[dict], dict | None]:
    """The ``downsample`` arm (benchmarks/downsample.py): resolution for sjp's token share, fine-tuning at it, then
    param-only to the rest; ratios, FLOPs and steps against the full-resolution dense model."""
    t0 = time.perf_counter()
    text_length = comp_vlm.training.training_text_length(bench.train_order(config.seed))
    plan = downsample.plan(dense, ratios, config, text_length)
    print(downsample.downsample_steps_note(plan), flush=True)
    comp_vlm.training.seed_everything(config.seed)
    model = downsample.at_resolution(dense, plan.image_size)
    train = downsample.ResizedBatches(bench.train_order(config.seed), plan.image_size)
    val = [downsample.resize_pixels(b, plan.image_size) for b in bench.data.val]
    test = [downsample.resize_pixels(b, plan.image_size) for b in bench.data.test]
    if plan.adapt_steps:
        comp_vlm.training.train_steps(model, bench.task, comp_vlm.training.cycle_batches(train), plan.adapt_steps,
                                      config, None, desc=f"{plan.image_size} px")
    model.eval()
    low = {r: v for r, v in plan.ratios.items() if v > 0}
    res = comp_vlm.prune(model, bench.task, train, val, downsample.param_config(config, plan), test_data=test) \
        if low else None
    resolution_only = bench.task.evaluate(model, test)["r1_mean"] if len(low) < len(ratios) else None
    wall = time.perf_counter() - t0
    records = []
    for ratio in ratios:
        v = plan.ratios[ratio]
        if v <= 0:
            reached, metric, kept, steps = True, resolution_only, plan.kept_low, plan.adapt_steps
        else:
            reached = res is not None and v in res.snapshots
            extra = res.snapshots[v][1].extra if reached else {}
            metric = res.metrics[v]["r1_mean"] if reached else float("nan")
            kept = res.snapshots[v][1].flops_kept * plan.kept_low if reached else float("nan")
            steps = plan.adapt_steps + extra.get("stage", 0) * config.stage_steps + extra.get("finetune_steps", 0)
        records.append(ratio_record(
            identity, config, ratio, dense_metric, reached, metric, kept, steps,
            plan.adapt_steps + (len(res.stage_log) * config.stage_steps if res else 0), wall,
            downsample={"image_size": plan.image_size, "kept_low": plan.kept_low, "adapt_steps": plan.adapt_steps}))
    return records, (stage_record(identity, res, dense) if res is not None else None)


SPECIAL["downsample"] = run_downsample


def control_search_steps(records: list[dict], suite: str, finetune_steps: int) -> int | None:
    """Median over the suite's comp runs of their search steps (None before any comp run)."""
    steps = {r["seed"]: r.get("search_steps", r["steps"] - finetune_steps) for r in records
             if suite_of(r) == suite and label_of(r) == "comp" and r["steps"]}
    return int(statistics.median(steps.values())) if steps else None


def run_dense_control(bench: Bench, dense: torch.nn.Module, dense_metric: float, config: Any,
                      identity: dict[str, Any], search_steps: int) -> dict:
    """The dense model trained as a comp run of the suite trains (``config``, ``search_steps`` search steps, then
    the fine-tuning), same data order: how much of a pruned arm's number the training alone could explain. Uses
    :func:`comp_vlm.training.train_dense_control` (same optimizer, lr schedule and distillation as the search)."""
    t0 = time.perf_counter()
    comp_vlm.training.seed_everything(config.seed)
    model = copy.deepcopy(dense)
    comp_vlm.training.train_dense_control(model, bench.task, bench.train_order(config.seed), config, search_steps)
    metric = bench.task.evaluate(model, bench.data.test)["r1_mean"]
    return {"strategy": CONTROL, "ratio": 0.0, "seed": config.seed, "metric_name": "r1_mean", "metric": metric,
            "dense_metric": dense_metric, "flops_kept": 1.0, "reached": True,
            "steps": search_steps + config.finetune_steps, "search_steps": search_steps,
            "wall_s": time.perf_counter() - t0, **identity}


def make_invocation(bench: Bench, ratios: list[float], set_items: list[str], device: str = "cpu") -> Invocation:
    """Parse ``--set``, build the base config and read the commit; ``device`` ("cpu" or "cuda") is recorded with the
    GPU's name. ValueError / ConfigError (one line) on bad input."""
    values = parse_overrides(set_items)
    base = base_config(bench.settings, ratios, values)
    root = Path(comp_vlm.__file__).resolve().parents[1]
    if Path(__file__).resolve().parents[1] != root:
        print(f"note: comp_vlm is imported from {root}, not this checkout; recording that repository's commit")
    commit, dirty = git_state(root)
    overrides = dict(item.split("=", 1) for item in set_items)
    return Invocation(bench_identity(bench), base, {k.strip(): v for k, v in overrides.items()}, commit, dirty,
                      getattr(comp_vlm.PruneConfig(), "selection", None),
                      device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(MAIN),
                        help=f"arms: engine strategies, {', '.join(ARMS)}")
    parser.add_argument("--ratios", default="0.5,0.7,0.8,0.85")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--control-seeds", default="0,1,2",
                        help="seeds of the 'dense + the same training steps' control ('' for none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a PruneConfig field for every arm of this run (repeatable; enters the suite key)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, data and steps; results to /tmp")
    parser.add_argument("--report", action="store_true", help="only render the report from recorded runs")
    parser.add_argument("--floors", action="store_true", help="only print every strategy's FLOPs floor")
    parser.add_argument("--stage-steps", type=int, default=None, help="override the stage length K")
    parser.add_argument("--tag", default="", help="record into quality-TAG.* (e.g. a K=50 investigation)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the searches run (recorded with every run; CPU numbers are the reference)")
    parser.add_argument("--world", choices=("synthetic", "emoji"), default="synthetic",
                        help="synthetic: the built-in benchmark world; emoji: a written emoji world (make emoji-world) "
                             "with the model of its calibration (benchmarks/emoji_world_checks.py); records go to "
                             "quality-emoji.* unless --tag says otherwise")
    parser.add_argument("--emoji-dir", default="data/emoji-world", help="the emoji world's folder")
    parser.add_argument("--attempt", default=None,
                        help="the calibration attempt whose model the emoji world uses (default: the first passed)")
    args = parser.parse_args(argv)
    if args.world == "emoji" and not args.tag:
        args.tag = "emoji"
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("quality.py: --device cuda was given but torch sees no GPU")
    out = Path(args.out or ("/tmp/comp_quality_smoke" if args.smoke else "benchmarks/results"))
    stem = f"quality-{args.tag}" if args.tag else "quality"
    results, stages_path = out / f"{stem}.json", out / f"{stem}_stages.jsonl"
    claims = out / f"{stem}.claims"
    if args.report:
        report(load_records(results), load_stages(stages_path), out, stem)
        print(f"wrote {out / (stem + '.md')}" if results.is_file() else f"no records in {results}")
        return 0
    overrides = {"stage_steps": args.stage_steps} if args.stage_steps else {}
    try:
        bench = (emoji_bench.make_emoji_bench(Path(args.emoji_dir), args.attempt, args.smoke, **overrides)
                 if args.world == "emoji" else make_bench(args.smoke, **overrides))
    except emoji_bench.CalibrationMissing as exc:
        raise SystemExit(f"quality.py: {exc}") from None
    ratios = [float(r) for r in args.ratios.split(",")]
    strategies = args.strategies.split(",")
    progress = not args.smoke
    try:
        inv = make_invocation(bench, ratios, args.set, args.device)
        for arm in dict.fromkeys(strategies + list(MAIN)):  # every arm's options exist and validate
            arm_config(inv.base, arm, 0)
    except (ValueError, comp_vlm.ConfigError) as exc:
        raise SystemExit(f"quality.py: {exc}") from None
    print(f"suite {inv.suite} (commit {(inv.commit or 'unknown')[:10]}{', uncommitted changes' if inv.dirty else ''}"
          f"; --set {' '.join(args.set) or 'none'})")
    dense, dense_metrics = bench.dense(progress=progress)
    dense = dense.to(args.device)
    print(f"dense {bench.settings.name}: r1_mean {dense_metrics['r1_mean']:.2f} on {bench.settings.n_test} test pairs "
          f"(galleries of {bench.settings.gallery_size})")
    floors = strategy_floors(bench, dense, list(dict.fromkeys(strategies + list(MAIN))), inv.base)
    print("FLOPs floors (fraction of dense FLOPs kept at every floor): "
          + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()))
    update_json(out / f"{stem}_floors.json", lambda recorded: merge_floors(recorded, inv.suite, floors), {})
    if args.floors:
        return 0
    for seed in [int(x) for x in args.seeds.split(",")]:
        for arm in strategies:
            config = arm_config(inv.base, arm, seed, progress)
            identity = inv.run_identity(arm, config)
            key = (inv.suite, identity["arm"], seed)
            if key in done_runs(load_records(results)):  # also other processes' runs
                continue
            with claimed(claims, *key) as mine:
                if not mine or key in done_runs(load_records(results)):  # running, or finished meanwhile
                    continue
                runner = SPECIAL.get(arm, run_arm)
                records, stage = runner(bench, dense, dense_metrics["r1_mean"], config, identity, ratios)
                append_records(results, records)
                if stage is not None:
                    append_line(stages_path, stage)
            print(f"{identity['arm']} seed {seed}: " + ", ".join(f"{r['ratio']}: {r['metric']:.2f}" for r in records)
                  + f"  ({records[0]['wall_s']:.0f} s)", flush=True)
    for seed in [int(x) for x in args.control_seeds.split(",") if x.strip()]:
        config = arm_config(inv.base, "comp", seed, progress)
        identity = inv.run_identity(CONTROL, config)
        recorded = load_records(results)
        steps = control_search_steps(recorded, inv.suite, config.finetune_steps)
        key = (inv.suite, identity["arm"], seed)
        if steps is None or key in done_runs(recorded):
            continue
        with claimed(claims, *key) as mine:
            if mine and key not in done_runs(load_records(results)):
                append_records(results, [run_dense_control(bench, dense, dense_metrics["r1_mean"], config, identity,
                                                           steps)])
    report(load_records(results), load_stages(stages_path), out, stem)
    print(f"wrote {results} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
