"""Time overhead of the ``probe`` cost measure (method.md §3, beyond the paper; issue 11 item 3).

Under ``cost_measure="probe"`` every stage start measures the immediate cost of every live mode on the same weights
(one plan, one mask and one validation pass per mode) before MPS chooses. This script runs the same short comp
search on the benchmark world with the default measure and with the probe, alternating which goes first, and
compares the mean wall time per search stage (from the stage log). Both runs of a pair share the machine's load.

    python benchmarks/probe_overhead.py                      # 2 pairs, 4 stages each: results/probe_overhead.*
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
from dataclasses import replace
from pathlib import Path

import torch

import comp_vlm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_world import make_bench


def stage_seconds(bench, dense, config) -> list[float]:
    """Wall seconds of each search stage of one short search (no fine-tuning)."""
    res = comp_vlm.prune(copy.deepcopy(dense), bench.task, bench.train_order(config.seed), bench.data.val, config)
    return [s["wall_s"] for s in res.stage_log]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.2, help="search to this ratio (stages = ratio / step)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path("/tmp/probe_overhead_smoke" if args.smoke else "benchmarks/results")
    bench = make_bench(args.smoke)
    dense, _ = bench.dense(progress=not args.smoke)
    s = bench.settings
    base = comp_vlm.PruneConfig(ratio=args.ratio, snapshots=(), stage_steps=s.stage_steps, flops_step=s.flops_step,
                                finetune_steps=0, calibration_batches=s.calibration_batches, lr=s.prune_lr,
                                finetune_budget="fixed", progress=False)
    runs = []
    for pair in range(args.pairs):
        order = ("recovered", "probe") if pair % 2 == 0 else ("probe", "recovered")
        for measure in order:
            config = replace(base, seed=pair, cost_measure=measure)
            t0 = time.perf_counter()
            seconds = stage_seconds(bench, dense, config)
            runs.append({"pair": pair, "cost_measure": measure, "stage_s": seconds,
                         "mean_stage_s": statistics.mean(seconds), "wall_s": time.perf_counter() - t0})
            print(f"pair {pair} {measure}: {len(seconds)} stages, {statistics.mean(seconds):.1f} s per stage")
    ratios = [next(r for r in runs if r["pair"] == p and r["cost_measure"] == "probe")["mean_stage_s"]
              / next(r for r in runs if r["pair"] == p and r["cost_measure"] == "recovered")["mean_stage_s"]
              for p in range(args.pairs)]
    summary = {"command": "python benchmarks/probe_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "bench": s.name, "stage_steps": s.stage_steps, "ratio": args.ratio, "threads": args.threads,
               "load_average": list(os.getloadavg()), "runs": runs,
               "probe_over_default_per_stage": ratios, "mean_ratio": statistics.mean(ratios),
               "date": time.strftime("%Y-%m-%d %H:%M")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_overhead.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = (f"Command: `{summary['command']}` ({summary['date']}, {s.name}, K = {s.stage_steps}, {args.threads} "
              f"thread(s), load average at the end {summary['load_average'][0]:.1f})")
    lines = ["# Probe cost measure: time overhead", "", header, "",
             "| pair | default s/stage | probe s/stage | probe / default |", "|---|---|---|---|"]
    for p, ratio in enumerate(ratios):
        d = next(r for r in runs if r["pair"] == p and r["cost_measure"] == "recovered")["mean_stage_s"]
        q = next(r for r in runs if r["pair"] == p and r["cost_measure"] == "probe")["mean_stage_s"]
        lines.append(f"| {p} | {d:.1f} | {q:.1f} | {ratio:.2f} |")
    lines += ["", f"Mean: the probe costs {summary['mean_ratio']:.2f}x the default per search stage."]
    (out / "probe_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
