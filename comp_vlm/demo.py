"""The offline demo and the pieces the CLI shares with it: built-in tiny CLIP configurations, the synthetic
retrieval data, dense training with a safetensors cache, latency measurement, the report table and the plot.

``comp-vlm demo`` = build the demo CLIP -> train it densely on the synthetic shapes world (cached) -> prune with
CoMP (search + fine-tune) -> evaluate, time and save everything (model + tokenizer + image processor, stage log,
plot, report).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import outputs
from .errors import CheckpointError, CompVLMError, ConfigError

log = logging.getLogger("comp_vlm")


_progress_lines = {"on": True}


def say(message: str) -> None:
    """One readable progress line on stdout (through tqdm, so progress bars stay intact); none when quiet."""
    if _progress_lines["on"]:
        tqdm.write(message)


def set_progress_lines(on: bool) -> bool:
    """Turn :func:`say`'s lines on or off (``-q``); returns the previous setting."""
    previous, _progress_lines["on"] = _progress_lines["on"], on
    return previous


# ---------------------------------------------------------------------------------------------------------------
# built-in models
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSpec:
    """A built-in CLIP configuration plus how to train it densely and how the demo prunes it."""

    name: str
    description: str
    # architecture
    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 64
    text_hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 64
    max_positions: int = 32
    # synthetic world and splits
    max_objects: int = 2
    n_train: int = 8192
    n_val: int = 512
    n_test: int = 512
    batch_size: int = 32
    eval_batch_size: int = 64
    # dense training
    dense_steps: int = 1500
    dense_lr: float = 2e-3
    dense_weight_decay: float = 0.05
    warmup_steps: int = 50
    # pruning defaults (the demo's; `comp-vlm prune` takes them too unless given)
    ratio: float = 0.8
    snapshots: tuple[float, ...] = (0.5,)
    stage_steps: int = 20
    flops_step: float = 0.04
    finetune_steps: int = 300
    prune_lr: float = 2e-4  # one under which the dense model plus the same training stays within noise
    calibration_batches: int = 8
    latency_repeats: int = 9
    latency_batch: int = 8
    gallery_size: int = 100  # R@K among this many candidates (consecutive galleries of the split)


BUILTINS: dict[str, DemoSpec] = {
    "demo-clip": DemoSpec(
        "demo-clip",
        "CLIP, 32 px images, patch 4, vision 64-d / text 128-d, 4+4 layers, 4 heads (~1M params), trained on "
        "the synthetic shapes world",
    ),
    "demo-clip-quick": DemoSpec(
        "demo-clip-quick",
        "a much smaller CLIP for tests: 16 px images of one shape, patch 4, 32-d, 3+3 layers, 4 heads; 200 "
        "training steps (seconds), R@1 about 60 in galleries of 32",
        image_size=16, patch_size=4, vision_hidden=32, text_hidden=32, layers=3, heads=4, mlp_ratio=4,
        projection_dim=16, max_positions=24, max_objects=1, n_train=512, n_val=64, n_test=64, batch_size=32,
        eval_batch_size=64, dense_steps=200, dense_lr=2e-3, warmup_steps=5, snapshots=(0.5,), stage_steps=6,
        flops_step=0.2, finetune_steps=30, prune_lr=5e-4, calibration_batches=2, latency_repeats=7, gallery_size=32,
    ),
}


def builtin_spec(name: str) -> DemoSpec:
    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def build_tokenizer(world: Any, spec: DemoSpec) -> Any:
    from .data.text import build_word_tokenizer

    return build_word_tokenizer(world.vocabulary(), model_max_length=spec.max_positions)


def clip_config(tokenizer: Any, *, vision_hidden: int, text_hidden: int, layers: int, heads: int,
                projection_dim: int, image_size: int, patch_size: int, max_positions: int, mlp_ratio: int = 4) -> Any:
    """A small ``CLIPConfig`` for the word-level ``tokenizer`` (same depth and heads in both towers), as the demo's
    built-ins and the benchmark model use it."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": mlp_ratio * text_hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": max_positions,
        # EOS is the highest id, so CLIP's pooling rule (argmax or first EOS) picks it either way
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": vision_hidden, "intermediate_size": mlp_ratio * vision_hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_config(spec: DemoSpec, tokenizer: Any) -> Any:
    return clip_config(tokenizer, vision_hidden=spec.vision_hidden, text_hidden=spec.text_hidden, layers=spec.layers,
                       heads=spec.heads, projection_dim=spec.projection_dim, image_size=spec.image_size,
                       patch_size=spec.patch_size, max_positions=spec.max_positions, mlp_ratio=spec.mlp_ratio)


def make_world(image_size: int, max_objects: int, seed: int, mean: Any = None, std: Any = None) -> Any:
    from .data.processor import ProcessorWorld

    return ProcessorWorld(image_size=image_size, max_objects=max_objects, seed=seed, mean=mean, std=std)


@dataclass
class SyntheticData:
    """The synthetic world, its splits and how they were made (recorded in the recipe for ``comp-vlm eval``)."""

    world: Any
    loaders: Any
    settings: dict

    @property
    def mean_text_length(self) -> float:
        """Mean unpadded caption length (tokens, BOS/EOS included) of the training texts."""
        return float(self.loaders.train.data.attention_mask.sum(1).float().mean())


def synthetic_data(tokenizer: Any, image_size: int, max_objects: int, seed: int, n_train: int, n_val: int,
                   n_test: int, batch_size: int, eval_batch_size: int, mean: Any = None,
                   std: Any = None) -> SyntheticData:
    from .data.synthetic import make_retrieval_loaders

    world = make_world(image_size, max_objects, seed, mean, std)
    if not 0 < batch_size <= n_train:
        raise ConfigError(f"batch size must lie in [1, n_train={n_train}], got {batch_size}")
    loaders = make_retrieval_loaders(world, tokenizer, n_train=n_train, n_val=n_val, n_test=n_test,
                                     batch_size=batch_size, seed=seed, eval_batch_size=eval_batch_size)
    settings = {"kind": "synthetic", "image_size": image_size, "max_objects": max_objects, "seed": seed,
                "n_train": n_train, "n_val": n_val, "n_test": n_test, "batch_size": batch_size,
                "eval_batch_size": eval_batch_size, "image_mean": list(world.image_mean),
                "image_std": list(world.image_std)}
    return SyntheticData(world, loaders, settings)


def synthetic_test_split(tokenizer: Any, settings: dict) -> list:
    """The test batches of :func:`synthetic_data` with the same settings (without building the other splits)."""
    from .data.synthetic import make_retrieval_loaders

    world = make_world(settings["image_size"], settings["max_objects"], settings["seed"],
                       settings.get("image_mean"), settings.get("image_std"))
    return make_retrieval_loaders(world, tokenizer, n_train=1, n_val=1, n_test=settings["n_test"], batch_size=1,
                                  seed=settings["seed"], eval_batch_size=settings["eval_batch_size"]).test


# ---------------------------------------------------------------------------------------------------------------
# dense training with a cache
# ---------------------------------------------------------------------------------------------------------------
def dense_training(spec: DemoSpec, seed: int) -> Any:
    from .dense import DenseTraining

    return DenseTraining(steps=spec.dense_steps, lr=spec.dense_lr, warmup=spec.warmup_steps,
                         weight_decay=spec.dense_weight_decay, seed=seed)


@dataclass
class DenseModel:
    model: nn.Module
    tokenizer: Any
    image_processor: Any
    data: SyntheticData
    spec: DemoSpec
    source: str
    train_seconds: float = 0.0
    cached: bool = False
    cache_path: Path | None = None


def builtin_dense(spec: DemoSpec, seed: int, device: str, cache_dir: str | None, task: Any,
                  progress: bool = True) -> DenseModel:
    """The built-in model trained densely on the synthetic world (weights from the cache when present)."""
    from transformers import CLIPModel

    from .dense import cache_key, load_cached_weights, save_cached_weights, train_dense

    world = make_world(spec.image_size, spec.max_objects, seed)
    tokenizer = build_tokenizer(world, spec)
    data = synthetic_data(tokenizer, spec.image_size, spec.max_objects, seed, spec.n_train, spec.n_val, spec.n_test,
                          spec.batch_size, spec.eval_batch_size)
    config = build_config(spec, tokenizer)
    training = dense_training(spec, seed)
    key = cache_key(config, training, json.dumps(data.settings, sort_keys=True))  # before _from_config mutates it
    torch.manual_seed(seed)
    model = CLIPModel._from_config(config, attn_implementation="sdpa")
    path = Path(cache_dir) / f"dense-{key}.safetensors" if cache_dir else None
    dense = DenseModel(model, tokenizer, data.world.image_processor(), data, spec, f"built-in {spec.name}",
                       cache_path=path)
    if path is not None and path.is_file() and load_cached_weights(path, model):
        dense.cached = True
        say(f"   dense weights loaded from the cache: {path}")
    else:
        say(f"   training the dense {spec.name} ({sum(p.numel() for p in model.parameters()):,} params): "
            f"{spec.dense_steps} steps of batch {spec.batch_size} on {spec.n_train} synthetic image-caption pairs, "
            f"AdamW lr {spec.dense_lr}, cosine")
        model.to(device)
        t0 = time.perf_counter()
        train_dense(model, task, data.loaders.train, training, progress=progress)
        dense.train_seconds = time.perf_counter() - t0
        val = task.evaluate(model, data.loaders.val)
        say(f"   dense training done in {dense.train_seconds:.0f} s (validation {task.primary_metric} "
            f"{val[task.primary_metric]:.1f})")
        if path is not None:
            save_cached_weights(path, model, {"training": asdict(training), "data": data.settings, "metrics": val,
                                              "model": spec.name, "train_seconds": dense.train_seconds})
            say(f"   dense weights cached: {path}")
    data.loaders.train.load_state_dict({"epoch": 0, "position": 0})  # the same batches next, cached or not
    model.to(device).eval()
    return dense


# ---------------------------------------------------------------------------------------------------------------
# loading user models
# ---------------------------------------------------------------------------------------------------------------
def load_clip_dir(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """A model directory: a comp-vlm pruned model (``comp_recipe.json``) or a plain transformers CLIPModel."""
    from .io import load_pruned
    from .recipe import RECIPE_FILE

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"model directory {p} does not exist" + outputs.leftovers_note(p))
    if (p / RECIPE_FILE).is_file():
        return load_pruned(p, device=device)
    return load_dense_dir(p, device)


def load_dense_dir(path: Path, device: str = "cpu") -> nn.Module:
    from transformers import AutoConfig, CLIPModel

    from .errors import UnsupportedModelError

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} holds no config.json: not a transformers model directory")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        pickles = ", ".join(sorted(p.name for p in path.glob("*.bin")))
        raise CheckpointError(f"{path} holds no model.safetensors" + (f" (only {pickles})" if pickles else "")
                              + ": comp-vlm loads safetensors weights only, never a pickle; convert it with "
                              "transformers' save_pretrained(..., safe_serialization=True)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json is unreadable: {str(exc).splitlines()[0]}") from None
    if getattr(config, "model_type", None) != "clip":
        raise UnsupportedModelError(
            f"{path} holds a {getattr(config, 'model_type', '?')!r} model; comp-vlm prunes CLIPModel checkpoints")
    from safetensors import SafetensorError

    try:
        model = CLIPModel.from_pretrained(str(path), attn_implementation="sdpa", use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load the model in {path}: {str(exc).strip().splitlines()[0]}") from None
    return model.to(device).eval()


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} holds no usable tokenizer (needed to tokenize captions): "
                              f"{str(exc).strip().splitlines()[0]}") from None


def load_image_processor(path: Path) -> Any | None:
    from transformers import AutoImageProcessor

    if not (path / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}/preprocessor_config.json is unreadable: {str(exc).strip().splitlines()[0]}") \
            from None


def processor_stats(processor: Any) -> tuple[list[float] | None, list[float] | None]:
    if processor is None:
        return None, None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None, None
    return [float(v) for v in mean], [float(v) for v in std]


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_latency_ms(models: list[nn.Module], inputs: dict, repeats: int, warmup: int = 2) -> list[float]:
    """Median forward latency (ms) of each model on the same inputs, timed in interleaved rounds (model 1, model
    2, ..., then again) so that a change in background load affects every model alike. Used by the demo,
    ``comp-vlm bench`` and ``benchmarks/speed.py``."""
    device = next(models[0].parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m.eval()
            for _ in range(warmup):
                m(**inputs)
        for _ in range(repeats):
            for i, m in enumerate(models):
                _sync(device)
                t0 = time.perf_counter()
                m(**inputs)
                _sync(device)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def dense_reference_model(dense: nn.Module, recipe: Any) -> nn.Module:
    """A copy of the dense model with the recipe's adapter options installed (keep ratio 1 everywhere): the
    dense reference whose FLOPs the recipe reports (e.g. with CLIP's dead-compute option)."""
    from .adapters.base import get_adapter, options_from_recipe

    ref = copy.deepcopy(dense)
    get_adapter(ref).install(options_from_recipe(recipe.options))
    object.__setattr__(ref, "comp_vlm_reference", dict(recipe.reference))
    return ref.eval()


@dataclass
class Row:
    name: str
    metrics: dict | None
    flops: int
    params: int
    latency_ms: float | None
    extra: dict = field(default_factory=dict)


def format_table(rows: list[Row], dense_flops: int, dense_latency: float | None, metric_keys: tuple[str, ...]) -> str:
    heads = {"r1_mean": "R@1 mean", "i2t_r1": "i2t R@1", "t2i_r1": "t2i R@1"}
    width = max(len(r.name) for r in rows) + 2
    cols = [f"{heads.get(k, k):>9s}" for k in metric_keys]
    header = (f"{'model':<{width}s}" + "".join(cols) + f"{'GFLOPs':>10s}{'kept':>8s}{'params':>11s}"
              f"{'latency ms':>12s}{'speed-up':>10s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        m = "".join(f"{r.metrics[k]:9.1f}" if r.metrics and k in r.metrics else f"{'-':>9s}" for k in metric_keys)
        lat = f"{r.latency_ms:12.2f}" if r.latency_ms is not None else f"{'-':>12s}"
        sp = (f"{dense_latency / r.latency_ms:9.2f}x" if r.latency_ms and dense_latency else f"{'-':>10s}")
        lines.append(f"{r.name:<{width}s}{m}{r.flops / 1e9:10.4f}{r.flops / dense_flops:8.1%}{r.params:11,d}{lat}{sp}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------------
def write_plot(path: Path, stage_log: list[dict], points: list[tuple[str, float, float, str]], metric_name: str,
               dense_val_metric: float | None = None) -> Path | None:
    """Left: metric vs FLOPs kept (the search trajectory on the validation batches, and the evaluated models on
    the test split). Right: the mode MPS chose at every stage, with the FLOPs kept after it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'comp-vlm[plot]')")
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = [r["flops_kept"] for r in stage_log if r.get("metric") is not None]
    ys = [r["metric"] for r in stage_log if r.get("metric") is not None]
    if xs:
        if dense_val_metric is not None:
            xs, ys = [1.0] + xs, [dense_val_metric] + ys
        ax.plot(xs, ys, "-", color="0.6", marker=".", label="search trajectory (val, before fine-tuning)")
    markers = {"dense": "s", "control": "D", "pruned": "o"}
    for label, kept, value, kind in points:
        ax.scatter([kept], [value], marker=markers.get(kind, "o"), s=60, zorder=3, label=label)
    ax.set_xlabel("FLOPs kept (fraction of dense)")
    ax.set_ylabel(metric_name)
    ax.set_xlim(1.05, 0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("quality vs compute")
    modes = sorted({r["mode"] for r in stage_log})
    if stage_log:
        stages = [r["stage"] for r in stage_log]
        idx = [modes.index(r["mode"]) for r in stage_log]
        colours = plt.cm.tab10(range(len(modes)))
        bx.scatter(stages, idx, c=[colours[i] for i in idx], s=70, zorder=3)
        bx.set_yticks(range(len(modes)), modes)
        bx.set_xlabel("stage")
        bx.set_ylabel("mode chosen by MPS")
        twin = bx.twinx()
        twin.plot(stages, [r["flops_kept"] for r in stage_log], "-", color="0.5", label="FLOPs kept")
        twin.set_ylabel("FLOPs kept after the stage")
        twin.set_ylim(0, 1.05)
        bx.grid(alpha=0.3)
        bx.set_title("multi-mode schedule (MPS)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------------------------
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
    from comp_vlm.engine import bootstrap_se, train_dense_control
    from comp_vlm.tasks.retrieval import RetrievalTask

    t_start = time.perf_counter()
    spec = BUILTINS["demo-clip-quick" if quick else "demo-clip"]
    ratio = spec.ratio if ratio is None else ratio
    snapshots = tuple(s for s in spec.snapshots if s < ratio)
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
    text_length = data.mean_text_length
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

    say(f"-- 2/5 CoMP search to {ratio:.0%} FLOPs removed (snapshots {', '.join(map(str, snapshots)) or 'none'}; "
        f"{spec.stage_steps} steps per stage, FLOPs step {spec.flops_step}), then {spec.finetune_steps} fine-tuning steps")
    log_path = out_dir / "stages.jsonl"
    if log_path.exists():
        log_path.unlink()
    config = comp_vlm.PruneConfig(
        ratio=ratio, snapshots=snapshots, strategy="comp", flops_step=spec.flops_step, stage_steps=spec.stage_steps,
        finetune_steps=spec.finetune_steps, calibration_batches=spec.calibration_batches, lr=spec.prune_lr,
        seed=seed, reference=reference, progress=progress, finetune_budget="equal-total",
    )
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
    total_steps = result.snapshots[final_ratio][1].extra.get("stage", 0) * spec.stage_steps + \
        result.snapshots[final_ratio][1].extra.get("finetune_steps", spec.finetune_steps)
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
    search_steps = result.snapshots[final_ratio][1].extra.get("stage", 0) * spec.stage_steps
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
        target = out_dir / "pruned" if r == max(result.snapshots) else out_dir / "snapshots" / f"r{r:.2f}"
        saved[r] = comp_vlm.save_pruned(model, target, recipe=recipe, tokenizer=dense.tokenizer,
                                        image_processor=dense.image_processor)
    write_jsonl(log_path, result.stage_log)
    check_saved_processor(saved[final_ratio], data.world)
    batch = data.loaders.test[0]
    n = min(spec.latency_batch, batch["pixel_values"].shape[0])
    mask = batch["attention_mask"][:n]
    cols = mask.any(0)
    inputs = {"pixel_values": batch["pixel_values"][:n], "input_ids": batch["input_ids"][:n][:, cols],
              "attention_mask": mask[:, cols]}
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
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "report.md").write_text(
        f"# comp-vlm demo ({spec.name}, ratio {ratio}, seed {seed})\n\nTest split: {spec.n_test} synthetic pairs "
        f"(R@K in galleries of {spec.gallery_size}); "
        f"FLOPs per sample at {reference}; latency: batch {n}, median of {spec.latency_repeats} runs, "
        f"{torch.get_num_threads()} thread(s), {device}.\n\n```\n{table}\n```\n")
    say("")
    say(f"Retrieval on {spec.n_test} held-out synthetic pairs (R@1 in %, galleries of {spec.gallery_size}); "
        f"FLOPs per sample at "
        f"{spec.image_size}x{spec.image_size} px + {reference['text_length']} text tokens; latency: one forward "
        f"of batch {n}, median of {spec.latency_repeats} runs ({torch.get_num_threads()} thread(s), {device}). "
        "The dense rows run with the same dead-compute option as the pruned model.")
    say(table)
    say("")
    say(f"zero-shot pipeline on a new image of \"{zs_truth}\": " +
        "; ".join(f"{lab!r} {p:.2f}" for lab, p in zs[:3]))
    say(f"saved-and-reloaded vs in-memory pruned logits: max |diff| {reload_gap:.1e}")
    files = [("pruned model (+ tokenizer, image processor)", saved[final_ratio])]
    files += [(f"snapshot {r:.2f}", saved[r]) for r in sorted(saved) if r != final_ratio]
    files += [("dense model (+ tokenizer, image processor)", dense_dir), ("stage log (JSONL)", log_path)]
    files += [("plot", plot)] if plot is not None else []
    files += [("report", out_dir / "report.json"), ("report (markdown)", out_dir / "report.md")]
    files += [("dense weights cache", dense.cache_path)] if dense.cache_path is not None else []
    width = max(len(label) for label, _ in files) + 1
    say("")
    say("files:")
    for label, path in files:
        say(f"  {label + ':':<{width}s} {Path(path).resolve()}")
    say(f"done in {wall:.0f} s.  Next: comp-vlm eval {saved[final_ratio]} --task retrieval --data synthetic ; "
        f"comp-vlm bench {saved[final_ratio]} --dense {dense_dir}")
    outputs.mark_complete(out_dir, "demo")
    return report


__all__ = ["BUILTINS", "DemoSpec", "builtin_dense", "builtin_spec", "run_demo"]
