"""Reports of the quality suite: the markdown tables per suite, the commands that repeat them, and the plots."""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_world import FULL, SMOKE
from emoji_bench import MODEL_PREFIX

from .arms import (
    ARMS,
    COMP_FAMILY,
    CONTROL,
    FIXES,
    LEGACY,
    VARIANTS,
    base_name,
    is_baseline,
    label_of,
    order_key,
)
from .stats import (
    arm_mean,
    best_rule,
    delta,
    flops_went_where,
    headline,
    labels_of,
    mean_ci,
    paired,
    removed_by_tower,
    verdict,
)
from .store import by_suite


def switches(record: dict, stem: str) -> tuple[str, ...]:
    """The command-line switches that select a record's bench settings and results files."""
    bench = record.get("bench") or {}
    model = record.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    out: tuple[str, ...] = ("--smoke",) if name == SMOKE.name else ()
    default = SMOKE if name == SMOKE.name else FULL
    emoji = str(record.get("world", "")).startswith("emoji-world")
    if emoji:  # the emoji world's bench settings come from its calibration attempt, named in the model
        out += ("--world", "emoji", "--attempt", str(name).removeprefix(MODEL_PREFIX))
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


def runs_by_arm(stages: list[dict], per_run: Callable[[dict], Any]) -> dict[str, list[Any]]:
    """``per_run(stage record)`` of every run, grouped by arm label; runs where it gives None are left out."""
    by_arm: dict[str, list[Any]] = {}
    for st in stages:
        value = per_run(st)
        if value is not None:
            by_arm.setdefault(label_of(st), []).append(value)
    return by_arm


def flops_section(stages: list[dict], h: str, ratio: str = "0.8") -> list[str]:
    """Per arm, the mean over seeds of where the FLOPs removed up to the ``ratio`` snapshot came from."""
    by_arm = runs_by_arm(stages, lambda st: flops_went_where(st, ratio))
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


def tower_section(stages: list[dict], h: str, ratio: str = "0.8") -> list[str]:
    """Per arm, the mean over seeds of the FLOPs removed up to ``ratio`` per ``tower/kind`` part (P_c's
    cross-attention heads, each tower's share), and per tower in all; only runs whose log names the towers."""
    by_arm = runs_by_arm(stages, lambda st: removed_by_tower(st, ratio))
    if not by_arm:
        return []
    parts = sorted({p for runs in by_arm.values() for run in runs for p in run})
    towers = sorted({p.partition("/")[0] for p in parts})
    lines = ["", f"{h} Where each arm's FLOPs went at {ratio}, by tower and kind (mean over seeds)", "",
             (f"Fraction of the dense FLOPs removed up to the {ratio} snapshot per `tower/kind` of the stage log's "
              "`removed_by`, then per tower in all (runs whose log names the towers)."), "",
             "| arm | runs | " + " | ".join([*parts, *(f"{t} (all)" for t in towers)]) + " |",
             "|---|---|" + "---|" * (len(parts) + len(towers))]
    for arm in sorted(by_arm, key=order_key):
        runs = by_arm[arm]
        cells = [statistics.fmean(run.get(p, 0.0) for run in runs) for p in parts]
        cells += [statistics.fmean(sum(v for p, v in run.items() if p.partition("/")[0] == t) for run in runs)
                  for t in towers]
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
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
    lines += repeat(tower_section(stages, h), staged)
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
