"""Is the demo's dense model converged? (issue 24 item 3.) Trains a built-in preset's dense model exactly as
``comp-vlm demo`` does (:func:`comp_vlm.zoo.builtin_dense`, no cache), evaluates its test R@1, then trains a copy
further as the demo's 'dense + the same steps' control does (:func:`comp_vlm.training.train_dense_control`, the
demo's ``PruneConfig``: the preset's prune lr, equal-total budget) and evaluates that. Converged means
control ≤ dense + 1 point R@1.

The control's split between search-like and fine-tuning steps is the nominal search (one FLOPs step per stage to
the preset's ratio); its total is the equal-total budget, as in the demo (780 steps for demo-clip). The demo runs
its control after the search has moved the training loader on; here it starts at the loader's first batch.

Each run is appended to ``--out`` (JSON) as it finishes, and the markdown table beside it is rewritten.

    python benchmarks/demo_convergence.py --seeds 0 --label today                      # the preset as it is
    python benchmarks/demo_convergence.py --seeds 0,1 --label steps2400 --steps 2400   # a DenseTraining override
    python benchmarks/demo_convergence.py --seeds 0 --label dense-only --no-control --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from quality_suite.provenance import versions

import comp_vlm
from comp_vlm.search import budget
from comp_vlm.tasks.retrieval import RetrievalTask
from comp_vlm.training import train_dense_control
from comp_vlm.zoo import BUILTINS, builtin_dense

OUT = Path(__file__).resolve().parent / "results" / "demo_convergence.json"
OVERRIDES = ("steps", "lr", "warmup", "weight_decay")


def control_config(spec: comp_vlm.zoo.Preset, seed: int) -> comp_vlm.PruneConfig:
    """The demo's pruning config (its control trains under it)."""
    return comp_vlm.PruneConfig(ratio=spec.ratio, snapshots=tuple(s for s in spec.snapshots if s < spec.ratio),
                                strategy="comp", **spec.prune_options(), seed=seed, progress=False,
                                finetune_budget=spec.finetune_budget)


def run_one(spec: comp_vlm.zoo.Preset, seed: int, control: bool) -> dict:
    """Dense training (timed), its test R@1, and (``control``) the dense + the same steps control's."""
    task = RetrievalTask(gallery_size=spec.gallery_size)
    dense = builtin_dense(spec, seed, "cpu", None, task, progress=False)
    record = {"seed": seed, "dense_train_seconds": dense.train_seconds,
              "dense": task.evaluate(dense.model, dense.data.loaders.test),
              "dense_val": task.evaluate(dense.model, dense.data.loaders.val)}
    if control:
        config = control_config(spec, seed)
        search_steps = budget.nominal_search_steps(config.ratio, config.flops_step, config.stage_steps)
        model = copy.deepcopy(dense.model)
        t0 = time.perf_counter()
        steps = train_dense_control(model, task, dense.data.loaders.train, config, search_steps)
        record.update({"control_seconds": time.perf_counter() - t0, "control_steps": steps,
                       "control_search_steps": search_steps,
                       "control": task.evaluate(model.eval(), dense.data.loaders.test)})
        record["control_minus_dense"] = record["control"]["r1_mean"] - record["dense"]["r1_mean"]
    return record


def markdown(record: dict) -> str:
    """The table of every run in ``record``, then its ``notes`` (the findings, written into the JSON by hand)."""
    lines = ["# Demo dense model: converged? (issue 24 item 3)", "",
             ("Test R@1 (mean of i2t and t2i, galleries of 100) of the demo's dense model and of the 'dense + the "
              "same steps' control; converged: control − dense ≤ 1. Repeat a row with its command. Seconds are "
              "wall time on a shared 2-core machine (load average given), so upper bounds."), "",
             ("| label | dense training | seed | threads | transformers | dense R@1 | control R@1 | control − dense "
              "| dense s | load | command |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        t = r["training"]
        setting = f"{t['steps']} steps, lr {t['lr']}, warm-up {t['warmup']}, wd {t['weight_decay']}"
        ctrl = f"{r['control']['r1_mean']:.1f}" if "control" in r else "–"
        diff = f"{r['control_minus_dense']:+.1f}" if "control" in r else "–"
        lines.append(f"| {r['label']} | {setting} | {r['seed']} | {r['threads']} | {r['versions']['transformers']} | "
                     f"{r['dense']['r1_mean']:.1f} | {ctrl} | {diff} | {r['dense_train_seconds']:.0f} | "
                     f"{r['load_average'][0]:.1f} | `{r['command']}` |")
    return "\n".join(lines + [""] + record.get("notes", [])) + "\n"


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo-clip", choices=sorted(BUILTINS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--label", required=True, help="names the setting in the records")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-control", action="store_true", help="dense training and its R@1 only")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from --out's records")
    for name in OVERRIDES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float if name in ("lr", "weight_decay") else int,
                            help=f"DenseTraining.{name} instead of the preset's")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    spec = replace(BUILTINS[args.preset], dense=replace(BUILTINS[args.preset].dense, **overrides))
    command = "python benchmarks/demo_convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(record))
        return 0
    for seed in (int(s) for s in args.seeds.split(",")):
        run = {"label": args.label, "preset": args.preset, "training": asdict(spec.dense), "threads": args.threads,
               **run_one(spec, seed, not args.no_control), "command": command, "versions": versions(),
               "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps({k: run[k] for k in ("label", "seed", "dense_train_seconds")} |
                         {"dense": run["dense"]["r1_mean"], "control": run.get("control", {}).get("r1_mean")}),
              flush=True)
        record = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}  # notes added meanwhile
        record["runs"].append(run)
        write(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
