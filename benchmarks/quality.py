"""Quality suite: CoMP vs single-mode and naive joint pruning on the offline benchmark world, paired seeds.

One search per (strategy, seed) passes through every requested ratio (snapshots), each snapshot fine-tuned and
evaluated; every finished run appends its records to ``benchmarks/results/quality.json`` (a list of flat records)
and its stage log to ``quality_stages.jsonl``; a restart skips finished (strategy, seed) runs, so the suite can
run in the background across sessions. ``--report`` renders the markdown table (means, mean paired differences
vs comp with 95% CIs) and the PNG plots from whatever is recorded.

    python benchmarks/quality.py --smoke                 # minutes: tiny everything, writes to /tmp
    python benchmarks/quality.py                         # the suite (hours on 2 CPU cores)
    python benchmarks/quality.py --report                # tables + plots from the recorded runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import comp_vlm
import comp_vlm.engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_world import Bench, make_bench

MAIN = ("comp", "param-only", "token-only", "sjp", "cycle", "random-mode")
ABLATIONS = ("greedy", "no-cip", "uniform-rms", "no-cit", "no-re", "no-hi")
# arms that are a strategy run with other engine options (recorded under the arm's name in the "strategy" field)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "comp-immediate": ("comp", {"cost_measure": "immediate"}),  # MPS cost = damage before any recovery training
    "comp-metric": ("comp", {"badness": "metric"}),  # B = -validation R@1 (the paper's choice) instead of val loss
}


def arm_strategy(arm: str) -> tuple[str, dict[str, Any]]:
    """The engine strategy and extra PruneConfig options of an arm name."""
    return VARIANTS.get(arm, (arm, {}))


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def load_stages(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def update_json(path: Path, change: Callable[[Any], Any], empty: Any) -> None:
    """Read ``path`` (``empty`` if absent), apply ``change``, write it back through a temp file and rename, under an
    exclusive lock: a crash never leaves a truncated results file, and suite processes running side by side (e.g.
    one per core) never lose each other's updates."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        value = change(json.loads(path.read_text()) if path.is_file() else empty)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=1)
        os.replace(tmp, path)


def append_records(path: Path, new: list[dict]) -> None:
    update_json(path, lambda records: records + new, [])


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (nan for fewer than 2 values)."""
    from scipy.stats import t as student_t  # optional dependency, only for the report

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


SINGLE_MODE = ("param-only", "token-only")
NAIVE_JOINT = ("sjp", "cycle", "random-mode")


def order_key(strategy: str) -> tuple[int, str]:
    known = ("dense+ft",) + MAIN + ABLATIONS + tuple(VARIANTS)
    return (known.index(strategy) if strategy in known else len(known), strategy)


def paired(records: list[dict], ratio: float, a: str, b: str) -> list[float]:
    """Per-seed differences a - b at ``ratio`` over the seeds where both arms reached it."""
    keyed = {(r["strategy"], r["seed"]): r for r in records if r["ratio"] == ratio and r["reached"]}
    return [keyed[(a, seed)]["metric"] - keyed[(b, seed)]["metric"]
            for (s, seed) in sorted(keyed) if s == b and (a, seed) in keyed]


def arm_mean(records: list[dict], ratio: float, strategy: str) -> float:
    rows = [r["metric"] for r in records if r["strategy"] == strategy and r["ratio"] == ratio and r["reached"]]
    return statistics.fmean(rows) if rows else -math.inf


def headline(records: list[dict], ratio: float, arm: str = "comp") -> list[str]:
    """``arm`` (CoMP) vs the best single-mode arm and vs the best naive joint arm (best = highest mean at ``ratio``)."""
    lines = []
    for label, group in (("best single-mode arm", SINGLE_MODE), ("best naive joint arm", NAIVE_JOINT)):
        present = [g for g in group if arm_mean(records, ratio, g) > -math.inf]
        if not present or arm_mean(records, ratio, arm) == -math.inf:
            continue
        best = max(present, key=lambda g: arm_mean(records, ratio, g))
        diffs = paired(records, ratio, arm, best)
        if len(diffs) < 2:
            continue
        m, h = mean_ci(diffs)
        verdict = "CI excludes 0" if m - h > 0 or m + h < 0 else "CI includes 0"
        lines.append(f"- at {ratio}: {arm} − {label} ({best}) = **{m:+.2f} ± {h:.2f}** R@1 points "
                     f"(n = {len(diffs)} paired seeds; {verdict})")
    return lines


def report(records: list[dict], stages: list[dict], out: Path, stem: str) -> None:
    if not records:
        return
    strategies = sorted({r["strategy"] for r in records}, key=order_key)
    ratios = sorted({r["ratio"] for r in records if r["strategy"] != "dense+ft"})
    dense = statistics.fmean(r["dense_metric"] for r in records)
    model = records[0]["model"]
    lines = ["# Quality: retrieval R@1 (mean of image→text and text→image, fixed-size galleries) after pruning",
             "", f"Model `{model}`, {len(records)} records. Dense R@1: {dense:.2f}.",
             "Mean over seeds of the arms that reached the ratio; Δ = mean paired difference comp − arm (same dense "
             "model, same data order per seed) ± 95% t-interval half-width; n = paired seeds.", ""]
    control = [r for r in records if r["strategy"] == "dense+ft"]
    if control:
        m, h = mean_ci([r["metric"] for r in control])
        lines += [f"Control, dense + the same training steps as a comp run ({control[0]['steps']} steps): "
                  f"{m:.2f} ± {h:.2f} (n = {len(control)}).", ""]
    lines += ["## Headline", ""]
    for ratio in ratios:
        lines += headline(records, ratio)
    variants = [v for v in VARIANTS if v in strategies]
    if variants:
        lines += ["", "Variants of comp (same seeds; Δ in the table below is comp − variant):", ""]
        for ratio in ratios:
            for v in variants:
                lines += headline(records, ratio, v)
    lines += ["", "## All arms", "", "| ratio | strategy | mean ± 95% CI | FLOPs kept | Δ comp − arm | n | reached |",
              "|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        for s in strategies:
            if s == "dense+ft":
                continue
            all_rows = [r for r in records if r["strategy"] == s and r["ratio"] == ratio]
            rows = [r for r in all_rows if r["reached"]]
            if not all_rows:
                continue
            if not rows:
                lines.append(f"| {ratio} | {s} | not reached | | | | 0/{len(all_rows)} |")
                continue
            m, h = mean_ci([r["metric"] for r in rows])
            kept = statistics.fmean(r["flops_kept"] for r in rows)
            diffs = paired(records, ratio, "comp", s) if s != "comp" else []
            delta = ""
            if len(diffs) >= 2:
                dm, dh = mean_ci(diffs)
                delta = f"{dm:+.2f} ± {dh:.2f}"
            lines.append(f"| {ratio} | {s} | {m:.2f} ± {h:.2f} | {kept:.3f} | {delta} | {len(diffs) or len(rows)} "
                         f"| {len(rows)}/{len(all_rows)} |")
    lines += structure_section(stages) + cost_section(stages)
    for arm in ("comp",) + tuple(VARIANTS):
        runs = [st for st in stages if st["strategy"] == arm]
        if not runs:
            continue
        counts: dict[str, int] = {}
        for st in runs:
            for mode in st["modes"]:
                counts[mode] = counts.get(mode, 0) + 1
        total = sum(counts.values())
        lines += ["", f"## MPS ({arm}): stages per mode over all seeds", "",
                  ", ".join(f"{m}: {c} ({100 * c / total:.0f}%)" for m, c in sorted(counts.items()))]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(records, stages, strategies, ratios, out / f"{stem}.png")


def structure_section(stages: list[dict], ratio: str = "0.8") -> list[str]:
    """How each arm spent its FLOPs at ``ratio``: mean kept fraction of heads and neurons, and the fraction of
    tokens that survive to the last layer (product of the site keep ratios), per tower."""
    by_strategy: dict[str, list[dict]] = {}
    for st in stages:
        if ratio in st.get("layers", {}):
            by_strategy.setdefault(st["strategy"], []).append(st["layers"][ratio])
    if not by_strategy:
        return []
    lines = ["", f"## Structure at {ratio} (mean over seeds)", "",
             "| strategy | tower | heads kept | neurons kept | tokens reaching the last layer |", "|---|---|---|---|---|"]
    for strategy in sorted(by_strategy, key=order_key):
        runs = by_strategy[strategy]
        for tower in runs[0]:
            heads = statistics.fmean(statistics.fmean(lay["heads"] for lay in run[tower]) for run in runs)
            neurons = statistics.fmean(statistics.fmean(lay["neurons"] for lay in run[tower]) for run in runs)
            tokens = statistics.fmean(math.prod(lay["keep"] for lay in run[tower]) for run in runs)
            lines.append(f"| {strategy} | {tower} | {heads:.2f} | {neurons:.2f} | {tokens:.2f} |")
    return lines


def cost_section(stages: list[dict]) -> list[str]:
    """The MPS cost signal: how often a stage's measured cost (validation loss gained per FLOP removed) is
    negative, i.e. the loss fell while pruning -- recovery from earlier stages outweighing this stage's damage."""
    lines = ["", "## MPS cost signal", "",
             "| strategy | stages | negative cost | median cost | median abs(cost) | median bootstrap SE |",
             "|---|---|---|---|---|---|"]
    rows = 0
    for strategy in sorted({st["strategy"] for st in stages}, key=order_key):
        costs = [c for st in stages if st["strategy"] == strategy for c in st.get("cost", []) if c is not None]
        if not costs:
            continue
        rows += 1
        negative = sum(c < 0 for c in costs) / len(costs)
        ses = [x for st in stages if st["strategy"] == strategy for x in st.get("cost_se", []) if x is not None]
        se = f"{statistics.median(ses):.2f}" if ses else "not recorded"
        lines.append(f"| {strategy} | {len(costs)} | {100 * negative:.0f}% | {statistics.median(costs):.2f} | "
                     f"{statistics.median(abs(c) for c in costs):.2f} | {se} |")
    return (lines + mode_gap_section(stages)) if rows else []


def mode_gap_section(stages: list[dict],
                     arms: tuple[str, ...] = ("comp", "cycle", "random-mode", *VARIANTS)) -> list[str]:
    """Cost per mode: whether the modes differ by more than a mode's own stage-to-stage spread (a gap MPS can
    exploit) or not (then the choice is mostly noise). cycle and random-mode sample every mode regardless of cost."""
    lines = ["", "Measured cost per mode (all stages of all seeds): median and interquartile range.", "",
             "| arm | mode | stages | median cost | IQR |", "|---|---|---|---|---|"]
    rows = 0
    for arm in arms:
        by_mode: dict[str, list[float]] = {}
        for st in stages:
            if st["strategy"] == arm:
                for mode, cost in zip(st["modes"], st.get("cost", [])):
                    if cost is not None:
                        by_mode.setdefault(mode, []).append(cost)
        for mode, costs in sorted(by_mode.items()):
            rows += 1
            q1, _, q3 = statistics.quantiles(costs, n=4) if len(costs) >= 2 else (costs[0], 0, costs[0])
            lines.append(f"| {arm} | {mode} | {len(costs)} | {statistics.median(costs):.2f} | {q1:.2f} to {q3:.2f} |")
    return lines if rows else []


def plot(records: list[dict], stages: list[dict], strategies: list[str], ratios: list[float], path: Path) -> None:
    """Metric vs FLOPs kept per strategy; the MPS mode per stage (comp, all seeds; like the paper's Fig. 6); and
    the per-layer heads / neurons / token keep ratios of comp's 0.8 recipes (mean over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for s in strategies:
        if s == "dense+ft":
            continue
        pts = []
        for ratio in ratios:
            rows = [r for r in records if r["strategy"] == s and r["ratio"] == ratio and r["reached"]]
            if rows:
                pts.append((statistics.fmean(r["flops_kept"] for r in rows), statistics.fmean(r["metric"] for r in rows)))
        if pts:
            axes[0].plot(*zip(*sorted(pts)), marker="o", label=s, lw=2.5 if s == "comp" else 1.2)
    axes[0].axhline(statistics.fmean(r["dense_metric"] for r in records), color="k", ls="--", lw=0.8, label="dense")
    axes[0].set_xlabel("FLOPs kept")
    axes[0].set_ylabel("R@1 (mean of both directions)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("accuracy vs FLOPs")
    comp_runs = [st for st in stages if st["strategy"] == "comp"]
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


def stage_record(strategy: str, seed: int, res: Any, dense: torch.nn.Module) -> dict:
    """What the plots need from one search: the mode and FLOPs kept per stage, and the per-layer fractions of
    heads and neurons kept and the token keep ratio (1 where no site) of every snapshot's recipe."""
    specs = {spec.name: spec for spec in comp_vlm.get_adapter(dense).tower_specs()}
    layers = {str(ratio): {tower: [{"heads": len(lay.heads) / specs[tower].num_heads,
                                    "neurons": len(lay.neurons) / specs[tower].neurons,
                                    "keep": 1.0 if lay.keep_ratio is None else lay.keep_ratio}
                                   for lay in tower_layers] for tower, tower_layers in recipe.towers.items()}
              for ratio, (_, recipe) in res.snapshots.items()}
    return {"strategy": strategy, "seed": seed, "modes": [r["mode"] for r in res.stage_log],
            "chosen": [r["chosen"] for r in res.stage_log], "flops_kept": [r["flops_kept"] for r in res.stage_log],
            "cost": [r["cost"] for r in res.stage_log], "cost_se": [r["cost_se"] for r in res.stage_log],
            "b_after": [r["b_after"] for r in res.stage_log], "val_metric": [r["metric"] for r in res.stage_log],
            "layers": layers}


def strategy_floors(bench: Bench, dense: torch.nn.Module, strategies: list[str]) -> dict[str, float]:
    """FLOPs fraction each strategy keeps at its floors (all floors hit / one token per site)."""
    floors = {}
    length = comp_vlm.engine.training_text_length(bench.train_order(0))  # the reference prune() uses
    for arm in strategies:
        config = comp_vlm.PruneConfig(ratio=0.01, strategy=arm_strategy(arm)[0], progress=False,
                                      reference={"text_length": length})
        floors[arm] = comp_vlm.Pruner(copy.deepcopy(dense), bench.task, bench.data.val[:1], config).floor_flops()
    return floors


def run_arm(bench: Bench, dense: torch.nn.Module, dense_metric: float, strategy: str, seed: int,
            ratios: list[float], progress: bool) -> tuple[list[dict], dict | None]:
    s = bench.settings
    t0 = time.perf_counter()
    engine_strategy, options = arm_strategy(strategy)
    config = comp_vlm.PruneConfig(
        ratio=max(ratios), snapshots=tuple(ratios), strategy=engine_strategy, seed=seed, stage_steps=s.stage_steps,
        flops_step=s.flops_step, finetune_steps=s.finetune_steps, calibration_batches=s.calibration_batches,
        lr=s.prune_lr, progress=progress, **options)
    try:
        res = comp_vlm.prune(copy.deepcopy(dense), bench.task, bench.train_order(seed), bench.data.val, config,
                             test_data=bench.data.test)
    except comp_vlm.ConfigError as exc:  # every ratio below the strategy's floor
        print(f"{strategy} seed {seed}: {exc}")
        res = None
    wall = time.perf_counter() - t0
    steps = (len(res.stage_log) * s.stage_steps + s.finetune_steps) if res is not None else 0
    records = []
    for ratio in ratios:
        reached = res is not None and ratio in res.snapshots
        records.append({
            "task": "retrieval", "model": s.name, "strategy": strategy, "ratio": ratio, "seed": seed,
            "metric_name": "r1_mean", "metric": res.metrics[ratio]["r1_mean"] if reached else float("nan"),
            "dense_metric": dense_metric,
            "flops_kept": res.snapshots[ratio][1].flops_kept if reached else float("nan"),
            "reached": reached, "steps": steps, "wall_s": wall})
    return records, (stage_record(strategy, seed, res, dense) if res is not None else None)


def run_dense_control(bench: Bench, dense: torch.nn.Module, dense_metric: float, seed: int, steps: int) -> dict:
    """The dense model fine-tuned as long as a pruning run trains (search stages + fine-tuning), same lr and data
    order: shows how much of a pruned arm's number the extra training alone could explain."""
    s = bench.settings
    t0 = time.perf_counter()
    comp_vlm.engine.seed_everything(seed)
    model = copy.deepcopy(dense)
    config = comp_vlm.PruneConfig(lr=s.prune_lr, progress=False)
    comp_vlm.engine.train_steps(model, bench.task, comp_vlm.engine.cycle_batches(bench.train_order(seed)), steps,
                                config)
    metric = bench.task.evaluate(model, bench.data.test)["r1_mean"]
    return {"task": "retrieval", "model": s.name, "strategy": "dense+ft", "ratio": 0.0, "seed": seed,
            "metric_name": "r1_mean", "metric": metric, "dense_metric": dense_metric, "flops_kept": 1.0,
            "reached": True, "steps": steps, "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(MAIN))
    parser.add_argument("--ratios", default="0.5,0.7,0.8,0.85")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--control-seeds", default="0,1,2",
                        help="seeds of the 'dense + the same training steps' control ('' for none)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, data and steps; results to /tmp")
    parser.add_argument("--report", action="store_true", help="only render the report from recorded runs")
    parser.add_argument("--floors", action="store_true", help="only print every strategy's FLOPs floor")
    parser.add_argument("--stage-steps", type=int, default=None, help="override the stage length K")
    parser.add_argument("--tag", default="", help="record into quality-TAG.* (e.g. a K=50 investigation)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("/tmp/comp_quality_smoke" if args.smoke else "benchmarks/results"))
    stem = f"quality-{args.tag}" if args.tag else "quality"
    results, stages_path = out / f"{stem}.json", out / f"{stem}_stages.jsonl"
    if args.report:
        report(load_records(results), load_stages(stages_path), out, stem)
        print(f"wrote {out / (stem + '.md')}")
        return 0
    bench = make_bench(args.smoke, **({"stage_steps": args.stage_steps} if args.stage_steps else {}))
    dense, dense_metrics = bench.dense(progress=not args.smoke)
    print(f"dense {bench.settings.name}: r1_mean {dense_metrics['r1_mean']:.2f} on {bench.settings.n_test} test pairs "
          f"(galleries of {bench.settings.gallery_size})")
    ratios = [float(r) for r in args.ratios.split(",")]
    strategies = args.strategies.split(",")
    floors = strategy_floors(bench, dense, list(dict.fromkeys(strategies + list(MAIN))))
    print("FLOPs floors (fraction of dense FLOPs kept at every floor): "
          + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()))
    out.mkdir(parents=True, exist_ok=True)
    update_json(out / f"{stem}_floors.json", lambda recorded: recorded | floors, {})  # keeps other runs' arms
    if args.floors:
        return 0
    done = {(r["strategy"], r["seed"]) for r in load_records(results)}
    for seed in [int(x) for x in args.seeds.split(",")]:
        for strategy in strategies:
            if (strategy, seed) in done:
                continue
            records, stage = run_arm(bench, dense, dense_metrics["r1_mean"], strategy, seed, ratios,
                                     progress=not args.smoke)
            append_records(results, records)
            if stage is not None:
                with stages_path.open("a") as fh:  # one short line per append: safe side by side
                    fh.write(json.dumps(stage) + "\n")
            print(f"{strategy} seed {seed}: " + ", ".join(f"{r['ratio']}: {r['metric']:.2f}" for r in records)
                  + f"  ({records[0]['wall_s']:.0f} s)", flush=True)
    control_seeds = [int(x) for x in args.control_seeds.split(",") if x.strip()]
    comp_steps = [r["steps"] for r in load_records(results) if r["strategy"] == "comp" and r["steps"]]
    for seed in control_seeds:
        if ("dense+ft", seed) in done or not comp_steps:
            continue
        steps = int(statistics.median(comp_steps))
        append_records(results, [run_dense_control(bench, dense, dense_metrics["r1_mean"], seed, steps)])
    report(load_records(results), load_stages(stages_path), out, stem)
    print(f"wrote {results} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
