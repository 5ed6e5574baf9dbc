"""Speed suite: measured vs ideal speedup of pruned CLIP models (issue: speed report).

A ViT-B/16-shaped CLIP (random weights; text tower of CLIP ViT-B/16) is pruned by the engine's own slicing and
token sites to FLOPs kept 0.5 and 0.2 with realistic recipes (heads, neurons and tokens together), then timed
against the dense model in its fastest configuration (sdpa everywhere, dead-compute option on). The ideal speedup
is what the analytic FLOPs model promises (dense FLOPs / pruned FLOPs); the suite reports measured / ideal.

    python benchmarks/speed.py                      # writes benchmarks/results/speed.{json,md}
    python benchmarks/speed.py --quick              # tiny model, for a smoke test
    python benchmarks/speed.py --reducers           # the token reducers' own cost: speed_reducers.{json,md}

``--reducers`` times each recipe's model under every token reducer (the same kept units and keep ratios, so the
same tokens kept), against drop: what fusing or merging the dropped tokens costs, measured and in FLOPs.

Timing: median of ``--repeats`` (>= 7) interleaved runs after warm-up, so slow drifts hit every variant alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch
from quality_suite.provenance import versions
from transformers import CLIPConfig, CLIPModel

import comp_vlm
from comp_vlm import AdapterOptions, get_adapter
from comp_vlm.adapters.runtime import TOKEN_REDUCERS
from comp_vlm.measure import interleaved_latency_ms

VIT_B16 = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 1},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "image_size": 224, "patch_size": 16},
    "projection_dim": 512,
}
QUICK = {
    "text_config": {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "max_position_embeddings": 32, "bos_token_id": 98, "eos_token_id": 99,
                     "pad_token_id": 1},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 4},
    "projection_dim": 32,
}


def build(cfg: dict, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel._from_config(CLIPConfig(**cfg), attn_implementation="sdpa").eval()
    get_adapter(model).install(AdapterOptions(dead_compute=True))
    return model


def apply_structure(model: CLIPModel, unit_keep: float, token_level: float, seed: int) -> None:
    """Keep ``unit_keep`` of the heads and neurons of every layer (chosen at random: weights are random) and let
    every token site keep ``token_level`` of the prunable tokens reaching it."""
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    for spec in adapter.tower_specs():
        for i in range(len(adapter.layers(spec))):
            for size, setter in ((spec.num_heads, adapter.set_head_mask), (spec.neurons, adapter.set_neuron_mask)):
                keep = max(1, round(unit_keep * size))
                mask = torch.zeros(size)
                mask[torch.randperm(size, generator=g)[:keep]] = 1
                setter(spec.name, i, mask)
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, token_level)


def recipe_for(cfg: dict, kept_target: float, unit_keep: float, reference: dict, seed: int) -> comp_vlm.Recipe:
    """Bisection on the token level so that the recipe keeps ``kept_target`` of dense FLOPs."""
    model = build(cfg, seed)
    adapter = get_adapter(model)
    dense = adapter.count_flops(reference)
    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        apply_structure(model, unit_keep, mid, seed)
        if adapter.count_flops(reference) / dense > kept_target:
            hi = mid
        else:
            lo = mid
    apply_structure(model, unit_keep, lo, seed)
    recipe = adapter.recipe(reference)
    recipe.extra.update({"unit_keep": unit_keep, "token_level": lo})
    return recipe


def from_recipe(cfg: dict, recipe: comp_vlm.Recipe, reducer: str | None = None) -> CLIPModel:
    """A model sliced to ``recipe`` (under token reducer ``reducer`` if given)."""
    if reducer is not None:
        recipe = copy.deepcopy(recipe)
        recipe.options = {**recipe.options, "token_reducer": reducer}
    model = CLIPModel._from_config(CLIPConfig(**cfg), attn_implementation="sdpa").eval()
    comp_vlm.apply_recipe(model, recipe)
    return model


def make_inputs(cfg: dict, batch: int, text_length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg["text_config"]["vocab_size"] - 2, (batch, text_length), generator=g)
    ids[:, 0] = cfg["text_config"]["bos_token_id"]
    ids[:, -1] = cfg["text_config"]["eos_token_id"]
    image = cfg["vision_config"]["image_size"]
    return {"pixel_values": torch.randn(batch, 3, image, image, generator=g), "input_ids": ids}


def reducer_rows(cfg: dict, recipes: dict[str, comp_vlm.Recipe], batches: list[int], text_length: int,
                 reference: dict, repeats: int) -> list[dict]:
    """Each recipe under every reducer, timed (interleaved) against its drop variant at each batch size."""
    rows = []
    for plan, recipe in recipes.items():
        variants = {reducer: from_recipe(cfg, recipe, reducer) for reducer in TOKEN_REDUCERS}
        flops = {reducer: comp_vlm.count_flops(m, reference) for reducer, m in variants.items()}
        for batch in batches:
            lat = dict(zip(variants, interleaved_latency_ms(list(variants.values()), make_inputs(cfg, batch, text_length),
                                                            repeats, warmup=1)))
            for reducer in TOKEN_REDUCERS:
                rows.append({"batch": batch, "plan": plan, "reducer": reducer, "flops": flops[reducer],
                             "ms": lat[reducer], "ms_over_drop": lat[reducer] / lat["drop"],
                             "flops_over_drop": flops[reducer] / flops["drop"]})
                print(f"batch {batch:2d} {plan} {reducer:5s}: {lat[reducer]:8.1f} ms  x{lat[reducer] / lat['drop']:.3f} "
                      f"of drop (FLOPs x{flops[reducer] / flops['drop']:.4f})")
    return rows


def write_reducers(out: Path, stem: str, meta: dict, rows: list[dict]) -> None:
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Speed: the token reducers' own cost ({meta['model']})", "",
             (f"`{meta['command']}` — torch {meta['torch']}, {meta['threads']} threads, median of {meta['repeats']} "
              f"interleaved runs; each plan's recipe (same kept units and keep ratios) under every reducer, at "
              f"{meta['reference']}."), "",
             "| batch | plan | reducer | ms | ms / drop | FLOPs / drop |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['plan']} | {r['reducer']} | {r['ms']:.1f} | {r['ms_over_drop']:.3f} | "
              f"{r['flops_over_drop']:.4f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reducers", action="store_true", help="time each token reducer against drop instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else VIT_B16
    image = cfg["vision_config"]["image_size"]
    reference = {"image_size": image, "text_length": args.text_length}
    plans = {"kept_0.5": (0.5, 0.75), "kept_0.2": (0.2, 0.5)}  # FLOPs kept -> fraction of heads/neurons kept
    recipes = {name: recipe_for(cfg, kept, unit_keep, reference, seed=1) for name, (kept, unit_keep) in plans.items()}
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "speed_quick" if args.quick else "speed"
    meta = {"model": "tiny" if args.quick else "CLIP ViT-B/16 shape (random weights)", "reference": reference,
            "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__, "versions": versions(),
            "machine": platform.machine(), "processor": platform.processor(),
            "command": " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])}
    if args.reducers:
        rows = reducer_rows(cfg, recipes, batches, args.text_length, reference, args.repeats)
        write_reducers(out, stem.replace("speed", "speed_reducers"), meta, rows)
        return 0
    variants = {"dense": build(cfg), **{name: from_recipe(cfg, recipe) for name, recipe in recipes.items()}}
    flops = {name: comp_vlm.count_flops(m, reference) for name, m in variants.items()}
    rows = []
    for batch in batches:
        inputs = make_inputs(cfg, batch, args.text_length)
        times = interleaved_latency_ms(list(variants.values()), inputs, args.repeats, warmup=1)
        lat = dict(zip(variants, times))
        for name in plans:
            ideal = flops["dense"] / flops[name]
            measured = lat["dense"] / lat[name]
            rows.append({
                "batch": batch, "variant": name, "flops_kept": flops[name] / flops["dense"],
                "dense_ms": lat["dense"], "pruned_ms": lat[name], "measured_speedup": measured,
                "ideal_speedup": ideal, "measured_over_ideal": measured / ideal,
                "unit_keep": recipes[name].extra["unit_keep"], "token_level": recipes[name].extra["token_level"],
            })
            print(f"batch {batch:2d} {name}: FLOPs kept {flops[name] / flops['dense']:.3f}  dense {lat['dense']:8.1f} ms"
                  f"  pruned {lat[name]:8.1f} ms  speedup {measured:.2f}x / ideal {ideal:.2f}x = {measured / ideal:.2f}")
    meta["dense_gflops"] = flops["dense"] / 1e9
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Speed: measured vs ideal speedup ({meta['model']})", "",
             (f"`{meta['command']}` — torch {meta['torch']}, {args.threads} threads, median of {args.repeats} "
             f"interleaved runs; dense = sdpa + dead-compute option, {flops['dense'] / 1e9:.2f} GFLOPs per "
             f"image-text pair at {reference}."), "",
             "| batch | variant | FLOPs kept | dense ms | pruned ms | measured speedup | ideal speedup | measured/ideal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['variant']} | {r['flops_kept']:.3f} | {r['dense_ms']:.1f} | "
                     f"{r['pruned_ms']:.1f} | {r['measured_speedup']:.2f} | {r['ideal_speedup']:.2f} | "
                     f"{r['measured_over_ideal']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
