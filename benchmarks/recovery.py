"""Does recovery training hurt an unpruned model? (method.md §3 "Recovery must not hurt", REVISED)

The benchmark's dense model is trained once; each setting here trains it further exactly as a pruning run would
(the search's steps at the search learning rate and schedule, with or without distillation from the frozen dense
model, then the fine-tuning a snapshot gets), without pruning anything, and evaluates it on the test split. A
setting under which this control stays within noise of dense is one a pruning library may use. Records are
appended atomically to ``benchmarks/results/recovery.json`` (resumable; keyed by setting and seed) and rendered to
``recovery.md``.

    python benchmarks/recovery.py                    # every setting, seeds 0,1,2
    python benchmarks/recovery.py --settings B,C --seeds 0
    python benchmarks/recovery.py --report
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_world import make_bench
from quality_suite.provenance import versions
from quality_suite.stats import mean_ci
from quality_suite.store import append_records, load_records

import comp_vlm
from comp_vlm.search import budget
from comp_vlm.training import train_dense_control

# setting -> PruneConfig options (on top of the benchmark's stage length, step, fine-tuning steps)
SETTINGS: dict[str, dict] = {
    "A": {"lr": 2e-4, "lr_schedule": "constant", "finetune_schedule": "constant", "distill": 0.0},  # the old one
    "B": {"lr": 2e-4, "lr_schedule": "constant", "finetune_schedule": "cosine", "distill": 0.0},
    "C": {"lr": 2e-4, "lr_schedule": "constant", "finetune_schedule": "cosine", "distill": 1.0},
    "D": {"lr": 1e-4, "lr_schedule": "constant", "finetune_schedule": "cosine", "distill": 0.0},
    "E": {"lr": 5e-5, "lr_schedule": "constant", "finetune_schedule": "cosine", "distill": 0.0},
    "F": {"lr": 5e-5, "lr_schedule": "constant", "finetune_schedule": "cosine", "distill": 1.0},
    "G": {"lr": 1e-4, "lr_schedule": "constant", "finetune_schedule": "cosine", "distill": 1.0},
}
RATIO = 0.85  # the search length of one suite run (every snapshot on the way)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(bench, dense, dense_metric: float, name: str, seed: int) -> dict:
    s = bench.settings
    config = comp_vlm.PruneConfig(ratio=RATIO, seed=seed, stage_steps=s.stage_steps, flops_step=s.flops_step,
                                  finetune_steps=s.finetune_steps, progress=False, **SETTINGS[name])
    search_steps = budget.nominal_search_steps(RATIO, s.flops_step, s.stage_steps)
    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    steps = train_dense_control(model, bench.task, bench.train_order(seed), config, search_steps)
    metric = bench.task.evaluate(model, bench.data.test)["r1_mean"]
    return {"setting": name, "options": SETTINGS[name], "seed": seed, "metric": metric, "dense_metric": dense_metric,
            "steps": steps, "search_steps": search_steps, "wall_s": time.perf_counter() - t0,
            "world": bench.data_id(), "model": s.name, "task": "retrieval", "bench": asdict(s),
            "config": {k: v for k, v in asdict(config).items() if k not in ("log_path", "checkpoint_dir")},
            "commit": git_commit(), "versions": versions()}


def report(records: list[dict], path: Path) -> None:
    if not records:
        return
    dense = records[0]["dense_metric"]
    lines = ["# Recovery training on the unpruned dense model", "",
             ("`python benchmarks/recovery.py` — the benchmark's dense model trained further as a pruning run trains "
             f"({records[0]['search_steps']} search steps + fine-tuning, {records[0]['steps']} steps in all), "
             f"nothing pruned; R@1 (mean of both directions, galleries of 100) on the test split. Dense: {dense:.2f}."),
             "", "| setting | search lr | search schedule | fine-tuning | distill | seeds | R@1 | − dense |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted({r["setting"] for r in records}):
        rows = [r for r in records if r["setting"] == name]
        o = rows[0]["options"]
        m, ci = mean_ci([r["metric"] for r in rows])
        lines.append(f"| {name} | {o['lr']:g} | {o['lr_schedule']} | {o['finetune_schedule']} | {o['distill']:g} | "
                     f"{len(rows)} | {m:.2f} ± {ci:.2f} | {m - dense:+.2f} |")
    lines += ["", "± is the half-width of a 95% t-interval over seeds (nan for one seed)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = out / "recovery.json"
    if not args.report:
        bench = make_bench()
        dense, metrics = bench.dense(progress=False)
        done = {(r["setting"], r["seed"]) for r in load_records(results)}
        for seed in [int(x) for x in args.seeds.split(",")]:
            for name in args.settings.split(","):
                if (name, seed) in done:
                    continue
                record = run(bench, dense, metrics["r1_mean"], name, seed)
                append_records(results, [record])
                print(f"{name} seed {seed}: {record['metric']:.2f} (dense {metrics['r1_mean']:.2f}, "
                      f"{record['wall_s']:.0f} s)", flush=True)
    report(load_records(results), out / "recovery.md")
    print(f"wrote {out / 'recovery.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
