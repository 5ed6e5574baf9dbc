"""Time overhead of the ``probe`` cost measure (method.md §3, beyond the paper; issue 11 item 3).

Under ``cost_measure="probe"`` every stage start measures the immediate cost of every live mode on the same weights
(one plan, one mask and one validation pass per mode) before MPS chooses. The search logs, per stage, the seconds
of that probe (``probe_s``) apart from the stage itself (``wall_s``: its training steps, masks and cost
measurement). This script runs short comp searches with the probe on the benchmark world and reports probe time
over stage time. Both come from the same process, a stage apart, so a busy machine scales both alike (comparing
separate runs was dominated by load changes on a shared 2-core machine).

    python benchmarks/probe_overhead.py                      # 2 seeds, to 0.2: results/probe_overhead.*
    python benchmarks/probe_overhead.py --smoke              # seconds, tiny model, to /tmp
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_world import make_bench
from quality_suite.provenance import versions

import comp_vlm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--ratio", type=float, default=0.2, help="search to this ratio (stages = ratio / step)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path("/tmp/probe_overhead_smoke" if args.smoke else "benchmarks/results")
    bench = make_bench(args.smoke)
    dense, _ = bench.dense(progress=not args.smoke)
    s = bench.settings
    runs = []
    for seed in (int(x) for x in args.seeds.split(",")):
        config = comp_vlm.PruneConfig(ratio=args.ratio, snapshots=(), stage_steps=s.stage_steps,
                                      flops_step=s.flops_step, finetune_steps=0, calibration_batches=s.calibration_batches,
                                      lr=s.prune_lr, finetune_budget="fixed", cost_measure="probe", seed=seed,
                                      progress=False)
        res = comp_vlm.prune(copy.deepcopy(dense), bench.task, bench.train_order(seed), bench.data.val, config)
        stages = [{"stage": r["stage"], "mode": r["mode"], "probe_s": r["probe_s"], "wall_s": r["wall_s"],
                   "probed": len(r.get("observed") or {})} for r in res.stage_log]
        runs.append({"seed": seed, "stages": stages})
        for r in stages:
            print(f"seed {seed} stage {r['stage']} {r['mode']}: probe {r['probe_s']:.1f} s, stage {r['wall_s']:.1f} s")
    overheads = [r["probe_s"] / r["wall_s"] for run in runs for r in run["stages"]]
    summary = {"command": "python benchmarks/probe_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "bench": s.name, "versions": versions(), "stage_steps": s.stage_steps, "ratio": args.ratio, "threads": args.threads,
               "load_average": list(os.getloadavg()), "runs": runs, "probe_over_stage": overheads,
               "mean": statistics.mean(overheads), "date": time.strftime("%Y-%m-%d %H:%M")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_overhead.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = (f"Command: `{summary['command']}` ({summary['date']}, {s.name}, K = {s.stage_steps}, {args.threads} "
              f"thread(s), load average at the end {summary['load_average'][0]:.1f})")
    lines = ["# Probe cost measure: time overhead", "", header, "",
             "| seed | stage | mode | probe s | stage s | probe / stage |", "|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["stages"]:
            lines.append(f"| {run['seed']} | {r['stage']} | {r['mode']} | {r['probe_s']:.1f} | {r['wall_s']:.1f} | "
                         f"{r['probe_s'] / r['wall_s']:.2f} |")
    mean = (f"Mean: the probe adds {100 * summary['mean']:.0f}% to a search stage's time (K = {s.stage_steps} "
            "training steps per stage; fine-tuning, evaluation and the rest of a run are not affected).")
    lines += ["", mean]
    (out / "probe_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
