"""comp-vlm command line: ``demo``, ``prune``, ``eval``, ``bench``.

Every failure prints one line ``comp-vlm: error: ...`` on stderr: usage errors (argparse) exit 2; errors from the
library (``CompVLMError``: bad option values, missing or corrupt models and recipes, output directories comp-vlm
must not write) and from the system (``OSError``: a full disk, no permission) exit 1. A closed output pipe (``comp-vlm
eval OUT | head``) ends the command quietly with exit 141, as a Unix tool killed by SIGPIPE. Results go to stdout;
progress bars, progress lines and log lines to stderr. Outputs follow :mod:`comp_vlm.outputs`: written complete or
not at all, never over files comp-vlm did not write.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from . import outputs, zoo
from .api import check_task, install_dense, missing_data_error
from .errors import CompVLMError, ConfigError, OutputError
from .loading import (
    DataSource,
    check_data_for,
    check_fit,
    karpathy_data,
    load_dense_dir,
    load_image_processor,
    load_model_tokenizer,
    processor_stats,
    task_dir_data,
    training_split_lengths,
)
from .report import json_text, say, set_progress_lines, write_json, write_jsonl
from .report import result as _result
from .validation import FieldError, ratio_key

PRUNE_REPLACES = ("prune-run", "pruned")  # the outputs `prune --overwrite` may replace


# ---------------------------------------------------------------------------------------------------------------
# shared setup
# ---------------------------------------------------------------------------------------------------------------
class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(f"comp-vlm: {record.getMessage()}", file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def _setup(args: argparse.Namespace) -> str:
    """Logging, threads and device; returns the device string."""
    import torch

    logger = logging.getLogger("comp_vlm")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
    logger.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logger.propagate = False
    set_progress_lines(not getattr(args, "quiet", False))
    try:
        from transformers.utils import logging as hf_logging

        if getattr(args, "verbose", False):  # transformers' warnings (unused weights, ...) on stderr
            hf_logging.set_verbosity_warning()
        else:
            hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    device = getattr(args, "device", "cpu") or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but CUDA is not available (torch sees no GPU)")
    return device


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return values


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _gallery_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--gallery-size", type=int, default=None, metavar="N",
                        help="retrieval R@K among N candidates, averaged over consecutive galleries of the split "
                             f"(0: the whole split is one gallery; default: {default})")


def _check_json_path(option: str, path: str | None) -> None:
    """Refuse a ``--json`` file that cannot be written, before any work is done."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{option} {path} is a directory: give a file name")
    outputs.check_writable(target.parent, f"{option} {path}")


def _describe_data(settings: dict) -> str:
    """One line on the data of a search: where from, pairs (samples of a task's own data) per split."""
    where = {"synthetic": "synthetic world", "task": settings.get("dir")}.get(settings["kind"], settings.get("json"))
    unit = "samples" if settings["kind"] == "task" else "pairs"
    return f"{where}, {settings['n_train']} train / {settings['n_val']} val / {settings['n_test']} test {unit}"


# ---------------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    device = _setup(args)
    report = run_demo(args.out, ratio=args.ratio, seed=args.seed, device=device, quick=args.quick,
                      cache_dir=None if args.no_cache else args.cache, progress=not args.quiet)
    if args.quiet:
        dense, final = report["rows"][0], report["rows"][-1]
        _result(f"{final['name']}: R@1 {final['metrics']['r1_mean']:.1f} (dense {dense['metrics']['r1_mean']:.1f}), "
                f"{final['flops_kept']:.1%} of dense FLOPs; outputs in {Path(args.out).resolve()}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------------------------
def _check_prune_data(args: argparse.Namespace, source: DataSource, spec: Any) -> int | None:
    """Refuse options that do not fit the data, before any work; returns the pairs of the smaller evaluation split
    (validation or test), which must fill a gallery (None for a task's own data, which has no galleries; its loader
    checks the batch size)."""
    if source.kind == "synthetic":
        return min(args.n_val or spec.n_val, args.n_test or spec.n_test)
    if args.model in zoo.BUILTINS:
        raise ConfigError(f"--data {args.data} needs --model DIR, a model directory with the tokenizer and image "
                          f"processor for its captions and images (built-in {args.model} knows only the synthetic "
                          "world's words)")
    if any(v is not None for v in (args.n_train, args.n_val, args.n_test)):
        raise ConfigError("--n-train/--n-val/--n-test size the synthetic world's splits; the splits of a data "
                          "directory are used whole")
    if source.kind == "task":
        return None
    batch = args.batch_size or spec.batch_size
    if batch > source.pairs["train"]:
        raise ConfigError(f"the training batch size {batch} (--batch-size) exceeds the {source.pairs['train']} "
                          f"training pairs of {source.json}")
    return min(source.pairs["val"], source.pairs["test"])


def _model_path(args: argparse.Namespace) -> Path:
    """``--model`` as an existing path (not a built-in model)."""
    path = Path(args.model)
    if not path.exists():
        raise ConfigError(f"--model {args.model}: no such directory, and not a built-in model "
                          f"(built-ins: {', '.join(zoo.BUILTINS)})")
    return path


def _prune_data(args: argparse.Namespace) -> DataSource:
    """``--data`` checked for the task (:func:`comp_vlm.loading.check_data_for`); without it the synthetic world for
    a built-in model, which was trained on it. A model directory must name its data."""
    data = args.data
    if data is None:
        if args.model not in zoo.BUILTINS:
            raise missing_data_error(_model_path(args), "--data", args.task)
        data = "synthetic"
    return check_data_for(args.task, data)


def _longest_caption(loaders: Any) -> int:
    """Tokens of the longest caption (padding included) of every split."""
    return max([loaders.train.data.input_ids.shape[1]] + [b["input_ids"].shape[1] for b in loaders.val + loaders.test])


def _resolve_model(args: argparse.Namespace, task: Any, device: str, source: DataSource) -> dict:
    """The dense model (refused unless it runs ``task``), its tokenizer and image processor, and the data: the
    directory ``source`` (Karpathy's format, or the task's own through its registered loader) read through them,
    or the synthetic world made for the model."""
    if args.model in zoo.BUILTINS:
        spec = zoo.builtin_spec(args.model)
        if any(v is not None for v in (args.n_train, args.n_val, args.n_test, args.batch_size)):
            raise ConfigError("--n-train/--n-val/--n-test/--batch-size cannot change a built-in model's data "
                              "(its dense weights are trained on it); pass a model directory instead")
        dense = zoo.builtin_dense(spec, args.seed, device, None if args.no_cache else args.cache, task,
                                  progress=not args.quiet)
        return {"model": dense.model, "tokenizer": dense.tokenizer, "image_processor": dense.image_processor,
                "data": dense.data, "spec": spec, "source": dense.source}
    path = _model_path(args)
    from .recipe import RECIPE_FILE

    if (path / RECIPE_FILE).is_file():
        raise ConfigError(f"{path} is already pruned (it holds {RECIPE_FILE}); prune its dense model instead")
    model = load_dense_dir(path, device)
    task.check_model(model)
    tokenizer = load_model_tokenizer(path, model)
    processor = load_image_processor(path)
    spec = zoo.BUILTINS[zoo.DEFAULT_PRESET]
    batch = args.batch_size or spec.batch_size
    if source.kind == "task":
        data = task_dir_data(source, model, tokenizer, processor, batch, spec.eval_batch_size, args.seed)
    elif source.kind == "karpathy":
        if processor is None:
            raise ConfigError(f"{path} holds no image processor (preprocessor_config.json), needed to read the "
                              f"images of --data {args.data}")
        data = karpathy_data(source, tokenizer, processor, batch, spec.eval_batch_size, args.seed, not args.quiet)
        check_fit(model, data.loaders.val[0], _longest_caption(data.loaders), str(source.json))
    else:
        mean, std = processor_stats(processor)
        image_size = int(model.config.vision_config.image_size)
        data = zoo.synthetic_data(
            tokenizer, image_size, spec.max_objects, args.seed, args.n_train or spec.n_train,
            args.n_val or spec.n_val, args.n_test or spec.n_test, batch, spec.eval_batch_size, mean, std)
        check_fit(model, data.loaders.val[0], _longest_caption(data.loaders), "the synthetic world")
        if processor is None:
            processor = data.world.image_processor()
            say(f"{path} has no image processor: using the synthetic world's normalisation "
                f"(mean {data.world.image_mean}, std {data.world.image_std}) and saving it with the pruned model")
    return {"model": model, "tokenizer": tokenizer, "image_processor": processor, "data": data, "spec": spec,
            "source": str(path)}


def _check_out(args: argparse.Namespace, out: Path) -> None:
    """Refuse an ``--out`` that comp-vlm must not or cannot write, before any work (:func:`outputs.check_target`:
    the model or current directory or a parent of one, foreign files, an earlier output without --overwrite, a
    place that cannot be written)."""
    outputs.recover(out)
    outputs.check_target(out, overwrite=args.overwrite, what="--out", protected=_model_dirs(args),
                         replace_kinds=PRUNE_REPLACES, hint="--overwrite")


def _check_checkpoint_dir(args: argparse.Namespace, out: Path, ckpt: Path) -> None:
    """The same for the checkpoint directory, which must not hold or lie in ``out`` either; an earlier search's
    checkpoint there needs --resume (continue it) or --overwrite (start over)."""
    from . import checkpoint

    found = checkpoint.has_checkpoint(ckpt)
    outputs.check_target(ckpt, overwrite=True, what="--checkpoint-dir", protected=[*_model_dirs(args), out],
                         replace_kinds=(checkpoint.KIND,))
    if out.resolve() in ckpt.resolve().parents:
        raise OutputError(f"--checkpoint-dir {ckpt} lies in --out {out}: choose a directory outside it")
    if found and not (args.resume or args.overwrite):
        raise OutputError(f"--checkpoint-dir {ckpt} holds the checkpoint of an earlier search: pass --resume to "
                          "continue it, or --overwrite to start over")
    if args.resume and not found:
        say(f"--resume: no search checkpoint in {ckpt}; starting a new search")


def _model_dirs(args: argparse.Namespace) -> list[str]:
    """The model directory as a list (empty for a built-in model)."""
    return [] if args.model in zoo.BUILTINS else [args.model]


def _write_run(out: Path, args: argparse.Namespace, result: Any, src: dict, report: dict) -> dict[float, Path]:
    """The pruned model, its snapshots, the stage log and the report in ``out``, complete or not at all. Returns
    the final directory of every snapshot."""
    import comp_vlm

    from .io import write_pruned_files

    final = max(result.snapshots)
    dirs = {r: out if r == final else out / "snapshots" / f"r{ratio_key(r)}" for r in result.snapshots}
    extras = {"tokenizer": src["tokenizer"], "image_processor": src["image_processor"]}
    with outputs.staged(out, "prune-run", overwrite=args.overwrite, what="--out", protected=_model_dirs(args),
                        replace_kinds=PRUNE_REPLACES, hint="--overwrite") as tmp:
        write_pruned_files(result.model, tmp, recipe=result.recipe, **extras)
        for r, (m, recipe) in sorted(result.snapshots.items()):
            if r != final:
                comp_vlm.save_pruned(m, tmp / dirs[r].relative_to(out), recipe=recipe, **extras)
        write_jsonl(tmp / "stages.jsonl", result.stage_log)
        for r, d in dirs.items():
            report["snapshots"][ratio_key(r)]["dir"] = str(d)
        (tmp / "report.json").write_text(json_text(report, indent=1))
    return dirs


def _percent(ratio: float) -> str:
    """A target ratio as a percentage, as precise as its :func:`ratio_key` (0.8 -> 80%, 0.333 -> 33.3%)."""
    return f"{100 * float(ratio_key(ratio)):.{max(0, len(ratio_key(ratio)) - 4)}f}%"


#: flag of every ``PruneConfig`` field that ``prune`` takes from one, to name in errors
PRUNE_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "ratio", "snapshots", "strategy", "flops_step", "stage_steps", "finetune_steps", "calibration_batches", "lr",
    "distill", "seed", "checkpoint_dir", "resume")}


def _prune_config(settings: dict) -> Any:
    """``PruneConfig(**settings)``; an error about a field set by a flag names the flag."""
    import comp_vlm

    try:
        return comp_vlm.PruneConfig(**settings)
    except FieldError as exc:
        flags = {**PRUNE_FLAGS, **{name: "--" + name.replace("_", "-") for name in SEARCH_OPTIONS}}
        raise ConfigError(exc.renamed(flags)) from None


def cmd_prune(args: argparse.Namespace) -> int:
    with outputs.run_lock(args.out):  # the one place a run locks its --out (under torchrun: rank 0's)
        return _prune(args)


def _prune(args: argparse.Namespace) -> int:
    import comp_vlm

    from . import checkpoint
    from .search import state as search_state

    device = _setup(args)
    source = _prune_data(args)
    spec = zoo.BUILTINS.get(args.model, zoo.BUILTINS[zoo.DEFAULT_PRESET])
    task = check_task(args.task, args.gallery_size, _check_prune_data(args, source, spec))
    snapshots = tuple(s for s in (args.snapshots or ()) if s != args.ratio)
    out = Path(args.out)
    _check_out(args, out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".ckpt")
    _check_checkpoint_dir(args, out, ckpt)
    settings = {"ratio": args.ratio, "snapshots": snapshots, "strategy": args.strategy, "seed": args.seed,
                **search_settings(args), "checkpoint_dir": str(ckpt), "resume": args.resume,
                "progress": not args.quiet}
    _prune_config(settings)  # validate the options before loading or training anything (errors name the flags)
    src = _resolve_model(args, task, device, source)
    model, data = src["model"], src["data"]
    lengths = {key: round(value) for key, value in
               training_split_lengths(task, data.loaders, model, data.settings.get("dir", "the data")).items()}
    if args.text_length:
        lengths["text_length"] = args.text_length
    reference = {**comp_vlm.get_adapter(model).default_reference(), **lengths}
    config = _prune_config({**settings, "reference": reference})
    identity = search_state.check_resume(config, search_state.run_identity(model, data.settings, src["source"]))
    say(f"model: {src['source']} ({comp_vlm.count_params(model):,} params); data: {_describe_data(data.settings)}")
    dense_params = comp_vlm.count_params(model)
    install_dense(model)  # the model runs through its adapter (e.g. a family's own generate), as in the search
    dense_metrics = task.evaluate(model, data.loaders.test)
    say(f"dense test {task.primary_metric}: {dense_metrics[task.primary_metric]:.2f}")
    say(f"CoMP search ({args.strategy}) to ratio {args.ratio}; FLOPs reference {reference}; "
        f"search checkpoints in {ckpt}" + (" (resuming)" if args.resume else ""))
    result = comp_vlm.prune(model, task, data.loaders.train, data.loaders.val, config, test_data=data.loaders.test,
                             identity=identity)
    extra = {"data": {**data.settings, "gallery_size": getattr(task, "gallery_size", 0) or 0},
             "dense_model": src["source"], "task": args.task}
    for r, (_, recipe) in result.snapshots.items():
        recipe.extra.update(extra)
    dense_flops = result.recipe.dense_flops
    report = {
        "model": src["source"], "task": args.task, "data": data.settings, "config": config.fingerprint(),
        "reference": reference, "dense": {"metrics": dense_metrics, "flops": dense_flops, "params": dense_params},
        "snapshots": {ratio_key(r): {"metrics": result.metrics.get(r), "flops": rec.pruned_flops,
                                   "flops_kept": rec.flops_kept, "params": comp_vlm.count_params(m)}
                      for r, (m, rec) in sorted(result.snapshots.items())},
        "not_reached": result.not_reached, "stages": len(result.stage_log), "seconds": result.seconds,
    }
    dirs = _write_run(out, args, result, src, report)
    if not args.keep_checkpoint:
        outputs.remove(ckpt, checkpoint.KIND)
    key = task.primary_metric
    _result("")
    _result(f"{'':24s}{key:>10s}{'GFLOPs':>10s}{'kept':>8s}{'params':>11s}")
    _result(f"{'dense':24s}{dense_metrics[key]:10.2f}{dense_flops / 1e9:10.4f}{1:8.1%}{dense_params:11,d}")
    for r, (m, rec) in sorted(result.snapshots.items()):
        met = result.metrics.get(r, {}).get(key, float("nan"))
        _result(f"{'CoMP ' + _percent(r) + ' removed':24s}{met:10.2f}{rec.pruned_flops / 1e9:10.4f}"
                f"{rec.flops_kept:8.1%}{comp_vlm.count_params(m):11,d}")
    if result.not_reached:
        _result(f"not reached: {', '.join(map(str, result.not_reached))}")
    _result(f"search + fine-tuning: {result.seconds:.0f} s, {len(result.stage_log)} stages")
    _result(f"pruned model: {out.resolve()}")
    for r, d in sorted(dirs.items()):
        if d != out:
            _result(f"snapshot {ratio_key(r)}: {d.resolve()}")
    _result(f"stage log: {(out / 'stages.jsonl').resolve()}; report: {(out / 'report.json').resolve()}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_dir

    device = _setup(args)
    _check_json_path("--json", args.json)
    result = evaluate_dir(args.model_dir, data=args.data, task=args.task, gallery_size=args.gallery_size,
                          n_test=args.n_test, seed=args.seed, device=device, progress=not args.quiet,
                          data_option="--data")
    flops, dense_flops, settings = result["flops"], result["dense_flops"], result["data"]
    kind = "pruned (" + format(1 - flops / dense_flops, ".0%") + " FLOPs removed)" if result["pruned"] else "dense"
    print(f"{result['model']}: {kind}, {result['params']:,} params, {flops / 1e9:.4f} GFLOPs per sample at "
          f"{result['reference']}")
    galleries = "one gallery" if result["one_gallery"] else f"galleries of {result['gallery_size']}"
    if settings["kind"] == "task":
        print(f"{settings['dir']} test split ({result['task']}): {settings['n_test']} samples")
    elif settings["kind"] == "synthetic":
        print(f"synthetic test split: {settings['n_test']} pairs ({galleries}), seed {settings['seed']}")
    else:
        images = result["images"]
        print(f"{settings['json']} test split: {settings['n_test']} captions of {images} image{'s' * (images != 1)} "
              f"({galleries})")
    metrics, key = result["metrics"], result["primary_metric"]
    width = max(10, *map(len, metrics))
    for k in [key] + [k for k in metrics if k != key]:
        print(f"  {k:{width}s} {metrics[k]:8.2f}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------
def _bench_table(results: list[dict]) -> list[str]:
    """The lines of ``comp-vlm bench``'s table: dense and pruned at every batch size and text length."""
    header = (f"{'batch':>5s}{'text len':>9s}  {'model':8s}{'GFLOPs/sample':>14s}{'latency ms':>12s}"
              f"{'samples/s':>11s}{'speed-up':>10s}")
    lines = [header, "-" * len(header)]
    for row in results:
        for name in ("dense", "pruned"):
            r = row[name]
            sp = f"{row['speedup']:9.2f}x" if name == "pruned" else f"{'':10s}"
            lines.append(f"{row['batch']:5d}{row['text_length']:9d}  {name:8s}{r['flops'] / 1e9:14.4f}"
                         f"{r['latency_ms']:12.2f}{r['throughput']:11.1f}{sp}")
    return lines


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import bench_dir

    device = _setup(args)
    _check_json_path("--json", args.json)
    out = bench_dir(args.model_dir, dense=args.dense, batch_sizes=args.batch_sizes, text_lengths=args.text_lengths,
                    repeats=args.repeats, warmup=args.warmup, seed=args.seed, device=device)
    print(f"pruned: {out['pruned']} ({out['pruned_params']:,} params, {out['flops_kept']:.1%} of dense FLOPs at "
          f"{out['reference']})")
    print(f"dense:  {out['dense']} ({out['dense_params']:,} params)")
    print(f"one forward of image + text (both towers), median of {out['repeats']} interleaved runs after "
          f"{out['warmup']} warm-up; {device}, {out['threads']} thread(s); dense runs with the pruned model's options "
          f"({out['options']})")
    print("\n".join(_bench_table(out["results"])))
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser, seed_default: int | None = 0) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run (default: cpu)")
    parser.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                        help="torch CPU threads (default: 1; 2 threads are ~1.5x faster on an idle 2-core machine "
                             "but slow down badly when another process keeps a core busy)")
    parser.add_argument("--seed", type=int, default=seed_default, metavar="N",
                        help="random seed" + (f" (default: {seed_default})" if seed_default is not None else ""))
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars, progress lines or info log lines: results and errors only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the warnings of transformers (muted by default), e.g. unused weights")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other error: ``comp-vlm: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"comp-vlm: error: {message} (see '{self.prog} --help')\n")


#: PruneConfig fields that ``prune`` takes as they are, one flag each (``--cost-measure`` for ``cost_measure``)
SEARCH_OPTIONS = ("cost_measure", "selection", "token_plan", "token_max_cut", "token_floor", "token_scorer",
                  "token_reducer", "warmup_order", "sliver_fraction", "lr_schedule", "finetune_schedule", "finetune_budget",
                  "param_max_cut")
#: The PruneConfig fields of ``prune``'s search flags: unset (None), a field is a built-in model's preset override
#: (``zoo.ModelPreset.prune_overrides``), else PruneConfig's default
SEARCH_FIELDS = ("flops_step", "stage_steps", "finetune_steps", "calibration_batches", "lr", "distill",
                 *SEARCH_OPTIONS)


def search_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The search fields of ``prune``'s PruneConfig: a built-in model's preset overrides, the flags given on top
    (a model directory: the flags given only; every other field is PruneConfig's default)."""
    preset = zoo.BUILTINS[args.model].prune_overrides if args.model in zoo.BUILTINS else {}
    return {**preset, **{name: getattr(args, name) for name in SEARCH_FIELDS if getattr(args, name) is not None}}


def _default_help(name: str) -> str:
    """The help's ``(default: ...)`` of a PruneConfig flag: the Python API's default."""
    from .search.config import PruneConfig

    value = getattr(PruneConfig(), name)
    return f"(default: {','.join(map(str, value)) or 'none'})" if isinstance(value, tuple) else f"(default: {value})"


def _preset_overrides() -> str:
    """What the built-in presets change in PruneConfig's defaults, for ``prune --help``."""
    return "; ".join(f"{name} overrides " + ", ".join(f"{k}={v}" for k, v in preset.prune_overrides.items())
                     for name, preset in zoo.BUILTINS.items() if preset.prune_overrides)


def _search_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of :data:`SEARCH_OPTIONS`: defaults (help) from ``PruneConfig()``, choices from the engine's tables,
    ranges from :data:`comp_vlm.validation.RANGES` (checked by ``PruneConfig``)."""
    from . import importance
    from .adapters.runtime import TOKEN_REDUCERS, TOKEN_SCORERS
    from .search import budget
    from .search.config import COST_MEASURES, FINETUNE_BUDGETS, LR_SCHEDULES, WARMUP_ORDERS
    from .validation import RANGES

    specs: dict[str, tuple[Any, str]] = {
        "cost_measure": (COST_MEASURES, (
            "MPS stage cost: validation loss after the stage's recovery training ('recovered'), right after the "
            "removal, before training ('immediate'), or 'probe': measure every live mode's immediate cost at every "
            "stage start, then choose")),
        "selection": (importance.SELECTIONS, (
            "how heads and neurons are ranked for removal: importance per FLOP ('per-flop'), or importance density "
            "ranked per layer ('layer-rank'), per tower and unit kind ('kind-rank'), or standardised per tower and "
            "unit kind ('kind-zscore')")),
        "token_plan": (budget.TOKEN_PLANS, (
            "how a token mode's level spreads over its sites: cumulative keep falling linearly or geometrically "
            "with depth, or 'legacy' (every site keeps the same share, no bounds)")),
        "token_max_cut": (float, "a stage removes at most this share of the tokens left at any site"),
        "token_floor": (float, "every site keeps at least this share of the prunable tokens entering its tower"),
        "token_scorer": (tuple(TOKEN_SCORERS), (
            "how token sites rank tokens: attention (CIT, Eq. 6-7) or 'random' (uniform, seeded by --seed: the "
            "token-random baseline)")),
        "token_reducer": (tuple(TOKEN_REDUCERS), (
            "what token sites do with the tokens they do not keep: drop them, fuse each pool's into one token "
            "(score-weighted mean), or merge each into its most similar kept token (ToMe)")),
        "warmup_order": (WARMUP_ORDERS,
                         "order in which MPS first tries each mode: a seeded permutation or the adapter's order"),
        "sliver_fraction": (float, (
            "a stage is enlarged rather than leave a remainder below this share of --flops-step before a snapshot; "
            "such a sliver's cost does not steer MPS")),
        "param_max_cut": (float, (
            "a stage of a parameter mode removes at most this share of what the mode can still remove above its "
            "floors (1: no bound)")),
        "lr_schedule": (LR_SCHEDULES, "search learning rate: constant, or cosine decay to 0 over the search"),
        "finetune_schedule": (LR_SCHEDULES,
                              "fine-tuning learning rate: warm-up then cosine decay to 0, or constant"),
        "finetune_budget": (FINETUNE_BUDGETS, (
            "fine-tuning steps per saved model: --finetune-steps each ('fixed'), or topped up so every saved model "
            "gets the same total of search and fine-tuning steps ('equal-total')")),
    }
    for name in SEARCH_OPTIONS:
        kind, text = specs[name]
        flag = "--" + name.replace("_", "-")
        if kind is float:
            parser.add_argument(flag, type=float, default=None, metavar="F",
                                help=f"{text}, {RANGES[name].describe()} {_default_help(name)}")
        else:
            parser.add_argument(flag, default=None, choices=kind, help=f"{text} {_default_help(name)}")


def _model_classes() -> str:
    """The model classes comp-vlm loads (those of the registered adapters)."""
    from .adapters.base import registered_model_classes

    return ", ".join(c.__name__ for c in registered_model_classes())


def _own_data_tasks() -> str:
    """The tasks that read a data directory of their own format (:func:`comp_vlm.tasks.register_task_data`)."""
    from .tasks import TASK_DATA

    return ", ".join(TASK_DATA) or "none"


def build_parser() -> argparse.ArgumentParser:
    from .search import STRATEGIES, PruneConfig
    from .tasks import task_names

    d, config = zoo.BUILTINS[zoo.DEFAULT_PRESET], PruneConfig()

    parser = _Parser(
        prog="comp-vlm",
        description="CoMP (Collaborative Multi-Mode Pruning) for Hugging Face vision-language models: removes "
                    "attention heads, MLP neurons and vision/text tokens together, to a FLOPs target.",
        epilog="Run 'comp-vlm COMMAND --help' for a command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"comp-vlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="offline end-to-end demo: train a tiny CLIP, prune it with CoMP, report",
        description="Offline demo: build a tiny CLIP, train it on a synthetic shapes image-caption world (weights "
                    "cached under --cache), prune it with CoMP (search + fine-tuning), and report retrieval R@1, "
                    "FLOPs, parameters and measured latency for dense vs pruned; writes the pruned model (with "
                    "tokenizer and image processor), the stage log, a plot and a report under --out.")
    demo.add_argument("--out", default="runs/demo", metavar="DIR",
                      help="output directory: new, empty, or an earlier demo output, which it replaces "
                           "(default: runs/demo)")
    demo.add_argument("--ratio", type=float, default=None, metavar="R",
                      help=f"fraction of dense FLOPs to remove, in (0, 1) {_default_help('ratio')}")
    demo.add_argument("--quick", action="store_true",
                      help="a much smaller and faster variant (seconds; for tests)")
    demo.add_argument("--cache", default="cache", metavar="DIR",
                      help="cache directory for trained dense weights (default: cache)")
    demo.add_argument("--no-cache", action="store_true",
                      help="neither read nor write the dense-weights cache")
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    prune = sub.add_parser(
        "prune", help="prune a vision-language model with CoMP to a FLOPs ratio",
        description="Prune a vision-language model with CoMP: calibrate, staged multi-mode search to --ratio (snapshotting "
                    "--snapshots on the way), fine-tune, slice, and save a pruned model directory (weights, "
                    "recipe, tokenizer, image processor) plus a stage log and a report. Search defaults are "
                    "PruneConfig's (the Python API's); a built-in model's preset overrides some, flags override "
                    f"both: {_preset_overrides()}.")
    prune.add_argument("--model", required=True, metavar="DIR_OR_BUILTIN",
                       help=f"a local transformers model directory ({_model_classes()}, with its tokenizer), or a "
                            "built-in model "
                            f"({', '.join(zoo.BUILTINS)}: trained on the synthetic world, cached)")
    prune.add_argument("--task", default="retrieval", choices=task_names(), help="task (default: retrieval)")
    prune.add_argument("--data", default=None, metavar="synthetic|DIR",
                       help="training/validation/test data: 'synthetic' (the built-in shapes world; the default of "
                            "built-in models, to be named for a model directory), or a COCO/Flickr30K directory in Karpathy's format (dataset_*.json and the images; needs "
                            "--model DIR with a tokenizer and image processor): train+restval for the search and "
                            "fine-tuning, val for the stage costs, test for the reported metrics; for a task that "
                            f"reads its own format ({_own_data_tasks()}), a directory in that format, split as the "
                            "task defines (needs --model DIR)")
    prune.add_argument("--ratio", type=float, default=config.ratio, metavar="R",
                       help=f"fraction of dense FLOPs to remove, in (0, 1) {_default_help('ratio')}")
    prune.add_argument("--strategy", default=config.strategy, choices=STRATEGIES, metavar="NAME",
                       help=f"search strategy: {', '.join(STRATEGIES)} {_default_help('strategy')}")
    prune.add_argument("--out", required=True, metavar="OUT",
                       help="output directory for the pruned model: new or empty (an earlier comp-vlm output "
                            "with --overwrite); written complete or not at all")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an earlier comp-vlm output in OUT (never a directory holding other files), "
                            "or start over from an earlier search's checkpoint")
    prune.add_argument("--snapshots", type=_ratios, default=config.snapshots, metavar="R1,R2",
                       help="also save models at these ratios reached on the way, e.g. 0.5,0.7 "
                            f"{_default_help('snapshots')}")
    prune.add_argument("--flops-step", type=float, default=None, metavar="F",
                       help=f"FLOPs fraction removed per stage {_default_help('flops_step')}")
    prune.add_argument("--stage-steps", type=_positive_int, default=None, metavar="N",
                       help=f"training steps per stage {_default_help('stage_steps')}")
    prune.add_argument("--finetune-steps", type=_count, default=None, metavar="N",
                       help=f"fine-tuning steps per saved model {_default_help('finetune_steps')}")
    prune.add_argument("--calibration-batches", type=_positive_int, default=None, metavar="N",
                       help=f"statistics batches before stage 1 {_default_help('calibration_batches')}")
    prune.add_argument("--lr", type=float, default=None, metavar="LR",
                       help=f"learning rate of search and fine-tuning {_default_help('lr')}")
    prune.add_argument("--distill", type=float, default=None, metavar="W",
                       help=f"weight of distillation towards the dense model {_default_help('distill')}")
    _search_arguments(prune)
    prune.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help=f"training batch size (model directories; default: {d.batch_size})")
    prune.add_argument("--n-train", type=_positive_int, default=None, metavar="N",
                       help=f"synthetic training pairs (default: {d.n_train})")
    prune.add_argument("--n-val", type=_positive_int, default=None, metavar="N",
                       help=f"synthetic validation pairs (default: {d.n_val})")
    prune.add_argument("--n-test", type=_positive_int, default=None, metavar="N",
                       help=f"synthetic test pairs (default: {d.n_test})")
    _gallery_argument(prune, "100, or the whole split when smaller")
    prune.add_argument("--text-length", type=_positive_int, default=None, metavar="N",
                       help="text length of the FLOPs reference (default: mean caption length of the training data)")
    prune.add_argument("--resume", action="store_true",
                       help="continue an interrupted search from its checkpoint (same arguments)")
    prune.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                       help="where search checkpoints are written at every stage (default: OUT.ckpt next to OUT; "
                            "removed after success unless --keep-checkpoint)")
    prune.add_argument("--keep-checkpoint", action="store_true",
                       help="keep the search checkpoint after success")
    prune.add_argument("--cache", default="cache", metavar="DIR",
                       help="dense-weights cache for built-in models (default: cache)")
    prune.add_argument("--no-cache", action="store_true", help="do not use the dense-weights cache")
    _common(prune)
    prune.set_defaults(func=cmd_prune)

    ev = sub.add_parser(
        "eval", help="evaluate a pruned (or dense) model directory",
        description="Evaluate a model directory written by 'comp-vlm prune'/'demo' (or a dense model "
                    f"directory: {_model_classes()}): task metrics on the test split of the synthetic world, of a Karpathy-format "
                    "data directory or of a data directory in the task's own format, plus analytic FLOPs and "
                    "parameters.")
    ev.add_argument("model_dir", metavar="OUT", help="model directory")
    ev.add_argument("--task", default=None, choices=task_names(),
                    help="task (default: the task recorded with a pruned model, else retrieval)")
    ev.add_argument("--data", default=None, metavar="synthetic|DIR",
                    help="evaluation data: 'synthetic', or a Karpathy-format directory (its test split), or for "
                         f"a task that reads its own format ({_own_data_tasks()}) a directory in it "
                         "(default: the data directory recorded with a pruned model; a dense model directory needs "
                         "--data)")
    ev.add_argument("--n-test", type=_positive_int, default=None, metavar="N",
                    help=f"synthetic test pairs (default: as recorded in the recipe, else {d.n_test})")
    _gallery_argument(ev, "as recorded with a pruned model, else 100, or the whole split when smaller")
    ev.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    _common(ev, seed_default=None)
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser(
        "bench", help="measured latency/throughput and FLOPs, dense vs pruned",
        description="Measure the latency and throughput of a pruned model directory against its dense model "
                    "(--dense DIR, or by default the dense architecture rebuilt from the pruned model's base "
                    "config), at several batch sizes and text lengths, with analytic FLOPs.")
    bench.add_argument("model_dir", metavar="OUT", help="pruned model directory")
    bench.add_argument("--dense", default=None, metavar="DIR",
                       help="dense model directory (e.g. runs/demo/dense); default: rebuilt from the base config")
    bench.add_argument("--batch-sizes", type=_ints, default=(1, 8), metavar="B1,B2", help="default: 1,8")
    bench.add_argument("--text-lengths", type=_ints, default=None, metavar="L1,L2",
                       help="text lengths in tokens (default: the recipe's reference length and twice it)")
    bench.add_argument("--repeats", type=_positive_int, default=9, metavar="N",
                       help="timed runs per measurement (median; default: 9)")
    bench.add_argument("--warmup", type=_count, default=2, metavar="N", help="untimed warm-up runs (default: 2)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    _common(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


class _GlobalState:
    """Logging, progress-line and thread settings a command changes, restored afterwards (``main`` may be called
    in-process)."""

    def __enter__(self):
        import torch

        self.progress_lines = set_progress_lines(True)
        logger = logging.getLogger("comp_vlm")
        self.logger = (logger.handlers[:], logger.level, logger.propagate)
        self.threads = torch.get_num_threads()
        try:
            from transformers.utils import logging as hf_logging

            self.hf = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
        except ImportError:  # pragma: no cover
            self.hf = None
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        set_progress_lines(self.progress_lines)
        logger = logging.getLogger("comp_vlm")
        logger.handlers[:], logger.level, logger.propagate = self.logger
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if self.hf is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self.hf[0])
            (hf_logging.enable_progress_bar if self.hf[1] else hf_logging.disable_progress_bar)()


def _mute_stdout() -> None:
    """Point stdout at the null device, so flushing it at exit does not fail on a closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. A closed stdout or stderr pipe ends it quietly with 141 (128 + SIGPIPE),
    as a Unix tool killed by SIGPIPE (``comp-vlm eval OUT | head``)."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        _mute_stdout()
        return 141


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _GlobalState():
        try:
            return args.func(args)
        except BrokenPipeError:
            raise
        except (CompVLMError, OSError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"comp-vlm: error: {message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            hint = " (continue the search with the same command plus --resume)" if args.command == "prune" else ""
            print(f"comp-vlm: interrupted{hint}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
