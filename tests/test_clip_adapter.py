"""CLIP adapter invariants: keep-all = unmodified, hard-masked = sliced, padded batches, deepcopy, no leaks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_clip
from transformers.models.clip import modeling_clip

from comp_vlm import AdapterOptions, ConfigError, UnsupportedModelError, get_adapter
from comp_vlm.errors import CompVLMError

ATOL = 2e-5


def embeds(model, pixels, batch):
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.image_embeds, out.text_embeds, out.logits_per_image


def assert_close(a, b, atol=ATOL):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max().item()


def prune_all_sites(adapter, ratio):
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, ratio)


def random_masks(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    for spec in adapter.tower_specs():
        for i in range(len(adapter.layers(spec))):
            h = (torch.rand(spec.num_heads, generator=g) > 0.4).float()
            n = (torch.rand(spec.neurons, generator=g) > 0.5).float()
            if spec.name == "vision" and i == 2:
                h.zero_()  # the whole attention sub-block of a layer with a site goes
            if spec.name == "text" and i == 1:
                n.zero_()  # the whole MLP goes
            adapter.set_head_mask(spec.name, i, h)
            adapter.set_neuron_mask(spec.name, i, n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_unmodified_every_hidden_state(attn, pixels, text_batch):
    model = make_clip(0, attn=attn)
    with torch.no_grad():
        ref_v = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        ref_t = model.text_model(**text_batch, output_hidden_states=True)
    ref = embeds(model, pixels, text_batch)
    get_adapter(model).install(AdapterOptions(dead_compute=False))
    with torch.no_grad():
        got_v = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        got_t = model.text_model(**text_batch, output_hidden_states=True)
    assert_close(ref_v.hidden_states, got_v.hidden_states)
    assert_close(ref_t.hidden_states, got_t.hidden_states)
    assert_close([ref_v.last_hidden_state, ref_t.last_hidden_state], [got_v.last_hidden_state, got_t.last_hidden_state])
    assert_close(ref, embeds(model, pixels, text_batch))


def test_dead_compute_keeps_pooled_outputs(pixels, text_batch):
    model = make_clip(1)
    ref = embeds(model, pixels, text_batch)
    adapter = get_adapter(model).install()  # dead compute on by default
    assert adapter.options.dead_compute
    assert_close(ref, embeds(model, pixels, text_batch))
    seen = []
    last_mlp = model.vision_model.encoder.layers[-1].mlp
    handle = last_mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    embeds(model, pixels, text_batch)
    handle.remove()
    assert seen == [1]


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hard_masked_equals_sliced(attn, keep, pixels, text_batch):
    model = make_clip(2, attn=attn)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, keep)
    random_masks(adapter, 7)
    masked = embeds(model, pixels, text_batch)
    flops_masked = adapter.count_flops()
    adapter.slice()
    assert model.vision_model.encoder.layers[2].self_attn.q_proj.out_features == 0
    assert model.text_model.encoder.layers[1].mlp.fc1.out_features == 0
    assert model.vision_model.encoder.layers[0].self_attn.num_heads == int(
        (model.vision_model.encoder.layers[0].self_attn.q_proj.out_features) / 10)
    assert_close(masked, embeds(model, pixels, text_batch))
    assert adapter.count_flops() == flops_masked


def test_site_in_layer_without_heads_is_disabled(pixels):
    model = make_clip(3)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    adapter.set_keep_ratio("vision", 1, 0.25)
    adapter.set_head_mask("vision", 1, [0, 0, 0, 0])
    seen = []
    h = model.vision_model.encoder.layers[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
    h.remove()
    assert seen == [17]  # nothing dropped
    tower = next(t for t in adapter.structure() if t.name == "vision")
    assert tower.layers[1].heads == 0


def test_token_sites_really_shorten_sequences(pixels, text_batch):
    model = make_clip(4)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    prune_all_sites(adapter, 0.5)
    seen = []
    hooks = [lay.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
             for lay in model.vision_model.encoder.layers]
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
    for h in hooks:
        h.remove()
    # 16 patches + CLS; sites at layers 1, 2 keep half of the prunable patches
    assert seen == [17, 9, 5]


@pytest.mark.parametrize("keep", [0.5, 0.2])
@pytest.mark.parametrize("eos_id", [None, 2])
def test_padded_batch_equals_samples_alone(eos_id, keep, tokenizer, text_batch):
    model = make_clip(5, eos_token_id=eos_id, text_layers=5)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, keep)
    assert len(adapter.token_sites("T_l")) == 3
    with torch.no_grad():
        together = model.get_text_features(**text_batch).pooler_output
        out = model.text_model(**text_batch)
        for i in range(text_batch["input_ids"].shape[0]):
            n = int(text_batch["attention_mask"][i].sum())
            alone = model.get_text_features(input_ids=text_batch["input_ids"][i:i + 1, :n]).pooler_output
            assert torch.allclose(together[i], alone[0], atol=ATOL), (together[i] - alone[0]).abs().max()
    # the pooled EOS token survived and sits at its original position; dropped positions are zero
    eos_pos = (text_batch["input_ids"] == tokenizer.eos_token_id).int().argmax(-1)
    lhs = out.last_hidden_state
    assert (lhs[torch.arange(lhs.shape[0]), eos_pos].abs().sum(-1) > 0).all()


def test_padding_after_eos_gives_same_result_without_mask(text_batch):
    model = make_clip(5, text_layers=5)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, 0.3)
    with torch.no_grad():
        masked = model.get_text_features(**text_batch).pooler_output
        unmasked = model.get_text_features(input_ids=text_batch["input_ids"]).pooler_output
    assert torch.allclose(masked, unmasked, atol=ATOL)


def test_masks_validate_values_and_shapes():
    adapter = get_adapter(make_clip(0)).install()
    with pytest.raises(ConfigError, match="shape"):
        adapter.set_head_mask("vision", 0, [1, 1])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        adapter.set_neuron_mask("text", 0, [1.5] * 48)
    with pytest.raises(ConfigError, match="keep ratio"):
        adapter.set_keep_ratio("vision", 1, 0.0)
    with pytest.raises(ConfigError, match="keep ratio"):
        adapter.set_keep_ratio("vision", 1, 1.5)
    with pytest.raises(ConfigError, match="no token site"):
        adapter.set_keep_ratio("vision", 0, 0.5)
    with pytest.raises(ConfigError, match="no tower"):
        adapter.set_head_mask("audio", 0, [1])
    adapter.set_head_mask("vision", 0, [1, 0.5, 1, 1])
    with pytest.raises(ConfigError, match="soft"):
        adapter.slice()


def test_soft_mask_scales_between_on_and_off(pixels):
    model = make_clip(6)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    outs = []
    for v in (1.0, 0.5, 0.0):
        adapter.set_neuron_mask("vision", 1, [v] * 64)
        with torch.no_grad():
            outs.append(model.vision_model(pixel_values=pixels).last_hidden_state)
    # the neuron mask acts after the activation: the MLP contribution of layer 1 is linear in the mask value,
    # but later layers are nonlinear, so only check the ordering of distances
    d_half = (outs[1] - outs[0]).abs().mean()
    d_off = (outs[2] - outs[0]).abs().mean()
    assert 0 < d_half < d_off


def test_deepcopy_is_independent(pixels, text_batch):
    model = make_clip(7)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, 0.5)
    adapter.set_head_mask("vision", 1, [1, 0, 1, 0])
    before = embeds(model, pixels, text_batch)
    clone = copy.deepcopy(model)
    assert_close(before, embeds(clone, pixels, text_batch))
    get_adapter(clone).set_head_mask("vision", 1, [0, 1, 0, 1])
    get_adapter(clone).set_keep_ratio("vision", 1, 1.0)
    assert_close(before, embeds(model, pixels, text_batch))
    assert not torch.allclose(embeds(clone, pixels, text_batch)[0], before[0])


def test_no_class_level_leak_and_uninstall(pixels, text_batch):
    model, other = make_clip(8), make_clip(8)
    layer_forward = modeling_clip.CLIPEncoderLayer.forward
    encoder_forward = modeling_clip.CLIPEncoder.forward
    ref = embeds(other, pixels, text_batch)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, 0.5)
    adapter.set_head_mask("text", 0, [0, 1, 1, 1])
    assert modeling_clip.CLIPEncoderLayer.forward is layer_forward
    assert modeling_clip.CLIPEncoder.forward is encoder_forward
    assert_close(ref, embeds(other, pixels, text_batch), atol=0)
    assert other.config._attn_implementation == "sdpa"
    assert not torch.allclose(embeds(model, pixels, text_batch)[1], ref[1])
    adapter.uninstall()
    assert_close(ref, embeds(model, pixels, text_batch), atol=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_sites_need_attention_probabilities(pixels):
    model = make_clip(9)
    adapter = get_adapter(model).install()
    prune_all_sites(adapter, 0.5)
    model.set_attn_implementation("sdpa")
    with pytest.raises(CompVLMError, match="attention probabilities"):
        model.get_image_features(pixel_values=pixels)


def test_gradient_checkpointing_gives_same_gradients(text_batch):
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = make_clip(10)
        adapter = get_adapter(model).install()
        prune_all_sites(adapter, 0.5)
        adapter.set_head_mask("vision", 1, [1, 0.5, 1, 0])
        if ckpt:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        out = model(pixel_values=pixels, **text_batch, return_loss=True)
        out.loss.backward()
        grads.append(model.vision_model.encoder.layers[1].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_unsupported_model_class():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        get_adapter(torch.nn.Linear(2, 2))


def test_modes_and_units():
    adapter = get_adapter(make_clip(0, vision_layers=3, text_layers=2))
    assert adapter.modes() == ["P_v", "T_v", "P_l"]  # 2 text layers + dead compute: no text site
    groups = adapter.param_groups("P_v")
    assert [(g.layer, g.kind, g.size) for g in groups][:2] == [(0, "head", 4), (0, "neuron", 64)]
    assert {s.layer for s in adapter.token_sites("T_v")} == {1}  # dead compute: no site in the last layer
    assert {s.layer for s in adapter.token_sites("T_l")} == set()
    adapter.install(AdapterOptions(dead_compute=False))
    assert {s.layer for s in adapter.token_sites("T_v")} == {1, 2}
    assert adapter.modes() == ["P_v", "T_v", "P_l", "T_l"]
