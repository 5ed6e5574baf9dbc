"""The downsample sanity baseline (benchmarks/downsample.py): resolution choice, ratio translation, step budget,
and a CLIP at a lower resolution that is a native model of that size."""

from __future__ import annotations

from types import SimpleNamespace

import downsample as ds
import pytest
import torch
from conftest import make_clip


def test_choose_image_size_closest_reduction_within_the_bound():
    flops = {16: 100, 12: 70, 8: 45, 4: 30}  # reductions 0, 0.30, 0.55, 0.70
    assert ds.choose_image_size(flops, 16, target_removed=0.4, max_removed=0.5) == 12  # 8 would pass 0.5
    assert ds.choose_image_size(flops, 16, target_removed=0.5, max_removed=0.6) == 8
    assert ds.choose_image_size(flops, 16, target_removed=0.0, max_removed=0.5) == 16


def test_remaining_ratio_lands_on_the_full_model_target():
    kept_low = 0.6
    for ratio in (0.5, 0.8):
        r = ds.remaining_ratio(ratio, kept_low)
        assert kept_low * (1 - r) == pytest.approx(1 - ratio)
    assert ds.remaining_ratio(0.3, 0.6) < 0  # reached by the resolution alone


def test_plan_gives_the_same_nominal_steps_as_a_search_to_the_final_ratio():
    model = make_clip(0)
    config = SimpleNamespace(sjp_token_share=0.5, flops_step=0.05, stage_steps=10)
    p = ds.plan(model, [0.5, 0.8], config, text_length=9)
    assert p.image_size in (4, 8, 12)
    assert 1 - p.kept_low <= 0.5 + 1e-12
    assert p.flops_step == pytest.approx(0.05 / p.kept_low)
    # resolution stages + param-only stages at the low-res step = the others' 0.8 / 0.05 = 16 stages
    param_stages = -(-round(p.ratios[0.8] / p.flops_step, 9) // 1)
    assert p.adapt_steps + param_stages * 10 == 160


def test_low_resolution_clip_is_a_native_clip_of_that_size():
    model = make_clip(0)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    small = torch.nn.functional.interpolate(pixels, size=(8, 8), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=small, interpolate_pos_encoding=True).last_hidden_state
        low = ds.at_resolution(model, 8)
        got = low.vision_model(pixel_values=small).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-6)
    assert low.config.vision_config.image_size == 8 and model.config.vision_config.image_size == 16
    assert low.vision_model.embeddings.position_embedding.weight.shape[0] == 1 + 4
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ds.at_resolution(model, 10)


def test_resized_batches_resize_pixels_and_pass_state_through():
    class Loader:
        def __init__(self):
            self.state = {"position": 3}

        def __iter__(self):
            return iter([{"pixel_values": torch.ones(1, 3, 16, 16), "input_ids": torch.ones(1, 4)}])

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, state):
            self.state = state

    loader = Loader()
    resized = ds.ResizedBatches(loader, 8)
    batch = next(iter(resized))
    assert batch["pixel_values"].shape == (1, 3, 8, 8) and torch.allclose(batch["pixel_values"], torch.ones(1))
    assert resized.state_dict() == {"position": 3}
    resized.load_state_dict({"position": 5})
    assert loader.state == {"position": 5}
