"""LLaVA-specific checks of the adapter (the shared invariants are in tests/contract): left padding, RoPE positions
of kept tokens, the image/instruction pools and the never-pruned tokens, FLOPs on a second config, generation with
the pruned KV cache (cache vs no cache, keep-all vs unpruned, batch reorders, refusals, cache bytes), and the
7B-shaped analytic count on the meta device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent / "contract"))
from families import (
    LLAVA_VOCAB,
    llava_at_reference,
    llava_batch,
    llava_features,
    llava_loss,
    llava_positions,
    llava_sample,
    make_llava,
)

from comp_vlm import get_adapter
from comp_vlm.adapters.llava import IMAGE_POOL, INSTRUCTION_POOL, kv_cache_bytes
from comp_vlm.errors import ConfigError
from comp_vlm.flops import model_flops
from comp_vlm.search.bookkeeping import dense_counts, derive_structure
from comp_vlm.tokens import kept_counts


def set_keeps(adapter, image: float, instruction: float) -> None:
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, image if site.pool == "image" else instruction, site.pool)


def capture_layer(model, index: int) -> dict:
    """Record what LLM layer ``index`` gets: its TokenState, and the RoPE (cos, sin) its attention gets."""
    seen: dict = {}
    layer = model.model.language_model.layers[index]

    def on_layer(module, args, kwargs):
        seen["state"] = kwargs["comp_state"]

    def on_attention(module, args, kwargs):
        seen["rope"] = kwargs["position_embeddings"]

    layer.register_forward_pre_hook(on_layer, with_kwargs=True)
    layer.self_attn.register_forward_pre_hook(on_attention, with_kwargs=True)
    return seen


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, position_ids=llava_positions(inputs), use_cache=False, **kw)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_equals_unpruned_under_left_padding(attn):
    """Every valid position's logits, and greedy generation with the KV cache, as the unmodified model's."""
    model = make_llava(0, attn)
    batch = llava_batch()
    valid = batch["attention_mask"].bool()
    ref = run(model, batch).logits
    generate = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref_ids = model.generate(**batch, **generate)
    adapter = get_adapter(model).install()
    set_keeps(adapter, 1.0, 1.0)
    assert torch.allclose(run(model, batch).logits[valid], ref[valid], atol=2e-5)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **generate), ref_ids)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kept_tokens_keep_their_original_rope_positions(attn):
    """After a site, a later layer's attention gets the RoPE of each kept token's original position id (left
    padding: the row's cumulative position), not a re-packed one."""
    model = make_llava(1, attn)
    adapter = get_adapter(model).install()
    set_keeps(adapter, 0.5, 0.5)
    seen = capture_layer(model, 2)
    batch = llava_batch()
    run(model, batch)
    state, (cos, sin) = seen["state"], seen["rope"]
    assert state.gathered
    original = llava_positions(batch).gather(1, state.positions)  # the kept slots' original position ids
    assert any(bool((row[1:][v[1:]].diff() > 1).any()) for row, v in zip(original, state.valid))  # gaps: not re-packed
    expected = model.model.language_model.rotary_emb(cos, position_ids=original)
    valid = state.valid
    assert torch.allclose(cos[valid], expected[0][valid]) and torch.allclose(sin[valid], expected[1][valid])


def test_pools_hold_image_and_instruction_tokens_and_never_drop_bos_last_or_answer():
    """The image pool is the image-token positions of the input ids, the instruction pool the other prunable
    tokens; BOS, the last prompt token and the answer (labelled) tokens are never pruned."""
    model = make_llava(2, "eager")
    adapter = get_adapter(model).install()
    set_keeps(adapter, 0.25, 0.2)
    seen = capture_layer(model, 2)  # after the site of layer 1
    batch = llava_batch()
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # the answer: each row's last token
    run(model, batch, labels=labels)
    state = seen["state"]
    kept = torch.zeros_like(ids, dtype=torch.bool)
    kept.scatter_(1, torch.where(state.valid, state.positions, 0), state.valid)
    valid = batch["attention_mask"].bool()
    rows = torch.arange(len(ids))
    never = torch.zeros_like(kept)
    never[rows, valid.int().argmax(1)] = True  # BOS
    never[:, -2:] = True  # the last prompt token and the answer
    image = ids == LLAVA_VOCAB - 1
    instruction = valid & ~image & ~never
    assert kept[never].all()
    assert torch.equal((kept & image).sum(1), kept_counts(image, 0.25))  # 16 image tokens -> 4
    assert torch.equal((kept & instruction).sum(1), kept_counts(instruction, 0.2))
    prunable_slots = state.positions[state.prunable]
    pools = state.pool[state.prunable]
    assert torch.equal(pools == IMAGE_POOL, image[state.prunable.nonzero()[:, 0], prunable_slots])
    assert bool((pools == INSTRUCTION_POOL).any())
    assert torch.equal(state.pooled, torch.full((len(ids),), ids.shape[1] - 2))  # scored by the last prompt token


def test_flops_model_equals_flop_counter_without_gqa_and_with_cls():
    """The analytic count is exact against FlopCounterMode (eager) on a second config: plain heads (no GQA) and the
    'full' feature selection (CLS enters the LLM as an image token)."""
    model = make_llava(3, "eager", kv_heads=4)
    model.config.vision_feature_select_strategy = "full"
    adapter = get_adapter(model).install()
    assert adapter.tower("llm").units[0].kind == "head"
    for group in adapter.unit_groups():
        adapter.set_unit_mask(group, (torch.arange(group.size) % 3 != 1).float())
    set_keeps(adapter, 0.5, 0.6)
    adapter.slice()
    reference = {"image_size": 16, "text_length": 7}
    inputs = llava_at_reference(model, reference)
    assert int((inputs["input_ids"] == LLAVA_VOCAB - 1).sum()) == 17
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        llava_features(model, inputs)
    assert adapter.count_flops(reference) == counter.get_total_flops()
    assert adapter.count_flops(reference) < adapter.dense_flops(reference)


GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}


def generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, **{**GREEDY, **kw})


def assert_same_generation(out, ref, atol: float) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.allclose(a, b, atol=atol) for a, b in zip(out.logits, ref.logits, strict=True))


def site_widths(batch, image: float, instruction: float, sites: list[int], layers: int) -> list[int]:
    """Each LLM layer's cached prompt length after the sites at ``sites`` (kept_counts per pool and row; BOS and the
    last prompt token never pruned), for llava_batch-style prompts: BOS, image tokens, then text."""
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    image_m = (ids == LLAVA_VOCAB - 1).sum(1)
    text_m = valid.sum(1) - image_m - 2

    def keep(m: torch.Tensor, ratio: float) -> torch.Tensor:
        return kept_counts(torch.arange(int(m.max()))[None] < m[:, None], ratio)

    widths, gathered = [], False
    for layer in range(layers):
        widths.append(int((2 + image_m + text_m).max()) if gathered else ids.shape[1])
        if layer in sites:
            image_m, text_m, gathered = keep(image_m, image), keep(text_m, instruction), True
    return widths


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_pruned_cache_equals_no_cache(attn, beams):
    """Left-padded batch, token sites on: generate with the per-layer pruned KV cache gives the tokens (and logits)
    of use_cache=False, which re-runs the whole sequence each step with the prompt fixed at the call's first forward;
    the cache really is pruned (its later layers are shorter)."""
    model = make_llava(7, attn)
    set_keeps(get_adapter(model).install(), 0.5, 0.5)
    batch = llava_batch()
    cached = generate(model, batch, num_beams=beams)
    assert_same_generation(cached, generate(model, batch, num_beams=beams, use_cache=False), atol=1e-5)
    lengths = [layer.keys.shape[-2] for layer in cached.cache.layers]
    assert lengths[-1] < lengths[0]


def test_merge_sizes_live_with_the_cache():
    """Under the merge reducer (set on the runtimes here: the LLaVA adapter does not offer it yet), each cached slot's
    size rides with the cache, so proportional attention holds at decode: cache equals no cache."""
    from dataclasses import replace

    model = make_llava(7, "sdpa")
    set_keeps(get_adapter(model).install(), 0.5, 0.5)
    for layer in model.model.language_model.layers:
        layer.comp_runtime = replace(layer.comp_runtime, reducer="merge", key_output="self_attn.k_proj")
    batch = llava_batch()
    assert_same_generation(generate(model, batch), generate(model, batch, use_cache=False), atol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 0.99])
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_generate_equals_unpruned_model(attn, beams, ratio):
    """Every keep ratio at 1, or at 0.99 (the sites gather, but round to keeping every token of these prompts): the
    generated ids equal the unmodified model's, the logits within 1e-5 (left padding, greedy and beam)."""
    model = make_llava(8, attn)
    batch = llava_batch()
    ref = generate(model, batch, num_beams=beams)
    set_keeps(get_adapter(model).install(), ratio, ratio)
    assert_same_generation(generate(model, batch, num_beams=beams), ref, atol=1e-5)


def test_pruned_cache_follows_batch_reorders():
    """The per-layer slot record follows cache.reorder_cache (beam search's reorder) across rows: a decode step on a
    reordered cache gives the logits of the reordered batch's own prefill and decode step."""
    model = make_llava(9, "eager")
    set_keeps(get_adapter(model).install(), 0.5, 0.4)
    batch = llava_batch()
    order = torch.tensor([2, 0, 3, 1])
    step = torch.tensor([[5], [6], [7], [8]])

    def prefill_then_step(inputs, reorder=None):
        with torch.no_grad():
            cache = model(**inputs, position_ids=llava_positions(inputs), use_cache=True).cache
            if reorder is not None:
                cache.reorder_cache(reorder)
                inputs = {k: v[reorder] for k, v in inputs.items()}
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
            return model(input_ids=step, attention_mask=mask, position_ids=llava_positions({"attention_mask": mask})[:, -1:],
                         cache=cache, use_cache=True).logits

    reordered = {k: v[order] for k, v in batch.items()}
    assert torch.allclose(prefill_then_step(batch, order), prefill_then_step(reordered), atol=1e-5)


def test_pruned_generation_refuses_static_cache_compile_and_flash_attention():
    """A pruned model's layers hold caches of different lengths and need their own masks: a static cache, a compiled
    forward and flash attention each raise one clear ConfigError (a model that keeps every token is not refused)."""
    from transformers import CompileConfig

    model = make_llava(10, "sdpa")
    adapter = get_adapter(model).install()
    batch = llava_batch()
    set_keeps(adapter, 1.0, 1.0)
    assert generate(model, batch, max_new_tokens=2, cache_implementation="static").sequences.shape[0] == 4
    set_keeps(adapter, 0.5, 0.5)
    with pytest.raises(ConfigError, match="static KV cache cannot hold"):
        generate(model, batch, cache_implementation="static")
    with pytest.raises(ConfigError, match="compiled forward cannot follow token pruning"):
        generate(model, batch, compile_config=CompileConfig())
    model.model.language_model.compile(backend="eager")
    with pytest.raises(ConfigError, match="compiled forward cannot follow token pruning"):
        generate(model, batch)
    model.model.language_model._compiled_call_impl = None
    model.config.text_config._attn_implementation = "flash_attention_2"  # flash_attn is not installable on CPU
    with pytest.raises(ConfigError, match="'flash_attention_2' takes no per-layer 4-D mask"):
        generate(model, batch)


def test_pruned_kv_cache_is_smaller():
    """Per layer, the pruned cache holds the layer's kept prompt slots (kept_counts after each earlier site) plus the
    generated tokens; layers up to the first site's hold the whole prompt, later ones fewer bytes than dense."""
    model = make_llava(11, "sdpa")
    batch = llava_batch()
    dense = kv_cache_bytes(generate(model, batch).cache)
    adapter = get_adapter(model).install()
    set_keeps(adapter, 0.5, 0.5)
    pruned = kv_cache_bytes(generate(model, batch).cache)
    tc = model.config.text_config
    per_token = 2 * len(batch["input_ids"]) * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 4
    sites = sorted({s.layer for s in adapter.token_sites()})
    widths = site_widths(batch, 0.5, 0.5, sites, tc.num_hidden_layers)
    answer = GREEDY["max_new_tokens"] - 1  # the last generated token is never fed back
    assert dense == [per_token * (batch["input_ids"].shape[1] + answer)] * tc.num_hidden_layers
    assert pruned == [per_token * (w + answer) for w in widths]
    assert pruned[: sites[0] + 1] == dense[: sites[0] + 1] and all(p < d for p, d in zip(pruned[sites[0] + 1:], dense[sites[0] + 1:]))


def test_7b_shaped_llava_counts_flops_on_the_meta_device():
    """LLaVA-1.5-7B's shape (CLIP ViT-L/14-336, Llama-2-7B) on the meta device: dense and pruned prefill FLOPs of one
    336-px image plus 64 text tokens, analytic, with nothing allocated."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    adapter = get_adapter(model).install()
    reference = {"image_size": 336, "text_length": 64}
    dense = adapter.dense_structure(reference)
    assert adapter.count_flops(reference) == model_flops(dense, adapter.couplings())
    tv, tc = vision, text
    image_tokens, tokens = (336 // 14) ** 2, (336 // 14) ** 2 + 64
    vision_layer = 2 * 577 * tv.hidden_size * tv.hidden_size * 4 + 4 * 577**2 * tv.hidden_size \
        + 2 * 577 * tv.hidden_size * tv.intermediate_size * 2
    llm_layer = 2 * tokens * tc.hidden_size * tc.hidden_size * 4 + 4 * tokens**2 * tc.hidden_size \
        + 2 * tokens * tc.hidden_size * tc.intermediate_size * 3
    outside = 2 * 576 * 3 * 14**2 * tv.hidden_size + 2 * image_tokens * (tv.hidden_size + tc.hidden_size) \
        * tc.hidden_size + 2 * tc.hidden_size * tc.vocab_size
    assert adapter.dense_flops(reference) == 24 * vision_layer + 32 * llm_layer + outside
    specs = {s.name: s for s in adapter.tower_specs()}
    counts = {key: n // 2 if key[1] == "llm" else n
              for key, n in dense_counts(specs.values(), {"vision": 24, "llm": 32}).items()}
    keeps = {"llm": {i: {"image": 0.5} for i in adapter.site_layers(specs["llm"])}}
    pruned = model_flops(derive_structure(dense, specs, counts, keeps), adapter.couplings())
    assert pruned < 0.5 * adapter.dense_flops(reference)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_padded_batch_equals_each_sample_alone(attn):
    """Token sites on a left-padded batch: each row's logits as the row alone, under sdpa too (the contract runs
    eager)."""
    model = make_llava(5, attn)
    set_keeps(get_adapter(model).install(), 0.5, 0.4)
    batch = llava_batch()
    together = run(model, batch).logits[:, -2:]
    for i in range(len(together)):
        alone = llava_sample(batch, i)
        assert torch.allclose(run(model, alone).logits[:, -2:], together[i:i + 1], atol=2e-5)


def test_statistics_score_every_unit_group_gqa_included():
    """A training forward with a collector attached scores every group: KV groups (GQA) as well as heads/neurons."""
    from comp_vlm.collect import StatsCollector

    model = make_llava(6, "sdpa")
    adapter = get_adapter(model).install()
    set_keeps(adapter, 0.5, 0.5)
    collector = StatsCollector()
    collector.enabled = True
    adapter.attach_collector(collector)
    model.train()
    llava_loss(model, llava_batch()).backward()
    kinds = set()
    for group in adapter.unit_groups():
        scores = adapter.unit_scores(group, collector)
        assert scores is not None and scores.shape == (group.size,) and bool(torch.isfinite(scores).all()), group.key
        kinds.add(group.kind)
    assert kinds == {"head", "kv_group", "neuron"}
