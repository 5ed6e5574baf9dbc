"""Built-in models: the presets (model shape, synthetic data, dense training and pruning defaults: one type for the
demo, ``comp-vlm prune --model demo-clip`` and the benchmarks), the one CLIP-config builder, the synthetic world
and its splits, and the dense built-in models, trained once and cached as safetensors."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dense import DenseTraining
from .errors import ConfigError
from .loading import mean_text_length
from .report import say


@dataclass(frozen=True)
class Preset:
    """A CLIP shape, its synthetic data, how to train it densely and the pruning defaults (the demo's; ``comp-vlm
    prune`` takes them too unless given). The defaults are the built-in ``demo-clip``."""

    name: str
    description: str = ""
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
    gallery_size: int = 100  # R@K among this many candidates (consecutive galleries of the split)
    # dense training (its seed is the run's)
    dense: DenseTraining = field(default_factory=lambda: DenseTraining(steps=2400, lr=1e-3, warmup=50,
                                                                      weight_decay=0.05))
    # pruning
    ratio: float = 0.8
    snapshots: tuple[float, ...] = (0.5,)
    stage_steps: int = 20
    flops_step: float = 0.04
    finetune_steps: int = 300
    prune_lr: float = 2e-4  # one under which the dense model plus the same training stays within noise
    calibration_batches: int = 8
    finetune_budget: str = "equal-total"
    # measuring
    latency_repeats: int = 9
    latency_batch: int = 8

    def prune_options(self) -> dict[str, Any]:
        """The preset's search and fine-tuning lengths as ``PruneConfig`` keyword arguments."""
        return {"stage_steps": self.stage_steps, "flops_step": self.flops_step, "finetune_steps": self.finetune_steps,
                "calibration_batches": self.calibration_batches, "lr": self.prune_lr}


BUILTINS: dict[str, Preset] = {
    "demo-clip": Preset(
        "demo-clip",
        "CLIP, 32 px images, patch 4, vision 64-d / text 128-d, 4+4 layers, 4 heads (~1M params), trained on "
        "the synthetic shapes world until more training no longer helps (2400 steps at lr 1e-3, cosine; "
        "benchmarks/results/demo_convergence.md)",
    ),
    "demo-clip-quick": Preset(
        "demo-clip-quick",
        "a much smaller CLIP for tests: 16 px images of one shape, patch 4, 32-d, 3+3 layers, 4 heads; 200 "
        "training steps (seconds), R@1 about 60 in galleries of 32",
        image_size=16, patch_size=4, vision_hidden=32, text_hidden=32, layers=3, heads=4, mlp_ratio=4,
        projection_dim=16, max_positions=24, max_objects=1, n_train=512, n_val=64, n_test=64, batch_size=32,
        eval_batch_size=64, dense=DenseTraining(steps=200, lr=2e-3, warmup=5, weight_decay=0.05), snapshots=(0.5,),
        stage_steps=6, flops_step=0.2, finetune_steps=30, prune_lr=5e-4, calibration_batches=2, latency_repeats=7,
        gallery_size=32,
    ),
}


def builtin_spec(name: str) -> Preset:
    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    return BUILTINS[name]


# ---------------------------------------------------------------------------------------------------------------
# configs, tokenizers, worlds
# ---------------------------------------------------------------------------------------------------------------
def clip_config(tokenizer: Any, *, vision_hidden: int, text_hidden: int, layers: int, heads: int, projection_dim: int,
                image_size: int, patch_size: int, max_positions: int, mlp_ratio: int = 4, vision_mlp: int | None = None,
                text_mlp: int | None = None, text_layers: int | None = None, vocab_size: int | None = None,
                eos_token_id: int | None = None) -> Any:
    """A small ``CLIPConfig`` for the word-level ``tokenizer``: both towers ``layers`` deep (the text tower
    ``text_layers`` when given) with ``heads`` heads, MLPs ``mlp_ratio`` times as wide as the tower unless
    ``vision_mlp``/``text_mlp`` say otherwise. ``vocab_size`` and ``eos_token_id`` override the tokenizer's (tests
    of a vocabulary larger than the tokenizer's, of CLIP's other pooling rule). The built-ins, the benchmark models
    and the tests' tiny CLIPs all come from here."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": len(tokenizer) if vocab_size is None else vocab_size, "hidden_size": text_hidden,
        "intermediate_size": mlp_ratio * text_hidden if text_mlp is None else text_mlp,
        "num_hidden_layers": layers if text_layers is None else text_layers, "num_attention_heads": heads,
        "max_position_embeddings": max_positions,
        # EOS is the highest id, so CLIP's pooling rule (argmax or first EOS) picks it either way
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": vision_hidden, "intermediate_size": mlp_ratio * vision_hidden if vision_mlp is None else vision_mlp,
        "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_config(preset: Preset, tokenizer: Any, width_scale: float = 1.0) -> Any:
    """The preset's ``CLIPConfig`` (both towers ``width_scale`` times as wide, heads unchanged)."""
    return clip_config(tokenizer, vision_hidden=int(preset.vision_hidden * width_scale),
                       text_hidden=int(preset.text_hidden * width_scale), layers=preset.layers, heads=preset.heads,
                       projection_dim=preset.projection_dim, image_size=preset.image_size,
                       patch_size=preset.patch_size, max_positions=preset.max_positions, mlp_ratio=preset.mlp_ratio)


def build_tokenizer(world: Any, preset: Preset) -> Any:
    from .data.text import build_word_tokenizer

    return build_word_tokenizer(world.vocabulary(), model_max_length=preset.max_positions)


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
        return mean_text_length(self.loaders)


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
# dense built-in models, trained once and cached
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DenseModel:
    model: nn.Module
    tokenizer: Any
    image_processor: Any
    data: SyntheticData
    spec: Preset
    source: str
    train_seconds: float = 0.0
    cached: bool = False
    cache_path: Path | None = None


def builtin_dense(spec: Preset, seed: int, device: str, cache_dir: str | None, task: Any,
                  progress: bool = True) -> DenseModel:
    """The built-in model trained densely on the synthetic world (weights from the cache when present)."""
    from transformers import CLIPModel

    from .adapters.base import attn_implementation_for
    from .dense import cache_key, load_cached_weights, save_cached_weights, train_dense

    world = make_world(spec.image_size, spec.max_objects, seed)
    tokenizer = build_tokenizer(world, spec)
    data = synthetic_data(tokenizer, spec.image_size, spec.max_objects, seed, spec.n_train, spec.n_val, spec.n_test,
                          spec.batch_size, spec.eval_batch_size)
    config = build_config(spec, tokenizer)
    training = replace(spec.dense, seed=seed)
    key = cache_key(config, training, json.dumps(data.settings, sort_keys=True))  # before _from_config mutates it
    torch.manual_seed(seed)
    model = CLIPModel._from_config(config, attn_implementation=attn_implementation_for(CLIPModel))
    path = Path(cache_dir) / f"dense-{key}.safetensors" if cache_dir else None
    dense = DenseModel(model, tokenizer, data.world.image_processor(), data, spec, f"built-in {spec.name}",
                       cache_path=path)
    if path is not None and path.is_file() and load_cached_weights(path, model):
        dense.cached = True
        say(f"   dense weights loaded from the cache: {path}")
    else:
        say(f"   training the dense {spec.name} ({sum(p.numel() for p in model.parameters()):,} params): "
            f"{training.steps} steps of batch {spec.batch_size} on {spec.n_train} synthetic image-caption pairs, "
            f"AdamW lr {training.lr}, cosine")
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


__all__ = ["BUILTINS", "DenseModel", "Preset", "SyntheticData", "build_config", "build_tokenizer", "builtin_dense",
           "builtin_spec", "clip_config", "make_world", "synthetic_data", "synthetic_test_split"]
