"""Measured latency: interleaved timing of several models on the same inputs, the inputs it times (random or the
first pairs of a batch), and the dense reference a pruned model is timed against."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn


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


def bench_inputs(model: Any, batch: int, length: int, seed: int = 0) -> dict:
    """Random inputs for ``model``: ``batch`` images of its size and texts of ``length`` tokens (BOS, words, EOS;
    no padding)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    size = int(cfg.vision_config.image_size)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    tc = cfg.text_config
    bos, eos = int(tc.bos_token_id), int(tc.eos_token_id)
    special = {bos, eos, int(tc.pad_token_id) if tc.pad_token_id is not None else -1}
    words = torch.tensor([i for i in range(tc.vocab_size) if i not in special])
    ids = words[torch.randint(len(words), (batch, max(length, 2)), generator=g)]
    ids[:, 0], ids[:, -1] = bos, eos
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def batch_inputs(batch: dict, n: int) -> dict:
    """The first ``n`` pairs of a retrieval batch as model inputs, without the padding columns none of them uses."""
    n = min(n, batch["pixel_values"].shape[0])
    mask = batch["attention_mask"][:n]
    cols = mask.any(0)
    return {"pixel_values": batch["pixel_values"][:n], "input_ids": batch["input_ids"][:n][:, cols],
            "attention_mask": mask[:, cols]}


def dense_reference_model(dense: nn.Module, recipe: Any) -> nn.Module:
    """A copy of the dense model with the recipe's adapter options installed (keep ratio 1 everywhere): the
    dense reference whose FLOPs the recipe reports (e.g. with CLIP's dead-compute option)."""
    from .adapters.base import get_adapter, options_from_recipe

    ref = copy.deepcopy(dense)
    get_adapter(ref).install(options_from_recipe(recipe.options))
    object.__setattr__(ref, "comp_vlm_reference", dict(recipe.reference))
    return ref.eval()
