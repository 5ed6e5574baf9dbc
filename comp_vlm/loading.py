"""Loading what a user names: model directories (a comp-vlm pruned model or a dense transformers model of a class an
adapter is registered for, safetensors only, never a pickle), their tokenizers and image processors, and data (``--data``: the built-in
synthetic world or a Karpathy-format directory for retrieval, or a directory in the format of a task that reads its own),
each refused with a one-line error before any work when unfit (a task's own data: when its loader reads it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from . import outputs
from .errors import CheckpointError, ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


# ---------------------------------------------------------------------------------------------------------------
# model directories
# ---------------------------------------------------------------------------------------------------------------
def load_model_dir(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """A model directory: a comp-vlm pruned model (``comp_recipe.json``) or a dense model (:func:`load_dense_dir`)."""
    from .io import load_pruned
    from .recipe import RECIPE_FILE

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"model directory {p} does not exist" + outputs.leftovers_note(p))
    if (p / RECIPE_FILE).is_file():
        return load_pruned(p, device=device)
    return load_dense_dir(p, device)


def dense_model_class(path: Path, config: Any) -> type:
    """The registered model class (:func:`comp_vlm.adapters.base.register_adapter`) a dense directory's config
    names: the first of its ``architectures`` an adapter is registered for, else the first registered class of its
    ``model_type``. UnsupportedModelError for a model no adapter takes."""
    from .adapters.base import adapter_class_for, registered_model_classes
    from .errors import UnsupportedModelError

    for name in getattr(config, "architectures", None) or ():
        try:
            return adapter_class_for(name)[1]
        except UnsupportedModelError:
            continue
    model_type = getattr(config, "model_type", None)
    classes = registered_model_classes()
    for model_class in classes:
        if getattr(getattr(model_class, "config_class", None), "model_type", None) == model_type:
            return model_class
    raise UnsupportedModelError(f"{path} holds a {model_type or '?'!r} model; comp-vlm prunes "
                                f"{', '.join(c.__name__ for c in classes)} checkpoints")


def load_dense_dir(path: Path, device: str = "cpu") -> nn.Module:
    """A dense transformers model directory (``config.json`` + safetensors weights) as the registered model class
    its config names (:func:`dense_model_class`), built with its family's attention implementation."""
    from transformers import AutoConfig

    from .adapters.base import attn_implementation_for

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
    model_class = dense_model_class(path, config)
    from safetensors import SafetensorError

    try:  # mismatched shapes are reported, and refused, by check_loaded
        model, info = model_class.from_pretrained(str(path), attn_implementation=attn_implementation_for(model_class),
                                                  use_safetensors=True, ignore_mismatched_sizes=True,
                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load the model in {path}: {str(exc).strip().splitlines()[0]}") from None
    check_loaded(path, info)
    return model.to(device).eval()


def check_loaded(path: Path, info: dict) -> None:
    """Refuse a model whose weights do not fit its config.json (transformers would re-initialise or drop them):
    a tensor of another shape, weights the config has no place for, or parameters without weights."""
    where = f"{path}/config.json does not match {path}/model.safetensors"
    for key, *shapes in sorted(info.get("mismatched_keys") or (), key=lambda entry: entry[0]):
        saved, built = (tuple(s) for s in shapes[:2])
        raise CheckpointError(f"{where}: {key} has shape {saved} in the weights, {built} in the model the config "
                              "describes")
    for entry, meaning in (("unexpected_keys", "weights the config has no place for"),
                           ("missing_keys", "parameters the weights lack")):
        keys = sorted(info.get(entry) or ())
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise CheckpointError(f"{where}: {meaning} ({', '.join(keys[:3])}{more})")


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} holds no usable tokenizer (needed to tokenize captions): "
                              f"{str(exc).strip().splitlines()[0]}") from None


def load_model_tokenizer(path: Path, model: Any) -> Any:
    """The tokenizer saved with the model in ``path``. Refused when there is none (transformers would build an
    empty one) or when its ids run past the model's vocabulary."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}), needed to "
                              "tokenize captions: save the model's tokenizer with it")
    tokenizer = load_tokenizer(path)
    vocab = int(model.config.text_config.vocab_size)
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer in {path} has {len(tokenizer)} tokens, more than the model's vocabulary "
                          f"({vocab}): not the model's tokenizer")
    return tokenizer


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
# data: the synthetic world or a Karpathy-format directory
# ---------------------------------------------------------------------------------------------------------------
#: the Karpathy splits each role reads: COCO's restval joins train for the search and fine-tuning
KARPATHY_ROLES = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass(frozen=True)
class DataSource:
    """What ``--data`` names: the built-in synthetic world, or a Karpathy-format directory (COCO, Flickr30K): its
    JSON file and the caption pairs of each role it was checked for (see :data:`KARPATHY_ROLES`)."""

    kind: str  # "synthetic", "karpathy" or "task" (a directory in a task's own format, read by its loader)
    dir: Path | None = None
    json: Path | None = None
    pairs: dict[str, int] = field(default_factory=dict)
    task: str | None = None  # kind "task": the task whose registered loader reads ``dir``

    def record(self) -> dict[str, Any]:
        """How reports and recipes name the data."""
        if self.kind == "synthetic":
            return {"kind": "synthetic"}
        if self.kind == "task":
            return {"kind": "task", "task": self.task, "dir": str(self.dir)}
        return {"kind": "karpathy", "dir": str(self.dir), "json": str(self.json)}


class LoadedData(NamedTuple):
    """Retrieval loaders (``train``, ``val``, ``test``) and how they were made (recorded in the report and recipe);
    :class:`comp_vlm.zoo.SyntheticData` has the same two fields."""

    loaders: Any
    settings: dict[str, Any]


def check_data(data: str, roles: tuple[str, ...] = tuple(KARPATHY_ROLES), what: str = "--data") -> DataSource:
    """The data ``data`` names. A directory (or file) must hold a Karpathy JSON whose ``roles`` all have captions;
    the JSON is read here (not the images), so bad data is refused before any model is loaded."""
    if data == "synthetic":
        return DataSource("synthetic")
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"{what} {data}: no such directory (use --data synthetic for the built-in shapes world, "
                          "or a directory holding a Karpathy-format dataset_*.json)")
    from .data.files import require_nonempty
    from .data.karpathy import find_karpathy_json, read_karpathy

    found = find_karpathy_json(path).resolve()
    images = read_karpathy(found, check_images=False)
    pairs = {}
    for role in roles:
        chosen = [im for im in images if im.split in KARPATHY_ROLES[role]]
        require_nonempty(chosen, found, "+".join(KARPATHY_ROLES[role]), "images")
        pairs[role] = sum(len(im.captions) for im in chosen)
    return DataSource("karpathy", found.parent, found, pairs)


def check_task_data(task: str, data: str, what: str = "--data") -> DataSource:
    """The data directory ``data`` of a task that reads its own format (:func:`comp_vlm.tasks.task_data`); its
    contents are checked by the task's loader (:func:`task_dir_data`), which names the file and entry at fault."""
    if data == "synthetic":
        raise ConfigError(f"task {task} reads a data directory in its own format: {what} synthetic (the built-in "
                          "shapes world of retrieval) cannot serve it")
    path = Path(data)
    if not path.is_dir():
        raise ConfigError(f"{what} {data}: no such directory (task {task} reads a data directory in its own format)")
    return DataSource("task", path.resolve(), task=task)


def check_data_for(task: str, data: str, roles: tuple[str, ...] = tuple(KARPATHY_ROLES)) -> DataSource:
    """``data`` checked for ``task``: a directory in the task's own format (:func:`check_task_data`), else retrieval
    data (:func:`check_data`, the Karpathy ``roles`` it needs)."""
    from .tasks import task_data

    return check_task_data(task, data) if task_data(task) else check_data(data, roles=roles)


def task_dir_data(source: DataSource, model: Any, tokenizer: Any, processor: Any, batch_size: int,
                  eval_batch_size: int, seed: int) -> LoadedData:
    """The loaders of a task's data directory (``source``, kind "task") through the task's registered loader, the
    model's tokenizer and image processor; the settings record the directory and the samples of each split."""
    from .tasks import make_task, task_data

    if processor is None:
        raise ConfigError(f"the model directory holds no image processor (preprocessor_config.json), needed to "
                          f"read the images of {source.dir}")
    loaders = task_data(source.task)(source.dir, model, tokenizer, processor, batch_size, eval_batch_size, seed)
    task = make_task(source.task)
    for role in ("val", "test"):
        check_lengths_fit(model, sample_lengths(task, getattr(loaders, role)), f"the {role} split of {source.dir}")
    counts = {"n_train": len(loaders.train.data),
              **{f"n_{role}": sum(samples(task, b) for b in getattr(loaders, role)) for role in ("val", "test")}}
    settings = {**source.record(), **counts, "batch_size": batch_size, "eval_batch_size": eval_batch_size,
                "seed": seed}
    return LoadedData(loaders, settings)


#: the reference lengths that count text positions (the question or caption, and a decoder's answer)
TEXT_LENGTH_KEYS = ("text_length", "answer_length")


def sample_lengths(task: Any, batches: Any) -> dict[str, Any]:
    """Every sample's ``task.reference_lengths`` over ``batches``, one tensor by key."""
    import torch

    per_batch = [task.reference_lengths(b) for b in batches]
    return {key: torch.cat([p[key] for p in per_batch]) for key in (per_batch[0] if per_batch else {})}


def check_lengths_fit(model: Any, lengths: dict[str, Any], data: str) -> None:
    """Refuse texts (``lengths``' text and answer lengths, in tokens) longer than the model's text positions."""
    for key in TEXT_LENGTH_KEYS:
        if key in lengths:
            check_text_positions(model, int(lengths[key].max()), data, f"texts of {{}} tokens ({key})")


def check_text_positions(model: Any, tokens: int, data: str, what: str = "captions of {} tokens") -> None:
    """Refuse texts of ``tokens`` tokens (the longest of ``data``) when the model has fewer text positions."""
    positions = int(model.config.text_config.max_position_embeddings)
    if tokens > positions:
        raise ConfigError(f"the tokenizer makes {what.format(tokens)} from {data}, but the model has {positions} text "
                          f"positions: save the tokenizer with model_max_length={positions}")


def samples(task: Any, batch: Any) -> int:
    """The samples of ``batch`` (the length of its task's per-sample reference lengths)."""
    return int(next(iter(task.reference_lengths(batch).values())).shape[0])


def karpathy_data(source: DataSource, tokenizer: Any, processor: Any, batch_size: int, eval_batch_size: int,
                  seed: int, progress: bool) -> LoadedData:
    """The retrieval loaders of a Karpathy directory, its images through ``processor``, its captions through
    ``tokenizer``; the training batches are reshuffled every epoch from ``seed``."""
    from .data.karpathy import karpathy_loaders

    roles = KARPATHY_ROLES
    loaders = karpathy_loaders(source.json, tokenizer, processor, batch_size, eval_batch_size=eval_batch_size,
                               seed=seed, train_splits=roles["train"], val_split=roles["val"][0],
                               test_split=roles["test"][0], progress=progress)
    settings = {**source.record(), "splits": {r: list(s) for r, s in roles.items()},
                **{f"n_{r}": source.pairs[r] for r in roles}, "batch_size": batch_size,
                "eval_batch_size": eval_batch_size, "seed": seed}
    return LoadedData(loaders, settings)


def training_split_lengths(task: Any, loaders: Any, model: Any = None, data_name: str = "the data") -> dict[str, float]:
    """The means of ``task.reference_lengths`` over the whole training split (``loaders.train.data``): the FLOPs
    reference of ``comp-vlm prune`` and the demo. Retrieval pairs, which hold their captions as tensors, give their
    texts alone (images unread); other records go through the task's collator in record order, every record once
    (the shuffled loader is left where it is), and with ``model`` their texts must fit its text positions."""
    import torch

    from .tasks.base import mean_reference_lengths

    data = loaders.train.data
    if hasattr(data, "input_ids"):
        return mean_reference_lengths(task, [{"input_ids": data.input_ids, "attention_mask": data.attention_mask}])
    step = loaders.train.batch_size
    lengths = sample_lengths(task, (data.batch(torch.arange(i, min(i + step, len(data))))
                                    for i in range(0, len(data), step)))
    if model is not None:
        check_lengths_fit(model, lengths, f"the training split of {data_name}")
    return {key: float(values.double().mean()) for key, values in lengths.items()}


def check_fit(model: Any, batch: dict, text_length: int, data: str) -> None:
    """Refuse inputs ``model`` cannot take: images (``batch``'s) of another size than its own (the image
    processor's crop), captions (up to ``text_length`` tokens) longer than its text positions."""
    size = int(model.config.vision_config.image_size)
    shape = tuple(batch["pixel_values"].shape[-2:])
    if shape != (size, size):
        raise ConfigError(f"the image processor makes {shape[0]}x{shape[1]} images of {data}, but the model takes "
                          f"{size}x{size}: save the model with its own image processor")
    check_text_positions(model, text_length, data)
