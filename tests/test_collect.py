"""CIM statistics collected during training forwards (comp_vlm.collect + the CLIP layer forward)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_clip

from comp_vlm import AdapterOptions, get_adapter
from comp_vlm.collect import StatsCollector


def attach(model, weighting="cip"):
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=True))
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, 0.5)
    adapter.set_head_mask("vision", 1, [1, 0.5, 1, 0])
    collector = StatsCollector(weighting)
    collector.enabled = True
    adapter.attach_collector(collector)
    return adapter, collector


def run(model, pixels, batch):
    out = model(pixel_values=pixels, **batch, return_loss=True)
    out.loss.backward()


def test_every_unit_gets_statistics(text_batch):
    model = make_clip(0)
    model.train()
    adapter, coll = attach(model)
    pixels = torch.randn(4, 3, 16, 16)
    run(model, pixels, text_batch)
    for spec in adapter.tower_specs():
        for i in range(len(adapter.layers(spec))):
            assert coll.stats[("head", spec.name, i)].shape == (spec.num_heads * spec.head_dim,)
            assert coll.stats[("neuron", spec.name, i)].shape == (spec.neurons,)
            assert (coll.stats[("neuron", spec.name, i)] >= 0).all()
    # the masked head (vision layer 1, head 3) carries no activation, so no statistic
    hd = adapter.tower("vision").head_dim
    assert coll.stats[("head", "vision", 1)][3 * hd:4 * hd].abs().max() == 0
    assert coll.stats[("head", "vision", 1)][0:hd].abs().max() > 0


def test_eval_and_no_grad_collect_nothing(pixels, text_batch):
    model = make_clip(1)
    _, coll = attach(model)
    model.eval()
    model(pixel_values=pixels, **text_batch)
    model.train()
    with torch.no_grad():
        model(pixel_values=pixels, **text_batch)
    assert coll.stats == {}
    model(pixel_values=pixels, **text_batch)
    assert any(kind == "head" for kind, _, _ in coll.stats)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputation_is_not_counted_twice(text_batch, reentrant):
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    stats = []
    for ckpt in (False, True):
        model = make_clip(2)
        _, coll = attach(model)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        run(model, pixels, text_batch)
        stats.append(coll.state_dict())
    assert stats[0].keys() == stats[1].keys()
    for key in stats[0]:
        assert torch.allclose(stats[0][key], stats[1][key], rtol=1e-5, atol=1e-9), key


def test_statistics_add_over_batch_halves(text_batch):
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model = make_clip(3)
    model.train()
    _, whole = attach(model)
    with torch.enable_grad():
        model(pixel_values=pixels, **text_batch)
    whole_stats = whole.state_dict()
    whole.reset()
    for part in (slice(0, 2), slice(2, 4)):
        half = {k: v[part] for k, v in text_batch.items()}
        n = int(half["attention_mask"].sum(1).max())  # each half padded to its own longest text
        half = {k: v[:, :n] for k, v in half.items()}
        model(pixel_values=pixels[part], **half)
    for key, value in whole.state_dict().items():
        assert torch.allclose(value, whole_stats[key], rtol=1e-4, atol=1e-8), key


def test_masked_neurons_and_heads_have_zero_statistics(text_batch):
    model = make_clip(4)
    model.train()
    adapter, coll = attach(model)
    adapter.set_neuron_mask("text", 0, [0.0] * 8 + [1.0] * 40)
    model(pixel_values=torch.randn(4, 3, 16, 16), **text_batch)
    stat = coll.stats[("neuron", "text", 0)]
    assert stat[:8].abs().max() == 0 and stat[8:].min() > 0
