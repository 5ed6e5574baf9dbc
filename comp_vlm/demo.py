"""The offline demo, ``comp-vlm demo``: build the demo CLIP -> train it densely on the synthetic shapes world
(cached) -> prune with CoMP (search + fine-tune) -> evaluate, time and save everything (model + tokenizer + image
processor, stage log, plot, report). The built-in models live in :mod:`comp_vlm.zoo`, timing in
:mod:`comp_vlm.measure`, the table and plot in :mod:`comp_vlm.report`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import outputs
from .errors import CompVLMError
from .loading import load_image_processor, load_tokenizer, training_split_lengths
from .measure import batch_inputs, dense_reference_model, interleaved_latency_ms
from .report import Row, format_table, json_text, say, show, write_jsonl, write_plot
from .validation import ratio_key
from .zoo import BUILTINS, builtin_dense

log = logging.getLogger("comp_vlm")
#: The demo's search on top of its preset's: a snapshot on the way, and every saved model trained as long in total
DEMO_SNAPSHOTS = (0.5,)
DEMO_FINETUNE_BUDGET = "equal-total"


def save_dense_dir(model: nn.Module, directory: Path, tokenizer: Any, image_processor: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    image_processor.save_pretrained(str(directory))
    return directory


def check_saved_processor(directory: Path, world: Any) -> float:
    """Max gap between the saved image processor (reloaded with AutoImageProcessor) and training tensors."""
    from .data.processor import processor_gap

    gap = processor_gap(world, load_image_processor(directory))
    if gap > 1e-4:
        raise CompVLMError(f"the saved image processor in {directory} does not reproduce the training tensors "
                           f"(max |diff| {gap:.2e})")
    return gap


def zero_shot_example(directory: Path, world: Any, seed: int = 7) -> tuple[str, list[tuple[str, float]]]:
    """Run the saved model in a transformers zero-shot pipeline on one fresh world image."""
    from transformers import pipeline

    from .data.processor import to_pil
    from .io import load_pruned

    raw, captions = world.sample_raw(6, seed=("zero-shot", seed))
    labels = list(dict.fromkeys(captions))
    clf = pipeline("zero-shot-image-classification", model=load_pruned(directory),
                   tokenizer=load_tokenizer(directory), image_processor=load_image_processor(directory))
    out = clf(to_pil(raw[:1])[0], candidate_labels=labels, hypothesis_template="{}")
    return captions[0], [(o["label"], float(o["score"])) for o in out]


def run_demo(out: str, ratio: float | None = None, seed: int = 0, device: str = "cpu", quick: bool = False,
             cache_dir: str | None = "cache", progress: bool = True) -> dict:
    """The offline demo end to end; returns the report dict (also written to ``out/report.json``)."""
    import comp_vlm
    from comp_vlm.search import bootstrap_se
    from comp_vlm.tasks.retrieval import RetrievalTask
    from comp_vlm.training import train_dense_control

    t_start = time.perf_counter()
    spec = BUILTINS["demo-clip-quick" if quick else "demo-clip"]
    ratio = comp_vlm.PruneConfig().ratio if ratio is None else ratio
    snapshots = tuple(s for s in DEMO_SNAPSHOTS if s < ratio)
    out_dir = Path(out)
    task = RetrievalTask(gallery_size=spec.gallery_size)
    probe = comp_vlm.PruneConfig(ratio=ratio, snapshots=snapshots)  # validates the ratio before any training
    del probe
    outputs.claim_in_place(out_dir, "demo", what="--out")  # replaces only an earlier demo output

    say(f"== comp-vlm demo ({spec.name}): {spec.description}")
    say(f"   prune with CoMP to ratio {ratio} (remove {ratio:.0%} of FLOPs), seed {seed}, device {device}")
    say("-- 1/5 dense model")
    dense = builtin_dense(spec, seed, device, cache_dir, task, progress)
    data = dense.data
    text_length = training_split_lengths(task, data.loaders)["text_length"]
    reference = {"image_size": spec.image_size, "text_length": round(text_length)}
    adapter_view = comp_vlm.get_adapter(dense.model)
    towers = {t.name: t for t in adapter_view.structure(reference)}
    from .flops import tower_flops

    shares = {n: tower_flops(t).total for n, t in towers.items()}
    total = sum(shares.values())
    say(f"   reference shape: {spec.image_size}x{spec.image_size} images, {reference['text_length']} text tokens "
        f"(mean caption length {text_length:.2f}); FLOPs share " +
        ", ".join(f"{n} {v / total:.0%}" for n, v in shares.items()))
    small = [n for n, v in shares.items() if v / total < 0.25]
    if small:
        log.warning("tower(s) %s hold less than 25%% of the dense FLOPs at the reference shape", ", ".join(small))
    dense_metrics = task.evaluate(dense.model, data.loaders.test)
    say(f"   dense test R@1: mean {dense_metrics['r1_mean']:.1f} (i2t {dense_metrics['i2t_r1']:.1f}, "
        f"t2i {dense_metrics['t2i_r1']:.1f})")
    dense_val_metric = task.evaluate(dense.model, data.loaders.val)["r1_mean"]
    out_dir.mkdir(parents=True, exist_ok=True)
    dense_dir = save_dense_dir(dense.model, out_dir / "dense", dense.tokenizer, dense.image_processor)
    gap = check_saved_processor(dense_dir, data.world)
    say(f"   image processor check: processor(PIL image) vs training tensor, max |diff| = {gap:.1e}")

    config = spec.prune_config(ratio=ratio, snapshots=snapshots, strategy="comp", seed=seed, reference=reference,
                               progress=progress, finetune_budget=DEMO_FINETUNE_BUDGET)
    say(f"-- 2/5 CoMP search to {ratio:.0%} FLOPs removed (snapshots {', '.join(map(str, snapshots)) or 'none'}; "
        f"{config.stage_steps} steps per stage, FLOPs step {config.flops_step}), then {config.finetune_steps} "
        "fine-tuning steps")
    log_path = out_dir / "stages.jsonl"
    if log_path.exists():
        log_path.unlink()
    t0 = time.perf_counter()
    result = comp_vlm.prune(copy.deepcopy(dense.model), task, data.loaders.train, data.loaders.val, config,
                            test_data=data.loaders.test)
    prune_seconds = time.perf_counter() - t0
    modes = " ".join(r["mode"] for r in result.stage_log)
    say(f"   {len(result.stage_log)} stages in {prune_seconds:.0f} s (search + fine-tuning); modes: {modes}")
    if result.not_reached:
        log.warning("ratio(s) %s not reached; reporting the highest reached (%s)",
                    ", ".join(map(str, result.not_reached)), max(result.snapshots))

    final_ratio = max(result.snapshots)
    total_steps = result.snapshots[final_ratio][1].extra.get("stage", 0) * config.stage_steps + \
        result.snapshots[final_ratio][1].extra.get("finetune_steps", config.finetune_steps)
    say(f"-- 3/5 baselines at {final_ratio:.0%} removed, each trained as long ({total_steps} steps): param-only "
        "(parameters only, UPop-like) and the dense model itself")
    baseline = None
    try:
        baseline = comp_vlm.prune(copy.deepcopy(dense.model), task, data.loaders.train, data.loaders.val,
                                  replace(config, strategy="param-only", ratio=final_ratio, snapshots=()),
                                  test_data=data.loaders.test)
    except CompVLMError as exc:  # its floors keep more FLOPs than the target
        say(f"   param-only cannot reach {final_ratio:.0%}: {exc}")
    control = copy.deepcopy(dense.model)
    search_steps = result.snapshots[final_ratio][1].extra.get("stage", 0) * config.stage_steps
    train_dense_control(control, task, data.loaders.train, replace(config, ratio=final_ratio), search_steps)
    control_metrics = task.evaluate(control.eval(), data.loaders.test)
    # noise of the control's difference: paired bootstrap over the test galleries
    gaps = [c["r1_mean"] - d["r1_mean"] for c, d in zip(task.evaluate_galleries(control, data.loaders.test),
                                                         task.evaluate_galleries(dense.model, data.loaders.test))]
    control_se = bootstrap_se(gaps, 1000, seed)
    say(f"   dense + the same training − dense: {control_metrics['r1_mean'] - dense_metrics['r1_mean']:+.1f} R@1 "
        f"(bootstrap SE over the {len(gaps)} test galleries: {control_se:.1f})")

    say("-- 4/5 save, reload, evaluate and time")
    extra = {"data": {**data.settings, "gallery_size": task.gallery_size or 0}, "dense_model": spec.name}
    saved: dict[float, Path] = {}
    for r, (model, recipe) in sorted(result.snapshots.items()):
        recipe.extra.update(extra)
        target = out_dir / "pruned" if r == max(result.snapshots) else out_dir / "snapshots" / f"r{ratio_key(r)}"
        saved[r] = comp_vlm.save_pruned(model, target, recipe=recipe, tokenizer=dense.tokenizer,
                                        image_processor=dense.image_processor)
    write_jsonl(log_path, result.stage_log)
    check_saved_processor(saved[final_ratio], data.world)
    inputs = batch_inputs(data.loaders.test[0], spec.latency_batch)
    n = inputs["pixel_values"].shape[0]
    dense_ref = dense_reference_model(dense.model, result.recipe)
    dense_flops = comp_vlm.count_flops(dense_ref, reference)
    rows = [Row("dense", dense_metrics, dense_flops, comp_vlm.count_params(dense.model), None),
            Row(f"dense + same {total_steps} steps", control_metrics, dense_flops,
                comp_vlm.count_params(control), None)]
    reload_gap = 0.0
    loaded_models = []
    for r in sorted(saved):
        loaded = comp_vlm.load_pruned(saved[r], device=device)
        with torch.no_grad():
            a = result.snapshots[r][0](**{k: v.to(device) for k, v in inputs.items()}).logits_per_image
            b = loaded(**{k: v.to(device) for k, v in inputs.items()}).logits_per_image
        reload_gap = max(reload_gap, float((a - b).abs().max()))
        metrics = task.evaluate(loaded, data.loaders.test)
        name = f"CoMP {r:.0%} removed" + (" (snapshot)" if r != final_ratio else "")
        rows.append(Row(name, metrics, comp_vlm.count_flops(loaded, reference), comp_vlm.count_params(loaded),
                        None, {"ratio": r, "dir": str(saved[r])}))
        loaded_models.append(loaded)
    if baseline is not None:
        rows.append(Row(f"param-only {final_ratio:.0%} removed", baseline.metrics[final_ratio],
                        comp_vlm.count_flops(baseline.model, reference), comp_vlm.count_params(baseline.model), None,
                        {"ratio": final_ratio, "strategy": "param-only"}))
        loaded_models.append(baseline.model.eval())
    latencies = interleaved_latency_ms([dense_ref, *loaded_models], inputs, spec.latency_repeats)
    dense_ms = latencies[0]
    rows[0].latency_ms = dense_ms
    for row, ms in zip(rows[2:], latencies[1:]):
        row.latency_ms = ms
    if reload_gap > 1e-3:
        raise CompVLMError(f"saved-and-reloaded pruned model differs from the pruned one (max |diff| {reload_gap:.2e})")
    zs_truth, zs = zero_shot_example(saved[final_ratio], data.world)

    say("-- 5/5 report")
    points = [("dense (test)", 1.0, dense_metrics["r1_mean"], "dense"),
              (f"dense + same {total_steps} steps (test)", 1.0, control_metrics["r1_mean"], "control")]
    points += [(f"{row.name} (test)", row.flops / dense_flops, row.metrics["r1_mean"], "pruned")
               for row in rows[2:]]
    plot = write_plot(out_dir / "plot.png", result.stage_log, points, "R@1 mean (%)", dense_val_metric)
    table = format_table(rows, dense_flops, dense_ms, ("r1_mean", "i2t_r1", "t2i_r1"))
    wall = time.perf_counter() - t_start
    report = {
        "model": spec.name, "ratio": ratio, "seed": seed, "device": device, "threads": torch.get_num_threads(),
        "reference": reference, "mean_text_length": text_length,
        "flops_share": {n: v / total for n, v in shares.items()},
        "rows": [{"name": r.name, "metrics": r.metrics, "flops": r.flops, "flops_kept": r.flops / dense_flops,
                  "params": r.params, "latency_ms_batch8": r.latency_ms, **r.extra} for r in rows],
        "stages": len(result.stage_log), "not_reached": result.not_reached, "total_steps": total_steps,
        "control_minus_dense": control_metrics["r1_mean"] - dense_metrics["r1_mean"], "control_se": control_se,
        "dense_train_seconds": dense.train_seconds, "dense_cached": dense.cached, "prune_seconds": prune_seconds,
        "wall_seconds": wall, "processor_gap": gap, "reload_gap": reload_gap,
        "zero_shot_example": {"truth": zs_truth, "top": zs[:3]},
        "settings": {k: v for k, v in asdict(spec).items()},
    }
    (out_dir / "report.json").write_text(json_text(report, indent=1))
    (out_dir / "report.md").write_text(
        f"# comp-vlm demo ({spec.name}, ratio {ratio}, seed {seed})\n\nTest split: {spec.n_test} synthetic pairs "
        f"(R@K in galleries of {spec.gallery_size}); "
        f"FLOPs per sample at {reference}; latency: batch {n}, median of {spec.latency_repeats} runs, "
        f"{torch.get_num_threads()} thread(s), {device}.\n\n```\n{table}\n```\n")
    show("")
    show(f"Retrieval on {spec.n_test} held-out synthetic pairs (R@1 in %, galleries of {spec.gallery_size}); "
         f"FLOPs per sample at "
         f"{spec.image_size}x{spec.image_size} px + {reference['text_length']} text tokens; latency: one forward "
         f"of batch {n}, median of {spec.latency_repeats} runs ({torch.get_num_threads()} thread(s), {device}). "
         "The dense rows run with the same dead-compute option as the pruned model.")
    show(table)
    show("")
    show(f"zero-shot pipeline on a new image of \"{zs_truth}\": " +
         "; ".join(f"{lab!r} {p:.2f}" for lab, p in zs[:3]))
    show(f"saved-and-reloaded vs in-memory pruned logits: max |diff| {reload_gap:.1e}")
    files = [("pruned model (+ tokenizer, image processor)", saved[final_ratio])]
    files += [(f"snapshot {ratio_key(r)}", saved[r]) for r in sorted(saved) if r != final_ratio]
    files += [("dense model (+ tokenizer, image processor)", dense_dir), ("stage log (JSONL)", log_path)]
    files += [("plot", plot)] if plot is not None else []
    files += [("report", out_dir / "report.json"), ("report (markdown)", out_dir / "report.md")]
    files += [("dense weights cache", dense.cache_path)] if dense.cache_path is not None else []
    width = max(len(label) for label, _ in files) + 1
    show("")
    show("files:")
    for label, path in files:
        show(f"  {label + ':':<{width}s} {Path(path).resolve()}")
    show(f"done in {wall:.0f} s.  Next: comp-vlm eval {saved[final_ratio]} --task retrieval --data synthetic ; "
         f"comp-vlm bench {saved[final_ratio]} --dense {dense_dir}")
    outputs.mark_complete(out_dir, "demo")
    return report


__all__ = ["run_demo"]
