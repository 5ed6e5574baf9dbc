"""Why does attention-based vision-token dropping lose to random dropping on the benchmark world?

The world checks (``world_checks.py``) found that dropping 50% of the vision tokens at the first site by CIT
(Eq. 6) gives a lower R@1 than dropping them at random, while text tokens behave as expected. This study asks
where the ranking goes wrong, on the quality suite's dense model and test split:

1. **Object coverage.** A patch is an *object patch* when at least ``--object-pixels`` of its pixels belong to an
   object (objects are saturated colours, the background is grey: the renderer's own test). At every vision
   site, with no fine-tuning: the fraction of object patches each scorer keeps when it keeps 50% of the patches
   (random: 0.5), and the AUROC of its scores for object vs background patches.
2. **Drop 50% at one site, no fine-tuning:** R@1 for each scorer, plus an *object oracle* (object patches
   first, then random) — an upper bound on what picking the right patches can give at that site.
3. **Drop 50% at the first site with fine-tuning** (``--finetune-steps`` steps, the suite's pruning lr, the
   site active during training, as MADTP/EViT train): Eq. 6 vs random vs no site, and the object coverage of
   Eq. 6 after fine-tuning.

Scorers: ``eq6`` (the library's CIT: received attention, max over heads, summed over queries), ``cls-row``
(the CLS query's row, max over heads), ``mean-heads`` (received attention, mean over heads), ``random``.

    python benchmarks/token_scoring.py          # writes benchmarks/results/token_scoring.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_world import Bench, make_bench
from quality_suite.provenance import versions

import comp_vlm
import comp_vlm.training
from comp_vlm.adapters.runtime import attention_scores
from comp_vlm.importance import normalize_scores

SCORERS = ("eq6", "cls-row", "mean-heads", "random")


# ---- patch labels -------------------------------------------------------------------------------------------------
def object_patches(pixel_values: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], patch: int,
                   min_pixels: int) -> torch.Tensor:
    """(B, P) bool: patches holding at least ``min_pixels`` object pixels. An object pixel is a saturated one,
    the complement of the renderer's grey-background test (``BenchmarkWorld.render``)."""
    raw = pixel_values * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    colourful = (raw - raw.mean(dim=1, keepdim=True)).abs().sum(dim=1) >= 0.25  # (B, S, S)
    b, s, _ = colourful.shape
    counts = colourful.view(b, s // patch, patch, s // patch, patch).sum(dim=(2, 4))  # (B, s/p, s/p)
    return counts.flatten(1) >= min_pixels  # row-major, the patch-embedding order


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half); nan without both."""
    pos, neg = scores[labels], scores[~labels]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def top_half_recall(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of the object patches among the top 50% of patches by score (nan when no object patch)."""
    if not bool(labels.any()):
        return float("nan")
    k = (scores.numel() + 1) // 2
    top = torch.zeros_like(labels)
    top[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return float((top & labels).sum() / labels.sum())


# ---- scorers: what a site ranks patches by (a TokenScorer installed on the model) --------------------------------
def alternative_scores(name: str, probs: torch.Tensor, state: Any, generator: torch.Generator,
                       oracle: torch.Tensor | None) -> torch.Tensor:
    """Scores (B, n) of the current slots for a bidirectional tower (the CLS token is slot 0, always kept)."""
    queries = (state.valid & (state.positions != state.pooled[:, None])).float()
    if name == "cls-row":
        raw = probs.amax(dim=1)[:, 0, :].float()
    elif name == "mean-heads":
        raw = (probs.mean(dim=1).float() * queries[:, :, None]).sum(dim=1)
    elif name == "random":
        raw = torch.rand(state.prunable.shape, generator=generator).to(probs.device)
    elif name == "oracle":
        assert oracle is not None, "the oracle needs the batch's object patches"
        noise = torch.rand(state.prunable.shape, generator=generator).to(probs.device)
        labels = torch.zeros_like(noise)
        labels[:, 1:] = oracle.float().to(probs.device).gather(1, state.positions[:, 1:] - 1)
        raw = labels + noise  # object patches first, random order within each group
    else:
        raise ValueError(name)
    return normalize_scores(raw, state.prunable)


class ScoringSwitch:
    """A token scorer (installed with :meth:`install`) that ranks the vision tower's tokens by ``scorer`` (the text
    tower keeps CIT), records the Eq. 6 scores and every scorer's scores at each site call, and knows the current
    batch's object patches."""

    def __init__(self, scorer: str = "eq6", seed: int = 0, record: bool = False) -> None:
        self.scorer, self.record = scorer, record
        self.generator = torch.Generator().manual_seed(seed)
        self.objects: torch.Tensor | None = None
        self.recorded: list[dict[str, torch.Tensor]] = []

    def __call__(self, probs: torch.Tensor, head_mask: torch.Tensor | None, state: Any, causal: bool,
                 ) -> torch.Tensor:
        eq6 = attention_scores(probs, head_mask, state, causal)
        if causal:  # the text tower
            return eq6
        if self.record and not state.gathered:
            rec = {"eq6": eq6[:, 1:].detach().cpu()}
            for name in ("cls-row", "mean-heads", "random"):
                rec[name] = alternative_scores(name, probs, state, self.generator, None)[:, 1:].detach().cpu()
            self.recorded.append(rec)
        return eq6 if self.scorer == "eq6" else alternative_scores(self.scorer, probs, state, self.generator,
                                                                    self.objects)

    def install(self, model: torch.nn.Module) -> ScoringSwitch:
        """Make ``model``'s token sites rank tokens by this switch (until another scorer is installed)."""
        comp_vlm.get_adapter(model).install(scorer=self)
        return self

    def feed(self, batches: Iterable[dict], labels: list[torch.Tensor]) -> Iterator[dict]:
        """The batches, telling the switch each batch's object patches before the model sees it."""
        for batch, objects in zip(batches, labels):
            self.objects = objects
            yield batch


# ---- the three parts ----------------------------------------------------------------------------------------------
def with_site(dense: torch.nn.Module, layer: int, keep: float) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    adapter = comp_vlm.get_adapter(model).install()
    adapter.set_keep_ratio("vision", layer, keep)
    return model


def coverage(bench: Bench, model_with_site: torch.nn.Module, labels: list[torch.Tensor]) -> dict[str, dict]:
    """Object coverage of every scorer at the model's (single) vision site, over the test split."""
    switch = ScoringSwitch("eq6", record=True).install(model_with_site)
    with torch.no_grad():
        bench.task.embed(model_with_site, switch.feed(bench.data.test, labels))
    out: dict[str, dict] = {}
    all_labels = torch.cat(labels)
    for name in ("eq6", "cls-row", "mean-heads", "random"):
        scores = torch.cat([r[name] for r in switch.recorded])
        recall = [top_half_recall(s, y) for s, y in zip(scores, all_labels)]
        area = [auroc(s, y) for s, y in zip(scores, all_labels)]
        out[name] = {"object_recall_top_half": statistics.fmean(x for x in recall if not math.isnan(x)),
                     "auroc_object_vs_background": statistics.fmean(x for x in area if not math.isnan(x))}
    return out


def r1_with(bench: Bench, model: torch.nn.Module, scorer: str, labels: list[torch.Tensor], seed: int = 0) -> float:
    switch = ScoringSwitch(scorer, seed=seed).install(model)
    return bench.task.evaluate(model, switch.feed(bench.data.test, labels))["r1_mean"]


def finetuned(bench: Bench, model: torch.nn.Module, scorer: str | None, steps: int, seed: int) -> torch.nn.Module:
    """``model`` trained ``steps`` steps (suite lr and data order of ``seed``) with its sites active, ranking
    vision tokens by ``scorer`` during training (None: a model without sites, trained as it is)."""
    comp_vlm.training.seed_everything(seed)
    config = comp_vlm.PruneConfig(lr=bench.settings.prune_lr, progress=False)
    if scorer is not None:
        ScoringSwitch(scorer, seed=seed).install(model)
    comp_vlm.training.train_steps(model, bench.task, comp_vlm.training.cycle_batches(bench.train_order(seed)),
                                  steps, config)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--object-pixels", type=int, default=4, help="object pixels that make an object patch")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2, help="random-scorer / fine-tuning seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("/tmp/comp_quality_smoke" if args.smoke else "benchmarks/results"))
    bench = make_bench(args.smoke)
    dense, dense_metrics = bench.dense(progress=not args.smoke)
    patch = dense.config.vision_config.patch_size
    labels = [object_patches(b["pixel_values"], bench.world.image_mean, bench.world.image_std, patch,
                             args.object_pixels) for b in bench.data.test]
    sites = [s.layer for s in comp_vlm.get_adapter(dense).token_sites("T_v")]
    result: dict[str, Any] = {
        "command": "python benchmarks/token_scoring.py", "model": bench.settings.name, "versions": versions(),
        "dense_r1": dense_metrics["r1_mean"], "object_pixels": args.object_pixels, "patch": patch,
        "vision_sites": sites,
        "object_patch_fraction": float(torch.cat(labels).float().mean()), "coverage": {}, "drop_half": {},
    }
    for layer in sites:
        model = with_site(dense, layer, 0.5)
        result["coverage"][str(layer)] = coverage(bench, model, labels)
        drops = {name: r1_with(bench, model, name, labels) for name in ("eq6", "cls-row", "mean-heads")}
        for name in ("random", "oracle"):
            drops[name] = statistics.fmean(r1_with(bench, model, name, labels, seed) for seed in range(args.seeds))
        result["drop_half"][str(layer)] = drops
        print(f"vision site {layer}: coverage {result['coverage'][str(layer)]}\n  R@1 {drops}", flush=True)
    first = sites[0]
    tuned: dict[str, list[float]] = {"eq6": [], "random": [], "no-site": []}
    tuned_coverage = []
    for seed in range(args.seeds):
        for scorer in ("eq6", "random"):
            model = finetuned(bench, with_site(dense, first, 0.5), scorer, args.finetune_steps, seed)
            tuned[scorer].append(r1_with(bench, model, scorer, labels, seed))
            if scorer == "eq6":
                tuned_coverage.append(coverage(bench, model, labels)["eq6"])
        plain = finetuned(bench, copy.deepcopy(dense), None, args.finetune_steps, seed)
        tuned["no-site"].append(bench.task.evaluate(plain, bench.data.test)["r1_mean"])
        print(f"fine-tuned seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in tuned.items()), flush=True)
    result["finetuned_drop_half_first_site"] = {
        "steps": args.finetune_steps, "seeds": args.seeds, "r1": tuned,
        "eq6_coverage": {k: statistics.fmean(c[k] for c in tuned_coverage) for k in tuned_coverage[0]}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_scoring.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "token_scoring.md").write_text("\n".join(render(result)) + "\n")
    print("\n".join(render(result)))
    return 0


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def render(result: dict[str, Any]) -> list[str]:
    lines = ["# Vision-token scoring on the benchmark world", "", f"Command: `{result['command']}`", "",
             (f"Dense R@1 {result['dense_r1']:.2f}. Object patches (≥ {result['object_pixels']} object pixels of "
             f"{result['patch'] ** 2}): {100 * result['object_patch_fraction']:.1f}% of the patches. Vision sites: layers "
             f"{result['vision_sites']}."), "",
             "## Object coverage of each scorer (no fine-tuning)", "",
             "| site | scorer | object patches kept at 50% | AUROC object vs background |", "|---|---|---|---|"]
    for layer, cov in result["coverage"].items():
        for name, c in cov.items():
            lines.append(f"| {layer} | {name} | {_fmt(c['object_recall_top_half'])} | "
                         f"{_fmt(c['auroc_object_vs_background'])} |")
    lines += ["", "## R@1 after dropping 50% of the patches at one site (no fine-tuning)", "",
              "| site | " + " | ".join(next(iter(result["drop_half"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(result["drop_half"].values())))]
    for layer, drops in result["drop_half"].items():
        lines.append(f"| {layer} | " + " | ".join(_fmt(v) for v in drops.values()) + " |")
    ft = result["finetuned_drop_half_first_site"]
    lines += ["", (f"## Dropping 50% at the first site, fine-tuned {ft['steps']} steps with the site active "
              f"({ft['seeds']} seeds)"), "", "| training / inference scorer | R@1 per seed | mean |", "|---|---|---|"]
    for name, values in ft["r1"].items():
        lines.append(f"| {name} | {', '.join(_fmt(v) for v in values)} | {_fmt(statistics.fmean(values))} |")
    cov = ft["eq6_coverage"]
    lines += ["", (f"Eq. 6 after fine-tuning: object patches kept at 50% {_fmt(cov['object_recall_top_half'])}, "
              f"AUROC {_fmt(cov['auroc_object_vs_background'])}.")]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
