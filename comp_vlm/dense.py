"""Dense (unpruned) training of tiny models, cached on disk by a hash of everything that determines the weights.

The cache holds ``<key>.safetensors`` (weights) and ``<key>.json`` (the config, training settings and the
validation metrics), never a pickle; a cached model is rebuilt from its config and loaded strictly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .outputs import ordinary_mode

log = logging.getLogger("comp_vlm")


@dataclass(frozen=True)
class DenseTraining:
    steps: int = 1500
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def cache_key(config: Any, training: DenseTraining, data_id: str) -> str:
    blob = json.dumps({"config": config.to_dict(), "training": asdict(training), "data": data_id}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_at(step: int, training: DenseTraining) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < training.warmup:
        return training.lr * (step + 1) / training.warmup
    progress = (step - training.warmup) / max(1, training.steps - training.warmup)
    return training.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_dense(model: nn.Module, task: Any, train_data: Any, training: DenseTraining,
                progress: bool = True) -> nn.Module:
    from .training import cycle_batches, seed_everything, training_loss

    seed_everything(training.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    batches = cycle_batches(train_data)
    model.train()
    bar = tqdm(range(training.steps), desc="dense training", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, training)
        loss = training_loss(task, model, next(batches), None, 0.0, f"dense training step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == training.steps - 1:  # the bar ends on the last step's loss
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def load_cached_weights(path: Path, model: nn.Module) -> bool:
    """Load cached safetensors weights into ``model`` (strict); ``False`` with a warning when the file is
    unreadable or does not fit (a truncated or foreign file is retrained, never trusted). The file is checked
    against the model's keys and shapes before anything is copied, so a failed load leaves ``model`` untouched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        log.warning("ignoring unreadable cached dense weights %s (%s): retraining", path, str(exc).splitlines()[0])
        return False
    expected = model.state_dict()
    misfit = sorted(set(state) ^ set(expected)) or [k for k, v in expected.items() if state[k].shape != v.shape]
    if misfit:
        log.warning("ignoring cached dense weights %s that do not fit the model (%s): retraining", path, misfit[0])
        return False
    model.load_state_dict(state, strict=True)
    return True


def save_cached_weights(path: Path, model: nn.Module, meta: dict) -> None:
    """Write ``model``'s weights to ``path`` (temp file, then rename) and ``meta`` to ``path`` with ``.json``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={"comp_vlm": "dense-cache"})
    os.chmod(tmp, ordinary_mode(directory=False))  # mkstemp creates 0600: the cache is an ordinary file
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))


def cached_dense(build: Any, config: Any, task: Any, train_data: Any, val_data: Any, training: DenseTraining,
                 data_id: str, cache_dir: str | os.PathLike = "cache", progress: bool = True) -> tuple[nn.Module, dict]:
    """The dense model for (config, training, data): loaded from ``cache_dir`` or trained and stored there (an
    unreadable cache entry is retrained). ``build(config)`` makes a fresh model. A stateful loader
    (``state_dict``) is left at its position either way. Returns the model (eval mode) and its validation
    metrics."""
    key = cache_key(config, training, data_id)
    weights = Path(cache_dir) / f"dense-{key}.safetensors"
    meta_path = weights.with_suffix(".json")
    torch.manual_seed(training.seed)
    model = build(config)
    if weights.is_file() and meta_path.is_file():
        try:
            metrics = json.loads(meta_path.read_text())["metrics"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable cache metadata %s (%s): retraining", meta_path, exc)
            metrics = None
        if metrics is not None and load_cached_weights(weights, model):
            log.info("dense model loaded from cache %s", weights)
            return model.eval(), metrics
    position = train_data.state_dict() if hasattr(train_data, "state_dict") else None
    train_dense(model, task, train_data, training, progress)
    if position is not None:  # leave a stateful loader where it was, as the cached path does
        train_data.load_state_dict(position)
    metrics = task.evaluate(model, val_data)
    save_cached_weights(weights, model, {"training": asdict(training), "data": data_id, "metrics": metrics})
    return model, metrics
