"""BLIP-specific checks of the adapter (issue 21 part 1); the contract cases cover the shared invariants."""

from __future__ import annotations

import pytest
import torch
from tiny_blip import make_blip, question_batch, sample, tiny_blip_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipForQuestionAnswering

from comp_vlm import get_adapter
from comp_vlm.collect import StatsCollector
from comp_vlm.errors import ConfigError, RecipeError
from comp_vlm.flops import cross_attention_flops, model_tower_flops
from comp_vlm.structure import resolve_couplings


def itm_inputs() -> dict[str, torch.Tensor]:
    batch = question_batch()
    batch.pop("decoder_input_ids")
    return batch


def with_sites(model, keep: float):
    adapter = get_adapter(model).install()
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, keep)
    return adapter


def zero_mask(adapter, kind: str, tower: str, layer: int) -> None:
    adapter.set_unit_mask((kind, tower, layer), torch.zeros(adapter.unit_group((kind, tower, layer)).size))


@pytest.mark.parametrize("keep_heads", [[1, 3], [2], []])
def test_vision_attention_after_head_slicing_works_for_any_head_count(keep_heads):
    model = make_blip(0)
    adapter = get_adapter(model).install()
    mask = torch.zeros(4)
    mask[keep_heads] = 1.0
    adapter.set_unit_mask(("head", "vision", 1), mask)
    inputs = itm_inputs()
    with torch.no_grad():
        masked = model(**inputs).itm_score
        adapter.slice()
        attn = model.vision_model.encoder.layers[1].self_attn
        assert attn.qkv.out_features == 3 * len(keep_heads) * attn.head_dim and attn.num_heads == len(keep_heads)
        assert torch.allclose(model(**inputs).itm_score, masked, atol=2e-5)


def test_text_layer_without_self_attention_heads_gives_the_bias_and_no_site():
    model = make_blip(1)
    adapter = with_sites(model, 0.5)
    zero_mask(adapter, "head", "text", 1)
    adapter.slice()
    layers = model.text_encoder.encoder.layer
    seen = {}
    hooks = [layers[1].attention.output.dense.register_forward_hook(lambda m, a, out: seen.update(dense=out)),
             *(layer.register_forward_hook(lambda m, a, out, i=i: seen.update({i: (a[0].shape[1], out[0].shape[1])}))
               for i, layer in enumerate(layers))]
    inputs = itm_inputs()
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    assert layers[1].attention.self.query.out_features == 0
    assert torch.equal(seen["dense"], layers[1].attention.output.dense.bias.expand_as(seen["dense"]))
    assert seen[1][0] == seen[1][1]  # the headless layer's site is off
    assert seen[2][1] < seen[2][0]  # the next site drops tokens
    assert adapter.structure()[1].layers[1].heads == 0


def test_itc_forward_runs_with_sites_on_and_each_text_alone_is_the_same():
    model = make_blip(2)
    with_sites(model, 0.5)
    inputs = itm_inputs()
    with torch.no_grad():
        sims = model(**inputs, use_itm_head=False).itm_score
        assert sims.shape == (4, 4)
        for i in range(4):
            alone = model(**sample(inputs, i), use_itm_head=False).itm_score
            assert torch.allclose(sims[i, i], alone[0, 0], atol=2e-5)


def test_cross_head_mask_equals_the_sliced_model():
    model = make_blip(3)
    adapter = with_sites(model, 0.5)
    adapter.set_unit_mask(("cross_head", "text", 0), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    adapter.set_unit_mask(("cross_head", "text", 2), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    inputs = itm_inputs()
    with torch.no_grad():
        masked = model(**inputs).itm_score
        adapter.slice()
        assert model.text_encoder.encoder.layer[2].crossattention.self.all_head_size == 8
        assert adapter.dense_index(("cross_head", "text", 2)) == [3]
        assert torch.allclose(model(**inputs).itm_score, masked, atol=2e-5)
    assert adapter.unit_group(("cross_head", "text", 0)).mode == "P_c"
    assert adapter.recipe().towers["text"][0].units["cross_head"] == [0, 2]


@pytest.mark.parametrize("vqa", [False, True])
def test_layer_without_cross_heads_runs_and_counts_no_cross_attention_flops(vqa):
    model = make_blip(4, vqa=vqa)
    adapter = with_sites(model, 0.5)
    tower = "decoder" if vqa else "text"
    zero_mask(adapter, "cross_head", tower, 1)
    adapter.slice()
    reference = {"image_size": 16, "image_width": 16, "text_length": 6, "answer_length": 4}
    layer = resolve_couplings(adapter.structure(reference), adapter.couplings())[2 if vqa else 1].layers[1]
    assert layer.cross_heads == 0 and cross_attention_flops(5, layer) == 0
    assert layer.cross_kv_tokens > 0  # the other layers still read the source's tokens
    gen = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(1, 3, 16, 16, generator=gen), "input_ids": torch.randint(3, 20, (1, 6))}
    if vqa:
        inputs["decoder_input_ids"] = torch.randint(3, 20, (1, 4), generator=gen)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    assert adapter.count_flops(reference) == counter.get_total_flops()
    flops = model_tower_flops(adapter.structure(reference), adapter.couplings())
    assert flops[tower].per_layer[1] < flops[tower].per_layer[0]


def decoder_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The answer decoder's logits in the model's forward (which does not return them)."""
    logits = []
    handle = model.text_decoder.register_forward_hook(lambda m, a, out: logits.append(out.logits))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return logits[0]


def test_vqa_keep_all_on_padded_questions_equals_each_question_alone_unmodified():
    """transformers' decoder attends the question padding (it drops the cross-attention mask); installed, the
    adapter masks it, so a padded batch gives what the unmodified model gives each question unpadded."""
    model = make_blip(5, vqa=True)
    batch = question_batch()
    alone = [decoder_logits(model, sample(batch, i)) for i in range(4)]
    unmodified = decoder_logits(model, batch)
    assert not torch.allclose(unmodified[2:3], alone[2], atol=1e-4)  # "red": the most padded question
    get_adapter(model).install()
    installed = decoder_logits(model, batch)
    for i in range(4):
        assert torch.allclose(installed[i:i + 1], alone[i], atol=2e-5)


def pruned_vqa(seed: int):
    """A VQA model with random unit masks (sliced) and every token site at 0.5."""
    model = make_blip(seed, vqa=True)
    adapter = with_sites(model, 0.5)
    gen = torch.Generator().manual_seed(seed)
    for group in adapter.unit_groups():
        adapter.set_unit_mask(group, (torch.rand(group.size, generator=gen) > 0.3).float())
    adapter.slice()
    return model


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_on_a_pruned_vqa_model_gives_each_padded_question_its_answer_alone(beams):
    model = pruned_vqa(6)
    batch = question_batch()
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # the questions are padded
    kw = {"max_new_tokens": 4, "num_beams": beams, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True}
    out = model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], **kw)
    for i in range(4):
        one = sample(batch, i)
        alone = model.generate(input_ids=one["input_ids"], pixel_values=one["pixel_values"],
                               attention_mask=one["attention_mask"], **kw)
        n = alone.sequences.shape[1]
        assert torch.equal(out.sequences[i, :n], alone.sequences[0])
        rows = slice(i * beams, (i + 1) * beams)
        for step, step_alone in zip(out.scores, alone.scores):
            finite = torch.isfinite(step_alone)
            assert torch.allclose(step[rows][finite], step_alone[finite], atol=1e-5)


def test_generate_with_a_headless_decoder_layer_equals_generation_without_cache():
    model = make_blip(7, vqa=True)
    adapter = get_adapter(model).install()
    zero_mask(adapter, "head", "decoder", 0)
    adapter.slice()
    batch = question_batch()
    kw = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"],
          "attention_mask": batch["attention_mask"], "max_new_tokens": 4, "output_scores": True,
          "return_dict_in_generate": True}
    cached, uncached = model.generate(**kw), model.generate(**kw, use_cache=False)
    # the decoder reads its positions from layer 0's cache: the headless layer must still count the tokens
    assert cached.past_key_values.get_seq_length() == cached.sequences.shape[1] - 1
    assert torch.equal(cached.sequences, uncached.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cached.scores, uncached.scores))


def test_vqa_config_with_unequal_widths_is_refused():
    cfg = tiny_blip_config(vqa=True)
    cfg.vision_config.hidden_size = 40
    cfg.text_config.encoder_hidden_size = 32  # so the model builds; the decoder's cross-attention would not run
    model = BlipForQuestionAnswering._from_config(cfg, attn_implementation="eager")
    with pytest.raises(ConfigError, match="vision width.*40.*text width.*32"):
        get_adapter(model)


def test_a_retrieval_recipe_does_not_apply_to_the_vqa_class():
    recipe = get_adapter(make_blip(8)).recipe()
    with pytest.raises(RecipeError, match="BlipForImageTextRetrieval.*BlipForQuestionAnswering"):
        get_adapter(make_blip(8, vqa=True)).apply_recipe(recipe)


@pytest.mark.parametrize("vqa", [False, True])
def test_a_training_forward_collects_statistics_for_every_unit_group_cross_heads_included(vqa):
    model = make_blip(9, vqa=vqa)
    adapter = with_sites(model, 0.5)
    collector = StatsCollector()
    collector.enabled = True
    adapter.attach_collector(collector)
    model.train()
    batch = question_batch()
    if vqa:
        model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    else:
        batch.pop("decoder_input_ids")
        model(**batch).itm_score.sum().backward()
    for group in adapter.unit_groups():
        scores = adapter.unit_scores(group, collector)
        assert scores is not None and scores.shape == (group.size,) and bool((scores > 0).all()), group.key
