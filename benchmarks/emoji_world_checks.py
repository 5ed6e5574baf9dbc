"""Calibrate the emoji world's benchmark model before any pruning arm runs (issue 13, section 4).

Each attempt (a world and a CLIP shape) is checked and recorded in ``benchmarks/results/emoji_world_checks.json``
and ``.md``:

- (a) a half-width model trained the same way is at least 5 R@1 points below dense;
- (b) at least 50% of the patches are background by the alpha masks (no foreground pixel; test split);
- (c) dense R@1 among 100 candidates lies between 60 and 90;
- (d) the vision tower carries at least 60% of the dense FLOPs (text at its mean training length);
- budget: at least 100 patch tokens and 6 layers per tower, and one prune run (comp, one seed, to 0.85 with
  snapshots 0.5/0.7/0.8, timed for real once (a)-(d) hold) within 10 minutes.

Attempts run in order until one passes every check. A failing property changes the world's size or the model's
shape, never the pruning method: add the next attempt to ``ATTEMPTS`` (or pass ``--attempts`` with a new name and
``--world-set``/``--model-set`` overrides) and rerun; attempts already recorded with the same settings are skipped,
and dense models are cached in ``cache/``, so the script resumes where it stopped.

    make emoji-world                                 # the default world in data/emoji-world (Debian packages)
    python benchmarks/emoji_world_checks.py          # attempts in order until one passes (~30 min each, 2 cores)
    python benchmarks/emoji_world_checks.py --smoke  # about a minute: a tiny world from the test fixtures, in /tmp
    python benchmarks/emoji_world_checks.py --attempts probe-k30 --settings-set stage_steps=30   # other settings
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality_suite.provenance import versions
from transformers import CLIPModel

import comp_vlm
import comp_vlm.training
from comp_vlm.data.emoji_sources import SpriteFolder, load_concepts
from comp_vlm.data.emoji_world import (
    WorldConfig,
    mask_path,
    patch_foreground,
    read_mask,
    read_world,
    write_world,
)
from comp_vlm.data.karpathy import karpathy_loaders, read_karpathy
from comp_vlm.data.processor import make_image_processor
from comp_vlm.data.synthetic import RetrievalLoaders, ShuffledBatches, mix_seed
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.dense import DenseTraining, cached_dense
from comp_vlm.flops import tower_flops
from comp_vlm.tasks import RetrievalTask
from comp_vlm.zoo import clip_config

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "emoji"
BUDGET_S = 600.0


@dataclass(frozen=True)
class Attempt:
    """One world (``WorldConfig`` overrides of the default world) and one CLIP shape and training."""

    name: str
    note: str
    world: dict[str, Any] = field(default_factory=dict)
    width: int = 64  # both towers; the half-width model uses width // 2 with the same heads
    layers: int = 6
    heads: int = 4
    patch: int = 4
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3


ATTEMPTS: tuple[Attempt, ...] = (
    Attempt("probe", "the issue's probe: 40 px canvas (100 patches of 4 px), 1-3 emoji of 12-18 px, all 1,372 base "
                     "emoji, CLIP 6+6 layers width 64, 1,500 steps at batch 64; captions use a keyword 10% of the time"),
    Attempt("probe-names-only", "if (c) falls below 60 with keywords: captions by CLDR names only, as the probe had",
            world={"keyword_rate": 0.0}),
    Attempt("concepts-800", "if (c) is still below 60: a smaller world of 800 concepts (seeded subset)",
            world={"keyword_rate": 0.0, "max_concepts": 800}),
)


@dataclass(frozen=True)
class Settings:
    """Everything else an attempt runs with (the smoke settings shrink all of it)."""

    gallery_size: int = 100
    eval_batch_size: int = 250
    warmup: int = 100
    weight_decay: float = 0.05
    ratios: tuple[float, ...] = (0.5, 0.7, 0.8, 0.85)
    stage_steps: int = 50
    flops_step: float = 0.05
    finetune_steps: int = 150
    prune_lr: float = 2e-4
    calibration_batches: int = 4


SMOKE_ATTEMPT = Attempt("smoke", "tiny world from the test fixtures", width=16, layers=2, heads=2, steps=20,
                        batch_size=32, world={"canvas": 20, "min_size": 6, "max_size": 8, "max_emoji": 2,
                                              "retrieval": {"train": 256, "val": 64, "test": 128},
                                              "nlvr2": {"dev": 2}, "vqav2": {"val": 2}})
SMOKE = Settings(gallery_size=32, eval_batch_size=64, warmup=5, stage_steps=4, flops_step=0.2, finetune_steps=2,
                 calibration_batches=2)


def attempt_key(attempt: Attempt, settings: Settings) -> str:
    blob = json.dumps({"attempt": asdict(attempt), "settings": asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def world_for(attempt: Attempt, default_world: Path, cache: Path, smoke: bool) -> Path:
    """The attempt's world folder, written first when missing (the default world goes to ``default_world``)."""
    config = WorldConfig(**{**asdict(WorldConfig()), **attempt.world})
    out = default_world if not attempt.world and not smoke else cache / f"emoji-world-{attempt.name}"
    if smoke:
        write_world(out, config, load_concepts(FIXTURES / "emoji-test.txt", FIXTURES / "en.xml"),
                    SpriteFolder(FIXTURES / "sprites"), progress=False)
    else:
        write_world(out, config)  # keeps a finished world with these settings; needs the Debian packages otherwise
    return out


def background_share(world: Path, patch: int) -> dict[str, float]:
    """Share of the test images' patches with no foreground pixel (and with under 5% foreground)."""
    root = world / "karpathy"
    shares = np.stack([patch_foreground(read_mask(mask_path(root, im.path)), patch).ravel()
                       for im in read_karpathy(root, "test")])
    return {"no_foreground": float((shares == 0).mean()), "foreground_below_5pct": float((shares < 0.05).mean())}


def load_data(world: Path, attempt: Attempt, settings: Settings) -> tuple[Any, RetrievalLoaders, dict]:
    record = read_world(world)
    tok = build_word_tokenizer(record["vocabulary"])
    processor = make_image_processor(record["config"]["canvas"], record["image_mean"], record["image_std"])
    loaders = karpathy_loaders(world / "karpathy", tok, processor, attempt.batch_size,
                               eval_batch_size=settings.eval_batch_size, preload=True)
    return tok, loaders, record


def text_positions(tok: Any, world: Path) -> int:
    """Text positions for every caption of the world, rounded up to a multiple of 8."""
    images = read_karpathy(world / "karpathy")
    return 8 * -(-max(len(tok(c)["input_ids"]) for im in images for c in im.captions) // 8)


def world_data_id(record: dict) -> str:
    """The dense cache's data id of a world: its config and sources (the same world, the same images)."""
    world_id = json.dumps([record["config"], record["sources"]], sort_keys=True)
    return f"emoji-world-{hashlib.sha256(world_id.encode()).hexdigest()[:12]}"


def model_config(tok: Any, attempt: Attempt, canvas: int, max_positions: int, width_scale: float = 1.0) -> Any:
    width = int(attempt.width * width_scale)
    return clip_config(tok, vision_hidden=width, text_hidden=width, layers=attempt.layers, heads=attempt.heads,
                       projection_dim=width, image_size=canvas, patch_size=attempt.patch,
                       max_positions=max_positions)


def time_prune(dense: torch.nn.Module, task: RetrievalTask, loaders: RetrievalLoaders, attempt: Attempt,
               settings: Settings) -> dict[str, Any]:
    config = comp_vlm.PruneConfig(
        ratio=max(settings.ratios), snapshots=settings.ratios, strategy="comp", seed=0,
        stage_steps=settings.stage_steps, flops_step=settings.flops_step, finetune_steps=settings.finetune_steps,
        calibration_batches=settings.calibration_batches, lr=settings.prune_lr)
    train = ShuffledBatches(loaders.train.data, attempt.batch_size, seed=mix_seed(0, "prune-order"))
    t0 = time.perf_counter()
    res = comp_vlm.prune(copy.deepcopy(dense), task, train, loaders.val, config, test_data=loaders.test)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "stages": len(res.stage_log),
            "steps": len(res.stage_log) * settings.stage_steps + len(res.snapshots) * settings.finetune_steps,
            "r1": {str(r): m["r1_mean"] for r, m in res.metrics.items()}, "not_reached": res.not_reached}


def run_attempt(attempt: Attempt, world: Path, settings: Settings, cache: Path, prune_timing: str,
                ) -> dict[str, Any]:
    """Train (or load) the dense and half-width models and check the world; ``prune_timing`` is ``"pass"`` (time a
    prune run once every other check holds), ``"always"`` or ``"never"``."""
    t0 = time.perf_counter()
    tok, loaders, record = load_data(world, attempt, settings)
    task = RetrievalTask(gallery_size=settings.gallery_size)
    canvas = record["config"]["canvas"]
    max_positions = text_positions(tok, world)
    training = DenseTraining(steps=attempt.steps, lr=attempt.lr, warmup=settings.warmup,
                             weight_decay=settings.weight_decay)
    data_id = world_data_id(record)

    def dense(width_scale: float) -> tuple[torch.nn.Module, dict, float]:
        loaders.train.load_state_dict({"epoch": 0, "position": 0})
        t = time.perf_counter()
        model, metrics = cached_dense(CLIPModel._from_config, model_config(tok, attempt, canvas, max_positions,
                                                                           width_scale),
                                      task, loaders.train, loaders.test, training, data_id=data_id,
                                      cache_dir=cache)
        return model, metrics, time.perf_counter() - t

    half, half_metrics, half_s = dense(0.5)
    full, full_metrics, full_s = dense(1.0)
    length = comp_vlm.training.training_text_length(loaders.train)
    flops = {t.name: tower_flops(t).total for t in comp_vlm.get_adapter(full).structure({"text_length": length})}
    patches = (canvas // attempt.patch) ** 2
    background = background_share(world, attempt.patch)
    result: dict[str, Any] = {
        "dense_r1": full_metrics["r1_mean"], "half_width_r1": half_metrics["r1_mean"],
        "width_gap": full_metrics["r1_mean"] - half_metrics["r1_mean"],
        "background": background, "flops_share": {k: v / sum(flops.values()) for k, v in flops.items()},
        "text_length": length, "patches": patches, "layers": attempt.layers,
        "dense_params": comp_vlm.count_params(full), "half_width_params": comp_vlm.count_params(half),
        "dense_train_s": full_s, "half_width_train_s": half_s, "concepts": len(record["concepts"]),
        "train_pairs": len(loaders.train.data), "test_pairs": sum(len(b["captions"]) for b in loaders.test),
    }
    checks = {"a_width_gap_ge_5": result["width_gap"] >= 5.0,
              "b_background_ge_50pct": background["no_foreground"] >= 0.5,
              "c_dense_r1_60_to_90": 60.0 <= result["dense_r1"] <= 90.0,
              "d_vision_flops_ge_60pct": result["flops_share"].get("vision", 0.0) >= 0.6,
              "budget_shape": patches >= 100 and attempt.layers >= 6}
    if prune_timing == "always" or (prune_timing == "pass" and all(checks.values())):
        result["prune"] = time_prune(full, task, loaders, attempt, settings)
        checks["budget_prune_le_10min"] = result["prune"]["wall_s"] <= BUDGET_S
    return {"name": attempt.name, "key": attempt_key(attempt, settings), "note": attempt.note,
            "attempt": asdict(attempt), "settings": asdict(settings), "world": str(world),
            "world_config": record["config"], "result": result, "checks": checks,
            "passed": all(checks.values()) and "budget_prune_le_10min" in checks,
            "wall_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(), "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def render(records: list[dict], command: str) -> str:
    lines = ["# Emoji world checks (issue 13, section 4)", "", f"Command: `{command}`", "",
             "| attempt | dense R@1 | half-width R@1 | gap | background patches | vision FLOPs | prune run | passed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        res = r["result"]
        prune = f"{res['prune']['wall_s']:.0f} s" if "prune" in res else "not run"
        lines.append(f"| {r['name']} | {res['dense_r1']:.2f} | {res['half_width_r1']:.2f} | {res['width_gap']:.2f} | "
                     f"{100 * res['background']['no_foreground']:.1f}% | {100 * res['flops_share']['vision']:.1f}% | "
                     f"{prune} | {'yes' if r['passed'] else 'no'} |")
    lines.append("")
    for r in records:
        failed = [k for k, ok in r["checks"].items() if not ok]
        untimed = "" if "budget_prune_le_10min" in r["checks"] else "; the prune run is not timed yet, so not passed"
        lines.append(f"- **{r['name']}** ({r['date']}, {r['wall_s'] / 60:.0f} min): {r['note']}. "
                     f"{r['result']['concepts']} concepts, {r['result']['patches']} patches, "
                     f"{r['result']['train_pairs']} training pairs; failed: {', '.join(failed) or 'none'}{untimed}.")
    return "\n".join(lines) + "\n"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as JSON where they parse (numbers, null, objects), else as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny world from the fixtures, tiny model, to /tmp")
    parser.add_argument("--world", default="data/emoji-world", help="the default world (make emoji-world)")
    parser.add_argument("--attempts", default=None, help="comma-separated attempt names (default: all, in order)")
    parser.add_argument("--world-set", nargs="*", default=[], help="WorldConfig overrides for a new attempt")
    parser.add_argument("--model-set", nargs="*", default=[], help="Attempt field overrides for a new attempt")
    parser.add_argument("--note", default="", help="why the new attempt (recorded)")
    parser.add_argument("--settings-set", nargs="*", default=[],
                        help="Settings overrides, e.g. finetune_steps=100 (prune run, galleries; part of the key)")
    parser.add_argument("--redo", action="store_true", help="rerun attempts already recorded")
    parser.add_argument("--no-prune-timing", action="store_true", help="skip the timed prune run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("/tmp/emoji_world_checks_smoke" if args.smoke else "benchmarks/results"))
    cache = Path("/tmp/emoji_world_checks_smoke/cache" if args.smoke else "cache")
    settings = replace(SMOKE if args.smoke else Settings(), **parse_overrides(args.settings_set))
    attempts = {a.name: a for a in ((SMOKE_ATTEMPT,) if args.smoke else ATTEMPTS)}
    names = args.attempts.split(",") if args.attempts else list(attempts)
    for name in names:
        if name not in attempts:  # a new attempt from the command line
            attempts[name] = Attempt(name, args.note or "from the command line", **{
                "world": parse_overrides(args.world_set), **parse_overrides(args.model_set)})
    path = out / "emoji_world_checks.json"
    records = json.loads(path.read_text())["attempts"] if path.is_file() else []
    command = " ".join(["python benchmarks/emoji_world_checks.py", *(sys.argv[1:] if argv is None else argv)])
    for name in names:
        attempt = attempts[name]
        key = attempt_key(attempt, settings)
        done = next((r for r in records if r["key"] == key), None)
        if done is not None and not args.redo:
            print(f"{name}: recorded ({'passed' if done['passed'] else 'failed'}), skipped")
        else:
            world = world_for(attempt, Path(args.world), cache, args.smoke)
            timing = "never" if args.no_prune_timing else "always" if args.smoke else "pass"
            record = run_attempt(attempt, world, settings, cache, timing)
            records = [r for r in records if r["key"] != key] + [record]
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"command": command, "attempts": records}, indent=1) + "\n")
            (out / "emoji_world_checks.md").write_text(render(records, command))
            done = record
            print(f"{name}: {'passed' if record['passed'] else 'failed'} {record['checks']}")
        if done["passed"]:
            break
    print(render(records, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
