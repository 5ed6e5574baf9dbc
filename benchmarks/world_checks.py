"""Checks that the offline benchmark world makes the quality comparison meaningful (issue: offline benchmark):

- each tower's share of the dense FLOPs (both must be >= 25%);
- the dense metric (target 80-95% R@1) and parameter redundancy: a half-width model trained from scratch the
  same way should get close;
- input-dependent token redundancy: dropping 50% of the tokens at the first site by attention (CIT) must clearly
  beat dropping them at random, with no fine-tuning, per tower;
- duplicates: how often a gallery holds two pairs with the same content, and split disjointness.

    python benchmarks/world_checks.py            # uses (or trains and caches) the quality suite's dense model
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
from pathlib import Path

import torch
from bench_world import Bench, make_bench
from quality_suite.provenance import versions

import comp_vlm
import comp_vlm.training
from comp_vlm.flops import tower_flops


def drop_at_first_site(bench: Bench, dense: torch.nn.Module, mode: str, keep: float, random_seed: int | None,
                       ) -> float:
    """R@1 with one site, at the first of ``mode``, keeping ``keep``: tokens ranked by CIT, or uniformly at random
    (the 'random' scorer seeded with ``random_seed``)."""
    model = copy.deepcopy(dense)
    options = comp_vlm.AdapterOptions() if random_seed is None else comp_vlm.AdapterOptions(
        token_scorer="random", token_scorer_seed=random_seed)
    adapter = comp_vlm.get_adapter(model).install(options)
    site = adapter.token_sites(mode)[0]
    adapter.set_keep_ratio(site.tower, site.layer, keep)
    return bench.task.evaluate(model, bench.data.test)["r1_mean"]


def image_hashes(pixel_values: torch.Tensor) -> set[str]:
    return {hashlib.sha1(px.numpy().tobytes()).hexdigest() for px in pixel_values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--random-seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out or ("/tmp/comp_quality_smoke" if args.smoke else "benchmarks/results"))
    bench = make_bench(args.smoke)
    s = bench.settings
    half, half_metrics = bench.dense(width_scale=0.5, progress=not args.smoke)
    dense, dense_metrics = bench.dense(progress=not args.smoke)
    length = comp_vlm.training.training_text_length(bench.train_order(0))
    towers = comp_vlm.get_adapter(dense).structure({"text_length": length})
    flops = {t.name: tower_flops(t).total for t in towers}
    total = sum(flops.values())
    result: dict = {
        "model": s.name, "command": "python benchmarks/world_checks.py", "versions": versions(),
        "flops_share": {k: v / total for k, v in flops.items()}, "reference_text_length": length,
        "dense_r1": dense_metrics["r1_mean"], "dense_params": comp_vlm.count_params(dense),
        "half_width_r1": half_metrics["r1_mean"], "half_width_params": comp_vlm.count_params(half),
        "gallery_size": s.gallery_size, "dense_steps": s.dense.steps,
    }
    drops = {}
    for mode in ("T_v", "T_l"):
        attention = drop_at_first_site(bench, dense, mode, 0.5, None)
        randoms = [drop_at_first_site(bench, dense, mode, 0.5, seed) for seed in range(args.random_seeds)]
        drops[mode] = {"attention": attention, "random_mean": statistics.fmean(randoms), "random": randoms}
    result["drop_half_at_first_site"] = drops
    keys = [k for b in bench.data.test for k in b["match_keys"]]
    galleries = [keys[i:i + s.gallery_size] for i in range(0, len(keys) - s.gallery_size + 1, s.gallery_size)]
    result["test_pairs"] = len(keys)
    result["pairs_sharing_content_in_gallery"] = statistics.fmean(
        sum(g.count(k) > 1 for k in g) / len(g) for g in galleries)
    captions = [c for b in bench.data.test for c in b["captions"]]
    result["unique_caption_fraction"] = len(set(captions)) / len(captions)
    val = image_hashes(torch.cat([b["pixel_values"] for b in bench.data.val]))
    test = image_hashes(torch.cat([b["pixel_values"] for b in bench.data.test]))
    train = image_hashes(bench.data.train.data.pixel_values)
    result["split_overlap_images"] = {"val_test": len(val & test), "train_test": len(train & test),
                                      "train_val": len(train & val)}
    result["val_pairs"], result["train_pairs"] = s.n_val, s.n_train
    out.mkdir(parents=True, exist_ok=True)
    (out / "world_checks.json").write_text(json.dumps(result, indent=1) + "\n")
    share = result["flops_share"]
    lines = ["# Benchmark world checks", "", "Command: `python benchmarks/world_checks.py`", "",
             "- dense FLOPs share: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
             + f" (text at its mean training length, {length} tokens)",
             (f"- dense R@1 {result['dense_r1']:.2f} ({result['dense_params']:,} params); half-width model trained "
             f"the same way from scratch: {result['half_width_r1']:.2f} ({result['half_width_params']:,} params)"),
             "- dropping 50% of the prunable tokens at the first site, no fine-tuning (R@1):"]
    for mode, d in drops.items():
        lines.append(f"  - {mode}: attention (CIT) {d['attention']:.2f} vs random {d['random_mean']:.2f} "
                     f"(seeds: {', '.join(f'{x:.2f}' for x in d['random'])})")
    lines += [(f"- test pairs {len(keys)} in galleries of {s.gallery_size}; pairs whose content repeats inside their "
              f"gallery: {100 * result['pairs_sharing_content_in_gallery']:.2f}% (matched by content key); unique "
              f"caption strings {100 * result['unique_caption_fraction']:.1f}%"),
              f"- identical images across splits: {result['split_overlap_images']}"]
    (out / "world_checks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
