"""Image preprocessing shared by training and deployment, so a saved model gives the same numbers in a
transformers pipeline as it did in training.

The synthetic world renders float images in ``[0, 1]``; a deployed model sees 8-bit images (PIL) that a
``CLIPImageProcessor`` rescales by 1/255 and normalises. :class:`ProcessorWorld` quantises its renders to the
8-bit grid before normalising, so ``processor(to_pil(raw))`` equals the training tensor exactly (checked by
:func:`processor_gap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .synthetic import SyntheticWorld


def quantize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Round images in ``[0, 1]`` to the 8-bit grid (values ``k / 255``)."""
    return (pixels.clamp(0, 1) * 255).round() / 255


def to_pil(pixels: torch.Tensor) -> list:
    """``(n, 3, H, W)`` images in ``[0, 1]`` as a list of RGB PIL images."""
    from PIL import Image

    arr = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in arr]


def _clip_image_processor_class() -> type:
    """The PIL-backed CLIP image processor when torchvision is absent (no warning), else the default one."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        try:
            from transformers.models.clip import CLIPImageProcessorPil

            return CLIPImageProcessorPil
        except ImportError:
            pass
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor


def make_image_processor(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """A ``CLIPImageProcessor`` for ``image_size`` pixel images: resize (a no-op at that size), centre crop,
    rescale by 1/255 and normalise with ``mean``/``std`` -- the exact inverse-free twin of :class:`ProcessorWorld`."""
    cls = _clip_image_processor_class()
    return cls(
        size={"shortest_edge": int(image_size)}, crop_size={"height": int(image_size), "width": int(image_size)},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[float(v) for v in mean], image_std=[float(v) for v in std], do_convert_rgb=True,
    )


class ProcessorWorld(SyntheticWorld):
    """A :class:`SyntheticWorld` whose images lie on the 8-bit grid, optionally normalised with a given
    mean/std (e.g. those of an existing model's image processor) instead of the world's own statistics."""

    def __init__(self, *args: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fixed = None if mean is None or std is None else (tuple(map(float, mean)), tuple(map(float, std)))

    def sample_raw_keyed(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
        pixels, captions, keys = super().sample_raw_keyed(n, seed)
        return quantize_uint8(pixels), captions, keys

    @property
    def image_mean(self) -> tuple[float, ...]:
        return self._fixed[0] if self._fixed else super().image_mean

    @property
    def image_std(self) -> tuple[float, ...]:
        return self._fixed[1] if self._fixed else super().image_std

    def image_processor(self) -> Any:
        return make_image_processor(self.image_size, self.image_mean, self.image_std)


def processor_gap(world: ProcessorWorld, processor: Any, n: int = 8, seed: int = 12345) -> float:
    """Max |processor(PIL image) - training tensor| over ``n`` world images (0 when they agree exactly)."""
    raw, _ = world.sample_raw(n, seed=seed)
    expected = world.normalise(raw)
    got = processor(to_pil(raw), return_tensors="pt")["pixel_values"]
    if got.shape != expected.shape:
        return float("inf")
    return float((got.float() - expected).abs().max())


__all__ = ["ProcessorWorld", "make_image_processor", "processor_gap", "quantize_uint8", "to_pil"]
