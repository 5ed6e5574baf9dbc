"""The ``downsample`` sanity baseline (method.md §4, baselines.md; issue 13 §5): remove vision tokens by lowering
the input resolution instead of pruning them, then let param-only remove the rest.

Mirror of ``sjp`` (tokens to ``sjp_token_share`` of the target reduction, then parameters): the image size is the
patch multiple whose FLOPs reduction is closest to ``sjp_token_share * ratio`` (without passing the first
snapshot), the CLIP's position embeddings are interpolated to the new grid (bicubic, as Hugging Face's
``interpolate_pos_encoding``; the model then *is* a native CLIP at that size), the model is fine-tuned at that size
for as many steps as the token stages it replaces, and param-only prunes it to the remaining FLOPs with the same
absolute FLOPs per stage. Ratios, snapshots and FLOPs kept are reported against the full-resolution dense model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comp_vlm import get_adapter
from comp_vlm.search.budget import nominal_search_steps


def resize_pixels(batch: dict, size: int) -> dict:
    """The batch with its ``pixel_values`` resized to ``size`` x ``size`` (bilinear, antialiased)."""
    pixels = batch["pixel_values"]
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return batch
    return {**batch, "pixel_values": F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                                                   align_corners=False)}


class ResizedBatches:
    """A batch iterable at another image size; a stateful loader's ``state_dict`` passes through."""

    def __init__(self, batches: Iterable[dict], size: int):
        self.batches, self.size = batches, size

    def __iter__(self) -> Iterator[dict]:
        return (resize_pixels(b, self.size) for b in self.batches)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def at_resolution(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of a CLIP whose vision tower takes ``image_size`` images: position embeddings interpolated to the new
    patch grid, config and embedding bookkeeping updated."""
    model = copy.deepcopy(model)
    emb = model.vision_model.embeddings
    if image_size % emb.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {emb.patch_size}")
    with torch.no_grad():
        probe = torch.zeros(1, (image_size // emb.patch_size) ** 2 + 1, emb.embed_dim)
        table = emb.interpolate_pos_encoding(probe, image_size, image_size)[0].clone()
    emb.position_embedding = nn.Embedding(table.shape[0], emb.embed_dim).to(table.device, table.dtype)
    emb.position_embedding.weight.data.copy_(table)
    emb.image_size = image_size
    emb.num_patches = table.shape[0] - 1
    emb.num_positions = table.shape[0]
    emb.register_buffer("position_ids", torch.arange(table.shape[0], device=table.device).expand((1, -1)),
                        persistent=False)
    model.config.vision_config.image_size = image_size
    emb.config.image_size = image_size
    return model


def dense_flops_at(model: nn.Module, image_size: int, text_length: int) -> int:
    """Analytic dense FLOPs of one image-text pair at ``image_size`` (the adapter's FLOPs model)."""
    adapter = get_adapter(model)
    installed = adapter.is_installed()
    if not installed:
        adapter.install()
    try:
        return adapter.count_flops({"image_size": image_size, "text_length": text_length})
    finally:
        if not installed:
            adapter.uninstall()


def choose_image_size(flops_at: dict[int, int], full_size: int, target_removed: float, max_removed: float) -> int:
    """The size whose FLOPs reduction against ``full_size`` is closest to ``target_removed`` without exceeding
    ``max_removed`` (``flops_at``: dense FLOPs per candidate size, ``full_size`` included)."""
    full = flops_at[full_size]
    allowed = [s for s in flops_at if 1 - flops_at[s] / full <= max_removed + 1e-12]
    return min(allowed, key=lambda s: (abs(1 - flops_at[s] / full - target_removed), -s))


def remaining_ratio(ratio: float, kept_low: float) -> float:
    """Fraction of the low-resolution model's FLOPs param-only must remove so that ``ratio`` of the full dense
    FLOPs is removed in all (``kept_low`` = low-resolution dense FLOPs / full dense FLOPs)."""
    return 1 - (1 - ratio) / kept_low


@dataclass(frozen=True)
class DownsamplePlan:
    image_size: int
    kept_low: float  # low-resolution dense FLOPs / full dense FLOPs
    ratios: dict[float, float]  # full-model ratio -> the param-only ratio at low resolution (> 0 only)
    flops_step: float  # the same absolute FLOPs per stage as the other arms, as a fraction of the low-res model
    adapt_steps: int  # fine-tuning at the new size: the token stages the resolution replaces


def plan(model: nn.Module, ratios: list[float], config: Any, text_length: int) -> DownsamplePlan:
    """Choose the image size for ``config.sjp_token_share`` of the largest ratio and translate every ratio."""
    emb = model.vision_model.embeddings
    full, patch = emb.image_size, emb.patch_size
    flops_at = {s: dense_flops_at(model, s, text_length) for s in range(patch, full + 1, patch)}
    target = config.sjp_token_share * max(ratios)
    size = choose_image_size(flops_at, full, target, min(ratios))
    kept_low = flops_at[size] / flops_at[full]
    translated = {r: remaining_ratio(r, kept_low) for r in ratios}
    final, step_low = max(ratios), config.flops_step / kept_low
    adapt = (nominal_search_steps(final, config.flops_step, config.stage_steps)
             - nominal_search_steps(max(translated[final], 0.0), step_low, config.stage_steps))
    return DownsamplePlan(size, kept_low, translated, step_low, max(adapt, 0))


def param_config(config: Any, p: DownsamplePlan) -> Any:
    """The param-only PruneConfig for the low-resolution model (ratios below 0 are reached by resolution alone)."""
    ratios = sorted(r for r in p.ratios.values() if r > 0)
    reference = dict(config.reference) if config.reference else None
    if reference and "image_size" in reference:
        reference["image_size"] = p.image_size
    return replace(config, strategy="param-only", ratio=ratios[-1], snapshots=tuple(ratios), flops_step=p.flops_step,
                   reference=reference)


def downsample_steps_note(p: DownsamplePlan) -> str:
    return (f"downsample: {p.image_size} px ({p.kept_low:.3f} of dense FLOPs), {p.adapt_steps} adaptation steps, "
            f"param-only ratios {', '.join(f'{r}->{v:.3f}' for r, v in p.ratios.items())}")


__all__ = [
    "DownsamplePlan",
    "ResizedBatches",
    "at_resolution",
    "choose_image_size",
    "downsample_steps_note",
    "param_config",
    "plan",
    "remaining_ratio",
    "resize_pixels",
]
