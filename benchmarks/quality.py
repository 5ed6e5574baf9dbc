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
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

import comp_vlm
from comp_vlm.data.synthetic import BenchmarkWorld, make_retrieval_loaders
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.dense import DenseTraining, cached_dense
from comp_vlm.tasks import RetrievalTask

MAIN = ("comp", "param-only", "token-only", "sjp", "cycle", "random-mode")
ABLATIONS = ("greedy", "no-cip", "uniform-rms", "no-cit", "no-re", "no-hi")


def bench_config(tok, width: int, layers: int) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=32, patch_size=4),
        projection_dim=width,
    )


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def append_records(path: Path, new: list[dict]) -> None:
    """Read-append-write through a temp file and rename: a crash never leaves a truncated results file."""
    records = load_records(path) + new
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(records, fh, indent=1)
    os.replace(tmp, path)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (nan for fewer than 2 values)."""
    from scipy.stats import t as student_t  # optional dependency, only for the report

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def report(records: list[dict], stages: list[dict], out: Path, stem: str) -> None:
    keyed = {(r["strategy"], r["ratio"], r["seed"]): r for r in records}
    strategies = sorted({r["strategy"] for r in records}, key=lambda s: (MAIN + ABLATIONS).index(s))
    ratios = sorted({r["ratio"] for r in records})
    lines = [f"# Quality: retrieval r1_mean after pruning ({len(records)} records)", "",
             "Mean over seeds (reached runs); Δ = mean paired difference comp − strategy (same dense model, same "
             "data order per seed), ± 95% t-interval half-width; n = paired seeds.", "",
             "| ratio | strategy | mean | FLOPs kept | Δ comp − strategy | n |", "|---|---|---|---|---|---|"]
    for ratio in ratios:
        for s in strategies:
            rows = [r for r in records if r["strategy"] == s and r["ratio"] == ratio and r["reached"]]
            if not rows:
                lines.append(f"| {ratio} | {s} | not reached | | | |")
                continue
            mean = statistics.fmean(r["metric"] for r in rows)
            kept = statistics.fmean(r["flops_kept"] for r in rows)
            diffs = [keyed[("comp", ratio, r["seed"])]["metric"] - r["metric"] for r in rows
                     if ("comp", ratio, r["seed"]) in keyed and keyed[("comp", ratio, r["seed"])]["reached"]]
            delta = ""
            if diffs and s != "comp":
                m, h = mean_ci(diffs)
                delta = f"{m:+.2f} ± {h:.2f}"
            lines.append(f"| {ratio} | {s} | {mean:.2f} | {kept:.3f} | {delta} | {len(diffs) or len(rows)} |")
    dense = sorted({(r["seed"], r["dense_metric"]) for r in records})
    lines += ["", f"Dense r1_mean per seed: {', '.join(f'{m:.2f}' for _, m in dense)}"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in strategies:
        pts = sorted((statistics.fmean(r["flops_kept"] for r in rows), statistics.fmean(r["metric"] for r in rows))
                     for ratio in ratios
                     if (rows := [r for r in records if r["strategy"] == s and r["ratio"] == ratio and r["reached"]]))
        if pts:
            axes[0].plot(*zip(*pts), marker="o", label=s)
    axes[0].set_xlabel("FLOPs kept")
    axes[0].set_ylabel("r1_mean")
    axes[0].legend(fontsize=7)
    comp_runs = [st for st in stages if st["strategy"] == "comp"]
    modes = sorted({m for st in comp_runs for m in st["modes"]})
    for k, st in enumerate(comp_runs[:8]):
        axes[1].scatter(range(1, len(st["modes"]) + 1), [modes.index(m) + 0.08 * k for m in st["modes"]], s=8)
    axes[1].set_yticks(range(len(modes)), modes)
    axes[1].set_xlabel("stage")
    axes[1].set_title("MPS mode per stage (comp, one row of dots per seed)")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(MAIN))
    parser.add_argument("--ratios", default="0.5,0.7,0.8,0.85")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--smoke", action="store_true", help="tiny model, data and steps; results to /tmp")
    parser.add_argument("--report", action="store_true", help="only render the report from recorded runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("/tmp/comp_quality_smoke" if args.smoke else "benchmarks/results"))
    stem = "quality"
    results, stages_path = out / f"{stem}.json", out / f"{stem}_stages.jsonl"
    if args.report:
        stages = [json.loads(x) for x in stages_path.read_text().splitlines()] if stages_path.is_file() else []
        report(load_records(results), stages, out, stem)
        print(f"wrote {out / (stem + '.md')}")
        return 0
    s = args.smoke
    world = BenchmarkWorld(seed=0)
    tok = build_word_tokenizer(world.vocabulary())
    n_train, n_val, n_test = (256, 64, 128) if s else (20000, 2048, 5120)
    cfg = bench_config(tok, width=32 if s else 128, layers=3 if s else 4)
    training = DenseTraining(steps=20 if s else 3000, warmup=5 if s else 150)
    ratios = [float(r) for r in args.ratios.split(",")]
    done = {(r["strategy"], r["seed"]) for r in load_records(results)}
    for seed in [int(x) for x in args.seeds.split(",")]:
        data = make_retrieval_loaders(world, tok, n_train, n_val, n_test, batch_size=64 if not s else 32, seed=seed)
        task = RetrievalTask()
        dense, dense_metrics = cached_dense(CLIPModel._from_config, cfg, task, data.train, data.test, training,
                                            data_id=f"benchmark-world-{seed}-{n_train}", cache_dir="cache")
        for strategy in args.strategies.split(","):
            if (strategy, seed) in done:
                continue
            t0 = time.perf_counter()
            data.train.load_state_dict({"epoch": 0, "position": 0})  # same data order for every arm of a seed
            config = comp_vlm.PruneConfig(
                ratio=max(ratios), snapshots=tuple(ratios), strategy=strategy, seed=seed,
                stage_steps=6 if s else 50, flops_step=0.1 if s else 0.04, finetune_steps=5 if s else 300,
                calibration_batches=2 if s else 8, lr=1e-4, progress=not s)
            try:
                res = comp_vlm.prune(copy.deepcopy(dense), task, data.train, data.val, config, test_data=data.test)
            except comp_vlm.ConfigError as exc:  # e.g. every ratio below the strategy's floor
                print(f"{strategy} seed {seed}: {exc}")
                res = None
            wall = time.perf_counter() - t0
            records = []
            for ratio in ratios:
                reached = res is not None and ratio in res.snapshots
                metric = res.metrics[ratio]["r1_mean"] if reached else float("nan")
                kept = res.snapshots[ratio][1].flops_kept if reached else float("nan")
                records.append({"task": "retrieval", "model": "bench-clip" if not s else "smoke-clip",
                                "strategy": strategy, "ratio": ratio, "seed": seed, "metric_name": "r1_mean",
                                "metric": metric, "dense_metric": dense_metrics["r1_mean"], "flops_kept": kept,
                                "reached": reached, "steps": config.stage_steps, "wall_s": wall})
            append_records(results, records)
            if res is not None:
                with stages_path.open("a") as fh:
                    fh.write(json.dumps({"strategy": strategy, "seed": seed,
                                         "modes": [r["mode"] for r in res.stage_log]}) + "\n")
            print(f"{strategy} seed {seed}: " + ", ".join(
                f"{r['ratio']}: {r['metric']:.2f}" for r in records) + f"  ({wall:.0f} s)")
    stages = [json.loads(x) for x in stages_path.read_text().splitlines()] if stages_path.is_file() else []
    report(load_records(results), stages, out, stem)
    print(f"wrote {results} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
