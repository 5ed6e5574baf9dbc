"""The emoji world as a quality-suite bench (issue 13 §5): the same interface as ``bench_world.Bench``, with data
read back through the public Karpathy reader from a written world and the CLIP shape and dense training of a
calibration attempt of ``emoji_world_checks.py`` (the first that passed all its checks, unless named). The dense
model is the calibration's own (same cache key), so the suite prunes exactly the model the checks describe.

    make emoji-world && python benchmarks/emoji_world_checks.py     # write and calibrate the world first
    python benchmarks/quality.py --world emoji --strategies comp,param-only,sjp,sjp-random,downsample
    python benchmarks/quality.py --world emoji --smoke               # a tiny world from the test fixtures
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import emoji_world_checks as checks
import torch
from bench_world import Bench, BenchSettings
from transformers import CLIPConfig, CLIPModel

from comp_vlm.dense import DenseTraining, cached_dense
from comp_vlm.tasks import RetrievalTask

CHECKS_RECORD = Path("benchmarks/results/emoji_world_checks.json")
MODEL_PREFIX = "emoji-clip-"  # a calibration attempt's model is named MODEL_PREFIX + the attempt's name


class CalibrationMissing(Exception):
    """No calibration attempt to take the model from (one line for the user)."""


def calibrated_attempt(record_path: Path, name: str | None) -> checks.Attempt:
    """The named attempt, else the first recorded attempt that passed every check."""
    records = json.loads(record_path.read_text())["attempts"] if record_path.is_file() else []
    known = {a.name: a for a in checks.ATTEMPTS}
    if name is not None:
        chosen = next((r for r in records if r["name"] == name), None)
        if chosen is None and name not in known:
            raise CalibrationMissing(f"no calibration attempt {name!r} in {record_path} or emoji_world_checks.ATTEMPTS")
        return checks.Attempt(**chosen["attempt"]) if chosen else known[name]
    passed = [r for r in records if r["passed"]]
    if not passed:
        raise CalibrationMissing(f"no passed calibration in {record_path}: run `python benchmarks/emoji_world_checks.py`"
                                 " first (or name an attempt with --attempt)")
    return checks.Attempt(**passed[0]["attempt"])


@dataclass
class EmojiBench(Bench):
    """A ``Bench`` on a written emoji world; ``world`` is the world's folder."""

    attempt: checks.Attempt | None = None
    world_record: dict | None = None
    max_positions: int = 0
    cache_dir: str = "cache"

    def config(self, width_scale: float = 1.0) -> CLIPConfig:
        canvas = self.world_record["config"]["canvas"]
        return checks.model_config(self.tokenizer, self.attempt, canvas, self.max_positions, width_scale)

    def data_id(self) -> str:
        return checks.world_data_id(self.world_record)

    def dense(self, width_scale: float = 1.0, progress: bool = True) -> tuple[torch.nn.Module, dict]:
        self.data.train.load_state_dict({"epoch": 0, "position": 0})
        return cached_dense(CLIPModel._from_config, self.config(width_scale), self.task, self.data.train,
                            self.data.test, self.settings.dense, data_id=self.data_id(), cache_dir=self.cache_dir,
                            progress=progress)


def emoji_settings(attempt: checks.Attempt, settings: checks.Settings, canvas: int, max_positions: int,
                   splits: dict[str, int]) -> BenchSettings:
    """The bench settings of a calibration attempt (the quality suite's record of the model and the search)."""
    return BenchSettings(
        MODEL_PREFIX + attempt.name, attempt.note, image_size=canvas, patch_size=attempt.patch,
        vision_hidden=attempt.width, text_hidden=attempt.width, layers=attempt.layers, heads=attempt.heads,
        projection_dim=attempt.width, max_positions=max_positions, n_train=splits["train"], n_val=splits["val"],
        n_test=splits["test"], batch_size=attempt.batch_size, eval_batch_size=settings.eval_batch_size,
        gallery_size=settings.gallery_size,
        dense=DenseTraining(steps=attempt.steps, lr=attempt.lr, warmup=settings.warmup,
                            weight_decay=settings.weight_decay),
        stage_steps=settings.stage_steps, flops_step=settings.flops_step, finetune_steps=settings.finetune_steps,
        prune_lr=settings.prune_lr, calibration_batches=settings.calibration_batches)


def make_emoji_bench(world: Path, attempt_name: str | None = None, smoke: bool = False,
                     record_path: Path = CHECKS_RECORD, **overrides: Any) -> EmojiBench:
    """The bench of a written world (``make emoji-world``) and a calibrated attempt; ``smoke`` writes the tiny
    fixture world of ``emoji_world_checks --smoke`` instead. ``overrides`` change the search settings."""
    if smoke:
        attempt, settings = replace(checks.SMOKE_ATTEMPT, layers=3), checks.SMOKE  # 3 layers: a token site each
        cache = Path("/tmp/emoji_world_checks_smoke/cache")
        world = checks.world_for(attempt, world, cache, smoke=True)
    else:
        attempt, settings, cache = calibrated_attempt(record_path, attempt_name), checks.Settings(), Path("cache")
        if not (world / "world.json").is_file():
            raise CalibrationMissing(f"{world} holds no emoji world: run `make emoji-world` first")
    settings = replace(settings, **overrides)
    tok, loaders, record = checks.load_data(world, attempt, settings)
    max_positions = checks.text_positions(tok, world)
    splits = {"train": len(loaders.train.data), "val": sum(len(b["captions"]) for b in loaders.val),
              "test": sum(len(b["captions"]) for b in loaders.test)}
    bench_settings = emoji_settings(attempt, settings, record["config"]["canvas"], max_positions, splits)
    return EmojiBench(bench_settings, world, tok, loaders, RetrievalTask(gallery_size=settings.gallery_size),
                      attempt=attempt, world_record=record, max_positions=max_positions, cache_dir=str(cache))
