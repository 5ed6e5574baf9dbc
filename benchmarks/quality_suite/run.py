"""Running the quality suite: one search per (arm, seed) through every ratio, the downsample arm, the dense
control, and the command line (``python benchmarks/quality.py``)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import downsample
import emoji_bench
import torch
from bench_world import FULL, SMOKE, Bench, make_bench

import comp_vlm
import comp_vlm.training
import quality_suite

from .arms import ARMS, CONTROL, MAIN, arm_config, label_of, suite_of
from .identity import make_invocation
from .report import report
from .store import (
    append_line,
    append_records,
    claimed,
    done_runs,
    load_records,
    load_stages,
    merge_floors,
    update_json,
)

# arms with their own run function instead of one prune() call (filled below, next to each function)
SPECIAL: dict[str, Callable] = {}


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


TASKS = ("retrieval",)  # the registered tasks (comp_vlm.tasks.TASKS) the suite's benches evaluate


def model_attempt(world: str, model: str | None, attempt: str | None, smoke: bool) -> str | None:
    """The calibration attempt ``--model`` names on the emoji world (``emoji-clip-<attempt>``), else ``--attempt``.
    ``--model`` states a model the world already implies: ValueError (one line) for any other. ``--smoke`` runs the
    world's tiny smoke model either way, whose name is then accepted too."""
    if model is None:
        return attempt
    if world == "synthetic":
        names = (FULL.name, SMOKE.name) if smoke else (FULL.name,)
        if model not in names:
            raise ValueError(f"--model {model}: the synthetic world's model is {' or '.join(names)}")
        return attempt
    name = model.removeprefix(emoji_bench.MODEL_PREFIX)
    if name == model:
        raise ValueError(f"--model {model}: the emoji world's models are {emoji_bench.MODEL_PREFIX}<attempt>")
    if attempt not in (None, name):
        raise ValueError(f"--model {model} and --attempt {attempt} name different models")
    if not (smoke and name == emoji_bench.checks.SMOKE_ATTEMPT.name):
        emoji_bench.calibrated_attempt(emoji_bench.CHECKS_RECORD, name)  # CalibrationMissing for an unknown one
    return name


def suite_bench(args: argparse.Namespace) -> Bench:
    """The bench of the arguments' world, model and task; ValueError or CalibrationMissing (one line) for a model
    or task the world does not have."""
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task}: the quality suite runs {', '.join(TASKS)} only")
    attempt = model_attempt(args.world, args.model, args.attempt, args.smoke)
    overrides = {"stage_steps": args.stage_steps} if args.stage_steps else {}
    if args.world == "emoji":
        return emoji_bench.make_emoji_bench(Path(args.emoji_dir), attempt, args.smoke, **overrides)
    return make_bench(args.smoke, **overrides)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python benchmarks/quality.py``."""
    parser = argparse.ArgumentParser(description=quality_suite.__doc__.split("\n\n")[0])
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
    parser.add_argument("--model", default=None,
                        help=f"the model, as records name it: the one the world implies ({FULL.name}; emoji: "
                             f"{emoji_bench.MODEL_PREFIX}<attempt>, the same as --attempt)")
    parser.add_argument("--task", default=TASKS[0], help=f"the task ({', '.join(TASKS)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
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
    try:
        bench = suite_bench(args)
    except (ValueError, emoji_bench.CalibrationMissing) as exc:
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
