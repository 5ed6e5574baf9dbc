"""Prunable units as data: a kind is a UnitSpec, and masks, slicing, scores and FLOPs follow from it generically."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comp_vlm.adapters import units
from comp_vlm.adapters.units import Span, UnitSpec
from comp_vlm.errors import RecipeError
from comp_vlm.flops import attention_flops, unit_flops
from comp_vlm.importance import head_scores, neuron_scores, unit_scores
from comp_vlm.recipe import LayerRecipe
from comp_vlm.structure import LayerStructure


class GatedBlock(nn.Module):
    """A made-up layer: ``fused`` emits [gate | value] laid out in blocks of 3 channels per unit; ``down`` reads
    the units' gated values back."""

    def __init__(self, n_units: int = 4, width: int = 3, d: int = 6) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.fused = nn.Linear(d, 2 * n_units * width)
        self.down = nn.Linear(n_units * width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.inner.fused(x).chunk(2, dim=-1)
        return self.down(torch.sigmoid(gate) * value)


def widget_spec(masked: str) -> UnitSpec:
    """A kind no adapter knows: 4 units of 3 channels, rows of a fused (x2) projection and columns of ``down``;
    ``masked`` says which side the soft mask scales."""
    spans = (Span("inner.fused", "out", repeats=2, masked=masked == "out"), Span("down", "in", masked=masked == "in"))
    return UnitSpec("widget", "inner", 3, 4, spans, "down", "widgets", count_attrs=("n_widgets",))


@pytest.mark.parametrize("masked", ["out", "in"])
def test_a_new_kind_masks_and_slices_through_the_generic_path(masked):
    torch.manual_seed(0)
    block, spec, x = GatedBlock(), widget_spec(masked), torch.randn(2, 7, 6)
    units.set_mask(block, spec, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    masked_out = block(x)
    units.install_mask_hooks(block, spec)  # idempotent: still one hook
    assert sum(isinstance(h, units.UnitMaskHook) for m in block.modules()
               for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())) == 1
    for m in block.modules():
        for registry in (m._forward_hooks, m._forward_pre_hooks):
            registry.clear()
    assert units.kept(block, spec) == [0, 2, 3] and units.dense_index(block, spec) == [0, 1, 2, 3]
    units.slice_units(block, spec, [0, 2, 3])
    assert block.inner.fused.out_features == 2 * 3 * 3 and block.down.in_features == 3 * 3
    assert units.dense_index(block, spec) == [0, 2, 3] and block.inner.n_widgets == 3
    assert torch.allclose(block(x), masked_out, atol=1e-6)


def test_a_soft_mask_scales_the_masked_span_only():
    torch.manual_seed(1)
    block, spec, x = GatedBlock(), widget_spec("in"), torch.randn(1, 2, 6)
    gate, value = block.inner.fused(x).chunk(2, dim=-1)
    hidden = torch.sigmoid(gate) * value
    units.set_mask(block, spec, torch.tensor([0.5, 1.0, 1.0, 0.0]))
    scale = torch.tensor([0.5, 1.0, 1.0, 0.0]).repeat_interleave(3)
    expected = nn.functional.linear(hidden * scale, block.down.weight, block.down.bias)  # (down is hooked)
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_mask_buffer_and_index_names_follow_the_kind():
    spec = widget_spec("in")
    assert (spec.mask_buffer, spec.index_attr, spec.plural) == ("comp_widget_mask", "comp_widget_index", "widgets")
    assert units.mask_buffer("head") == "comp_head_mask"  # the buffer the CLIP forward reads


def test_unit_scores_choose_by_width():
    w, stat = torch.randn(5, 12), torch.rand(12, dtype=torch.float64)
    assert torch.equal(unit_scores(w, stat, 3), head_scores(w, stat, 3))
    assert torch.equal(unit_scores(w, stat, 1), neuron_scores(w, stat))


def test_unit_flops_are_the_engine_numbers():
    lay = LayerStructure(hidden=32, heads=3, head_dim=8, neurons=50, mlp_matrices=3)
    assert unit_flops("head", lay, 17, 5) == attention_flops(17, LayerStructure(32, 1, 8, 0))
    assert unit_flops("neuron", lay, 17, 5) == 2 * 5 * 32 * 3
    with pytest.raises(ValueError, match="widget"):
        unit_flops("widget", lay, 17, 5)


def test_recipe_layers_hold_any_unit_kind():
    lay = LayerRecipe.from_units({"head": [0, 2], "neuron": [1], "widget": [0]}, 0.5)
    assert (lay.kept("head"), lay.kept("neuron"), lay.kept("widget"), lay.keep_ratio) == ([0, 2], [1], [0], 0.5)
    with pytest.raises(RecipeError, match="gadget"):
        lay.kept("gadget")
