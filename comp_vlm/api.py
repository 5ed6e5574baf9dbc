"""User-facing functions behind the command line: :func:`prune` (the search's), :func:`evaluate_dir` (``comp-vlm
eval``) and :func:`bench_dir` (``comp-vlm bench``). Each returns plain data; printing is the caller's."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .loading import (
    KARPATHY_ROLES,
    DataSource,
    check_data,
    check_data_for,
    check_fit,
    check_task_data,
    load_image_processor,
    load_model_dir,
    load_model_tokenizer,
    processor_stats,
    task_dir_data,
)
from .report import say
from .search import prune


def check_task(task: str, gallery_size: int | None = 0, eval_pairs: int | None = None) -> Any:
    """The registered task ``task`` (:func:`comp_vlm.tasks.register_task`) for the options; for retrieval
    ``gallery_size`` 0 means one gallery of every evaluation pair, None the default (100, or the whole split when it
    is smaller), and ``eval_pairs`` is the smallest split the task will evaluate (validation or test), which must
    fill one gallery."""
    from .tasks import make_task

    return make_task(task, gallery_size, eval_pairs)


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
def missing_data_error(model: str | os.PathLike, option: str, task: str = "retrieval") -> ConfigError:
    """The error for a model directory of the user's own given no data (``option``: ``--data`` or ``data=``):
    its captions and images are not the synthetic world's, so the data must be named (a task that reads its own
    format: a directory in that format)."""
    from .tasks import task_data

    space = " " if option.startswith("--") else ""
    if task_data(task) is not None:
        return ConfigError(f"{model} is a model directory of your own: name its data, {option}{space}DIR (a data "
                           f"directory in task {task}'s format)")
    return ConfigError(f"{model} is a model directory of your own: name its data, {option}{space}DIR (a COCO or "
                       f"Flickr30K directory in Karpathy's format) or {option}{space}synthetic (the built-in shapes "
                       "world, whose captions your tokenizer may not know)")


def install_dense(model: Any) -> None:
    """Install the adapter on a plain (dense) model, counting what it computes (no dead-compute option), so it runs
    through the adapter as a pruned model does (a family's own ``generate`` and masks included); a model whose
    adapter is installed already is left as it is."""
    import comp_vlm

    from .adapters.base import AdapterOptions

    adapter = comp_vlm.get_adapter(model)
    if not adapter.is_installed():
        adapter.install(AdapterOptions(dead_compute=False))


def _recorded_data(recorded: dict) -> DataSource:
    """Without ``data``: the data directory a pruned model was pruned on (recorded in its recipe), else the
    synthetic world."""
    if recorded.get("kind") == "karpathy":
        say(f"data: {recorded['json']}, as recorded with the model (--data to choose other data)")
        return check_data(recorded["json"], roles=("test",), what="the recorded data")
    if recorded.get("kind") == "task":
        say(f"data: {recorded['dir']}, as recorded with the model (--data to choose other data)")
        return check_task_data(recorded["task"], recorded["dir"], what="the recorded data")
    return DataSource("synthetic")


def _same_data(recorded: dict, source: DataSource) -> bool:
    """Whether a model is evaluated on the data it was pruned on (so the settings recorded with it apply)."""
    if source.kind == "task":
        return recorded.get("kind") == "task" and source.record() == {k: recorded.get(k) for k in source.record()}
    return recorded.get("kind", "synthetic") == source.kind and recorded.get("json") == source.record().get("json")


def _eval_settings(path: Path, source: DataSource, model: Any, processor: Any, recorded: dict, n_test: int | None,
                   seed: int | None) -> dict:
    """How the test split is made: a data directory's test split whole, or the synthetic test split of the
    settings ``recorded`` with a pruned model (``seed`` and ``n_test`` override them)."""
    from .zoo import BUILTINS, DEFAULT_PRESET

    spec = BUILTINS[DEFAULT_PRESET]
    eval_batch_size = recorded.get("eval_batch_size", spec.eval_batch_size)
    if source.kind == "karpathy":
        if n_test is not None:
            raise ConfigError("--n-test sizes the synthetic test split; the test split of a data directory is "
                              "used whole")
        if processor is None:
            raise ConfigError(f"{path} holds no image processor (preprocessor_config.json), needed to "
                              f"read the images of {source.json}")
        return {**source.record(), "n_test": source.pairs["test"], "eval_batch_size": eval_batch_size}
    mean, std = processor_stats(processor)
    return {
        "kind": "synthetic", "image_size": int(model.config.vision_config.image_size),
        "max_objects": int(recorded.get("max_objects") or spec.max_objects),
        "seed": seed if seed is not None else recorded.get("seed", 0),
        "n_test": n_test if n_test is not None else recorded.get("n_test", spec.n_test),
        "eval_batch_size": eval_batch_size,
        "image_mean": mean or recorded.get("image_mean"), "image_std": std or recorded.get("image_std"),
    }


def _task_test_split(path: Path, source: DataSource, model: Any, tokenizer: Any, processor: Any, recorded: dict,
                     n_test: int | None, seed: int | None) -> tuple[dict, list]:
    """The settings and test batches of a task's own data directory (its loader's test split, used whole)."""
    from .zoo import BUILTINS, DEFAULT_PRESET

    if n_test is not None:
        raise ConfigError("--n-test sizes the synthetic test split; the test split of a data directory is used whole")
    if processor is None:
        raise ConfigError(f"{path} holds no image processor (preprocessor_config.json), needed to read the images "
                          f"of {source.dir}")
    eval_batch_size = recorded.get("eval_batch_size", BUILTINS[DEFAULT_PRESET].eval_batch_size)
    seed = seed if seed is not None else recorded.get("seed", 0)
    loaded = task_dir_data(source, model, tokenizer, processor, 1, eval_batch_size, seed)  # train unused: batch 1
    return loaded.settings, loaded.loaders.test


def _eval_batches(settings: dict, model: Any, tokenizer: Any, processor: Any, progress: bool) -> list[dict]:
    """The test batches ``settings`` describe."""
    if settings["kind"] == "synthetic":
        from .zoo import synthetic_test_split

        test, where = synthetic_test_split(tokenizer, settings), "the synthetic world"
    else:
        from .data.karpathy import karpathy_batches

        test = karpathy_batches(settings["json"], KARPATHY_ROLES["test"][0], tokenizer, processor,
                                settings["eval_batch_size"], progress=progress)
        where = settings["json"]
    check_fit(model, test[0], max(b["input_ids"].shape[1] for b in test), where)
    return test


def evaluate_dir(path: str | os.PathLike, data: str | None = None, task: str | None = None,
                 gallery_size: int | None = None, n_test: int | None = None, seed: int | None = None,
                 device: str = "cpu", progress: bool = True, data_option: str = "data=") -> dict[str, Any]:
    """Task metrics of the model directory ``path`` (pruned, or a dense model of a registered class) on a test split, with its
    analytic FLOPs and parameters. ``task``: default the task recorded with a pruned model, else retrieval.
    ``data``: 'synthetic' or a Karpathy-format directory, or a directory in the format of a task that reads its own
    (default: the data recorded with a pruned model; a dense model needs it, and ``data_option`` is how the error
    names it); ``gallery_size``, ``n_test`` and ``seed`` default to the recorded ones when the data is the recorded
    data (0 galleries: one gallery of the whole split)."""
    import comp_vlm

    from .recipe import RECIPE_FILE

    path = Path(path)
    recipe = comp_vlm.read_recipe(path) if (path / RECIPE_FILE).is_file() else None
    task = task or (recipe.extra.get("task") if recipe else None) or "retrieval"  # the recorded task, else retrieval
    checked = check_task(task)
    source = check_data_for(task, data, roles=("test",)) if data is not None else None
    model = load_model_dir(path, device)
    checked.check_model(model)
    tokenizer = load_model_tokenizer(path, model)
    processor = load_image_processor(path)
    recorded = dict((recipe.extra.get("data") or {}) if recipe else {})
    if source is None and recipe is None:
        raise missing_data_error(path, data_option, task)
    source = source or _recorded_data(recorded)
    if not _same_data(recorded, source):
        recorded = {}
    if source.kind == "task":
        settings, test = _task_test_split(path, source, model, tokenizer, processor, recorded, n_test, seed)
    else:
        settings = _eval_settings(path, source, model, processor, recorded, n_test, seed)
        test = None
    gallery = gallery_size if gallery_size is not None else recorded.get("gallery_size")
    evaluated = check_task(task, gallery, settings["n_test"])
    if test is None:
        test = _eval_batches(settings, model, tokenizer, processor, progress=progress)
    if recipe is None:  # a plain transformers model runs through its adapter too, as the pruned one does
        install_dense(model)
    t0 = time.perf_counter()
    metrics = evaluated.evaluate(model, test)
    seconds = time.perf_counter() - t0
    if recipe is not None:
        reference = dict(recipe.reference)
    else:  # a plain transformers model: count what it computes (no dead-compute option), at the task's reference
        reference = {**comp_vlm.get_adapter(model).default_reference(), **split_reference(evaluated, test)}
    flops = comp_vlm.count_flops(model, reference)
    dense_flops = recipe.dense_flops if recipe else flops
    images = len({i for b in test for i in b["image_ids"]}) if source.kind == "karpathy" else settings["n_test"]
    gallery_size = getattr(evaluated, "gallery_size", 0)
    return {"model": str(path), "pruned": recipe is not None, "task": task, "data": settings, "split": "test",
            "n": settings["n_test"], "images": images, "gallery_size": gallery_size or settings["n_test"],
            "one_gallery": gallery_size is None,
            "seed": settings.get("seed"), "metrics": metrics, "primary_metric": evaluated.primary_metric,
            "flops": flops, "dense_flops": dense_flops, "flops_kept": flops / dense_flops,
            "params": comp_vlm.count_params(model), "reference": reference, "eval_seconds": seconds}


def split_reference(task: Any, test: list[dict]) -> dict[str, int]:
    """The reference lengths of a test split: the task's (:meth:`comp_vlm.tasks.base.Task.reference_lengths`)
    per-batch means, averaged over the batches and rounded."""
    from .tasks.base import mean_reference_lengths

    per_batch = [mean_reference_lengths(task, [batch]) for batch in test]
    return {key: round(sum(p[key] for p in per_batch) / len(per_batch)) for key in per_batch[0]}


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------
def bench_dir(path: str | os.PathLike, dense: str | os.PathLike | None = None, batch_sizes: tuple[int, ...] = (1, 8),
              text_lengths: tuple[int, ...] | None = None, repeats: int = 9, warmup: int = 2, seed: int = 0,
              device: str = "cpu") -> dict[str, Any]:
    """Measured latency and throughput of the pruned model directory ``path`` against its dense model (the
    directory ``dense``, or the dense architecture rebuilt from the pruned model's base config, random weights),
    with analytic FLOPs, at every batch size and text length (default: the recipe's reference length and twice
    it). Timing: median of ``repeats`` interleaved runs after ``warmup``."""
    import torch

    import comp_vlm

    from .adapters.base import get_adapter, options_from_recipe
    from .measure import bench_inputs, interleaved_latency_ms

    path = Path(path)
    pruned = load_model_dir(path, device)
    recipe = comp_vlm.read_recipe(path)
    if dense:
        dense_model = load_model_dir(Path(dense), device)
        dense_source = str(dense)
        from .adapters.base import config_hash

        if config_hash(dense_model.config) != recipe.base_config_hash:
            raise ConfigError(f"--dense {dense} is not the architecture {path} was pruned from "
                              "(base-config hash differs)")
    else:
        attn = get_adapter(pruned).attn_implementation
        dense_model = type(pruned)._from_config(pruned.config, attn_implementation=attn).to(device).eval()
        dense_source = "dense architecture from the pruned model's base config (random weights: speed and FLOPs " \
                       "do not depend on the weights)"
    # the dense reference runs with the recipe's options (e.g. CLIP's dead compute), as its FLOPs are counted
    get_adapter(dense_model).install(options_from_recipe(recipe.options))
    max_len = int(pruned.config.text_config.max_position_embeddings)
    ref_len = int(recipe.reference.get("text_length") or get_adapter(pruned).default_reference()["text_length"])
    lengths = text_lengths or tuple(sorted({min(ref_len, max_len), min(2 * ref_len, max_len)}))
    if max(lengths) > max_len:
        raise ConfigError(f"text length {max(lengths)} exceeds the model's max_position_embeddings ({max_len})")
    image_size = int(pruned.config.vision_config.image_size)
    results = []
    for b in batch_sizes:
        for length in lengths:
            inputs = bench_inputs(pruned, b, length, seed=seed)
            ref = {"image_size": image_size, "text_length": length}
            row: dict[str, Any] = {"batch": b, "text_length": length}
            times = interleaved_latency_ms([dense_model, pruned], inputs, repeats, warmup)
            for name, m, ms in (("dense", dense_model, times[0]), ("pruned", pruned, times[1])):
                row[name] = {"latency_ms": ms, "throughput": b / ms * 1e3, "flops": comp_vlm.count_flops(m, ref)}
            row["speedup"] = row["dense"]["latency_ms"] / row["pruned"]["latency_ms"]
            results.append(row)
    return {"pruned": str(path), "dense": dense_source, "device": device, "threads": torch.get_num_threads(),
            "repeats": repeats, "warmup": warmup, "image_size": image_size, "results": results,
            "pruned_params": comp_vlm.count_params(pruned), "dense_params": comp_vlm.count_params(dense_model),
            "flops_kept": recipe.flops_kept, "reference": recipe.reference, "options": recipe.options}


__all__ = ["bench_dir", "check_task", "evaluate_dir", "missing_data_error", "prune"]
