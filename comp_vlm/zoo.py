"""Built-in models: the presets (model shape, synthetic data, dense training and the PruneConfig fields their
searches change: one type for the demo, ``comp-vlm prune --model demo-clip`` and the benchmarks), the one
CLIP-config builder, the synthetic world and its splits, and the dense built-in models, trained once and cached
as safetensors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dense import DenseTraining
from .errors import ConfigError
from .registry import register_once
from .report import say

#: PruneConfig fields a preset may not override: the run's target and identity, not how the model is searched
RUN_FIELDS = ("ratio", "snapshots", "strategy", "seed", "reference", "log_path", "checkpoint_dir", "resume", "progress")


@dataclass(frozen=True)
class ModelPreset:
    """A built-in model: a CLIP shape, its synthetic data, how to train it densely, and ``prune_overrides``, the
    ``PruneConfig`` fields its searches change (every other field is ``PruneConfig``'s default, as in the Python
    API). The architecture and data defaults are the built-in ``demo-clip``'s."""

    name: str
    description: str = ""
    family: str = "clip"  # the adapter family; its dense builder (DENSE_BUILDERS) makes the model
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
    # pruning: PruneConfig fields this preset changes (comp-vlm prune --help lists them)
    prune_overrides: dict[str, Any] = field(default_factory=dict)
    # measuring
    latency_repeats: int = 9
    latency_batch: int = 8

    def __post_init__(self) -> None:
        from .search.config import PruneConfig

        names = {f.name for f in fields(PruneConfig)} - set(RUN_FIELDS)
        unknown = sorted(set(self.prune_overrides) - names)
        if unknown:
            raise ConfigError(f"preset {self.name}: prune_overrides may set PruneConfig's search fields, not "
                              f"{', '.join(unknown)}")
        PruneConfig(**self.prune_overrides)  # their values are checked as PruneConfig's

    def prune_config(self, **values: Any) -> Any:
        """``PruneConfig`` with this preset's overrides, ``values`` on top."""
        from .search.config import PruneConfig

        return PruneConfig(**{**self.prune_overrides, **values})


#: The benchmark settings' search fields (benchmarks/bench_world.BenchSettings) -> the PruneConfig fields they set
LEGACY_SEARCH_FIELDS = {"stage_steps": "stage_steps", "flops_step": "flops_step", "finetune_steps": "finetune_steps",
                        "prune_lr": "lr", "calibration_batches": "calibration_batches",
                        "finetune_budget": "finetune_budget"}


@dataclass(frozen=True)
class Preset(ModelPreset):
    """A :class:`ModelPreset` whose search settings are fields (:data:`LEGACY_SEARCH_FIELDS`; None: PruneConfig's
    default), from which ``prune_overrides`` is derived. Kept as the base of the benchmarks' ``BenchSettings``, whose
    records hash these fields; the built-in models are plain ``ModelPreset``s."""

    prune_overrides: dict[str, Any] = field(default_factory=dict, init=False)
    stage_steps: int | None = None
    flops_step: float | None = None
    finetune_steps: int | None = None
    prune_lr: float | None = None
    calibration_batches: int | None = None
    finetune_budget: str | None = "equal-total"  # the emoji world's bench settings leave it at this

    def __post_init__(self) -> None:
        values = {name: getattr(self, attr) for attr, name in LEGACY_SEARCH_FIELDS.items()}
        object.__setattr__(self, "prune_overrides", {k: v for k, v in values.items() if v is not None})
        super().__post_init__()


BUILTINS: dict[str, ModelPreset] = {
    "demo-clip": ModelPreset(
        "demo-clip",
        "CLIP, 32 px images, patch 4, vision 64-d / text 128-d, 4+4 layers, 4 heads (~1M params), trained on "
        "the synthetic shapes world until more training no longer helps (2400 steps at lr 1e-3, cosine; "
        "benchmarks/results/demo_convergence.md)",
        prune_overrides={"stage_steps": 20, "finetune_steps": 300, "lr": 2e-4},  # lr: dense + as much training ~ dense
    ),
    "demo-clip-quick": ModelPreset(
        "demo-clip-quick",
        "a much smaller CLIP for tests: 16 px images of one shape, patch 4, 32-d, 3+3 layers, 4 heads; 200 "
        "training steps (seconds), R@1 about 60 in galleries of 32",
        image_size=16, patch_size=4, vision_hidden=32, text_hidden=32, layers=3, heads=4, mlp_ratio=4,
        projection_dim=16, max_positions=24, max_objects=1, n_train=512, n_val=64, n_test=64, batch_size=32,
        eval_batch_size=64, dense=DenseTraining(steps=200, lr=2e-3, warmup=5, weight_decay=0.05),
        prune_overrides={"stage_steps": 6, "flops_step": 0.2, "finetune_steps": 30, "lr": 5e-4,
                         "calibration_batches": 2},
        latency_repeats=7, gallery_size=32,
    ),
}


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Make ``preset`` a built-in model (``--model NAME``, the demo, the benchmarks); a name is registered once."""
    return register_once(BUILTINS, preset.name, preset, f"built-in model {preset.name!r}")


#: the preset ``prune`` and ``eval`` take data and batch defaults from for a model directory of the user's
DEFAULT_PRESET = "demo-clip"


def builtin_spec(name: str) -> ModelPreset:
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


def build_config(preset: ModelPreset, tokenizer: Any, width_scale: float = 1.0) -> Any:
    """The preset's ``CLIPConfig`` (both towers ``width_scale`` times as wide, heads unchanged)."""
    return clip_config(tokenizer, vision_hidden=int(preset.vision_hidden * width_scale),
                       text_hidden=int(preset.text_hidden * width_scale), layers=preset.layers, heads=preset.heads,
                       projection_dim=preset.projection_dim, image_size=preset.image_size,
                       patch_size=preset.patch_size, max_positions=preset.max_positions, mlp_ratio=preset.mlp_ratio)


def clip_dense(preset: ModelPreset, tokenizer: Any) -> tuple[Any, type]:
    """CLIP's dense builder: the preset's config and ``CLIPModel``."""
    from transformers import CLIPModel

    return build_config(preset, tokenizer), CLIPModel


#: (preset, tokenizer) -> (the dense model's config, its model class), by family: how :func:`builtin_dense` builds
#: a preset's model (the config is hashed for the weights cache before the model is made from it)
DenseBuilder = Callable[[ModelPreset, Any], tuple[Any, type]]
DENSE_BUILDERS: dict[str, DenseBuilder] = {}


def register_dense_builder(family: str, builder: DenseBuilder) -> DenseBuilder:
    """Make ``builder`` build the presets of ``family``; a family registers one."""
    return register_once(DENSE_BUILDERS, family, builder, f"a dense builder for family {family!r}")


def dense_builder(family: str) -> DenseBuilder:
    if family not in DENSE_BUILDERS:
        raise ConfigError(f"no dense builder for family {family!r} (families: {', '.join(DENSE_BUILDERS)})")
    return DENSE_BUILDERS[family]


register_dense_builder("clip", clip_dense)


def build_tokenizer(world: Any, preset: ModelPreset) -> Any:
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
    spec: ModelPreset
    source: str
    train_seconds: float = 0.0
    cached: bool = False
    cache_path: Path | None = None


def builtin_dense(spec: ModelPreset, seed: int, device: str, cache_dir: str | None, task: Any,
                  progress: bool = True) -> DenseModel:
    """The built-in model trained densely on the synthetic world (weights from the cache when present), built by
    its family's dense builder."""
    from .adapters.base import attn_implementation_for
    from .dense import cache_key, load_cached_weights, save_cached_weights, train_dense

    world = make_world(spec.image_size, spec.max_objects, seed)
    tokenizer = build_tokenizer(world, spec)
    data = synthetic_data(tokenizer, spec.image_size, spec.max_objects, seed, spec.n_train, spec.n_val, spec.n_test,
                          spec.batch_size, spec.eval_batch_size)
    config, model_class = dense_builder(spec.family)(spec, tokenizer)
    training = replace(spec.dense, seed=seed)
    key = cache_key(config, training, json.dumps(data.settings, sort_keys=True))  # before _from_config mutates it
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn_implementation_for(model_class))
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


__all__ = ["BUILTINS", "LEGACY_SEARCH_FIELDS", "RUN_FIELDS", "DenseModel", "ModelPreset", "Preset", "SyntheticData",
           "build_config", "build_tokenizer", "builtin_dense",
           "builtin_spec", "clip_config", "make_world", "synthetic_data", "synthetic_test_split"]
