"""The analytic FLOPs model against torch's FlopCounterMode on the model as it actually runs (eager attention)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_clip
from torch.utils.flop_counter import FlopCounterMode

from comp_vlm import AdapterOptions, get_adapter
from comp_vlm.flops import LayerStructure, attention_flops, kept_token_count, mlp_flops, tower_flops
from comp_vlm.structure import TowerStructure


@pytest.mark.parametrize(("m", "r", "k"), [(10, 0.5, 5), (9, 0.5, 5), (7, 0.5, 4), (3, 0.1, 1), (0, 0.5, 0),
                                           (16, 1.0, 16), (5, 0.3, 2), (4, 0.625, 3)])
def test_kept_token_count(m, r, k):
    assert kept_token_count(m, r) == k


def test_layer_flops_hand_computed():
    lay = LayerStructure(hidden=8, heads=2, head_dim=4, neurons=16)
    # q,k,v,o: 4 * 2*N*8*8 ; QK^T and AV: 2 * 2*N*N*8 ; with N = 5
    assert attention_flops(5, lay) == 4 * 2 * 5 * 8 * 8 + 2 * 2 * 5 * 5 * 8
    assert mlp_flops(5, lay) == 2 * 5 * 8 * 16 * 2
    tower = TowerStructure("t", 5, 1, (lay, LayerStructure(8, 2, 4, 16, site_keep=0.5)), extra_flops=7)
    tf = tower_flops(tower)
    # layer 1: attention on 5 tokens, site keeps round(0.5*4)=2 of 4 prunable -> MLP on 3 tokens
    assert tf.tokens_in == (5, 5) and tf.tokens_mlp == (5, 3)
    assert tf.total == 7 + attention_flops(5, lay) * 2 + mlp_flops(5, lay) + mlp_flops(3, lay)


def measured(model, pixels=None, input_ids=None):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        if pixels is not None:
            model.get_image_features(pixel_values=pixels)
        if input_ids is not None:
            model.get_text_features(input_ids=input_ids)
    return fc.get_total_flops()


def random_structure(adapter, gen, params: bool, tokens: bool):
    for spec in adapter.tower_specs():
        for i in range(len(adapter.layers(spec))):
            if params:
                h = (torch.rand(spec.num_heads, generator=gen) > 0.4).float()
                if i == 0:
                    h.zero_()  # a layer with no heads left at all
                n = (torch.rand(spec.neurons, generator=gen) > 0.5).float()
                adapter.set_head_mask(spec.name, i, h)
                adapter.set_neuron_mask(spec.name, i, n)
            if tokens and i in adapter.site_layers(spec):
                adapter.set_keep_ratio(spec.name, i, float(torch.empty(1).uniform_(0.2, 0.9, generator=gen)))


@pytest.mark.parametrize("dead_compute", [True, False])
@pytest.mark.parametrize(("params", "tokens"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_flops_model_matches_counter(dead_compute, params, tokens, seed):
    model = make_clip(seed, attn="eager", vision_layers=4, text_layers=3)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=dead_compute, site_start=1))
    random_structure(adapter, torch.Generator().manual_seed(seed), params, tokens)
    if params:
        adapter.slice()  # count the physically sliced model
    length = 9
    pixels = torch.randn(1, 3, 16, 16)
    ids = torch.randint(3, 20, (1, length))
    ids[0, 0], ids[0, -1] = 2, model.config.text_config.eos_token_id
    ref = {"image_size": 16, "text_length": length}
    analytic = adapter.count_flops(ref)
    counted = measured(model, pixels, ids)
    assert analytic == pytest.approx(counted, rel=0.02)
    # the convention is exact for CLIP: nothing but matmuls and the patch convolution is counted
    assert analytic == counted
    if params or tokens:
        dense = sum(tower_flops(t).total for t in adapter.dense_structure(ref))
        assert analytic < dense


def test_masked_structure_counts_like_sliced():
    model = make_clip(3, attn="eager")
    adapter = get_adapter(model).install()
    random_structure(adapter, torch.Generator().manual_seed(3), True, True)
    before = adapter.count_flops()
    adapter.slice()
    assert adapter.count_flops() == before


def test_dead_compute_removes_last_mlp_tokens():
    model = make_clip(0, attn="eager")
    a = get_adapter(model).install(AdapterOptions(dead_compute=True))
    on = a.count_flops()
    a.install(AdapterOptions(dead_compute=False))
    off = a.count_flops()
    vc, tc = model.config.vision_config, model.config.text_config
    n_img = (16 // 4) ** 2 + 1
    saved = 2 * (n_img - 1) * vc.hidden_size * vc.intermediate_size * 2 + 2 * (16 - 1) * tc.hidden_size * tc.intermediate_size * 2
    assert off - on == saved
