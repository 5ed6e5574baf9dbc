"""Cross-tower couplings in the FLOPs model (method.md §1): a tower's FLOPs follow the tokens the towers feeding it
keep -- BLIP's cross-attention K/V, LLaVA's image span in the LLM. Hand-computed on hand-built structures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_clip
from tiny_clip import fresh, quick, tiny_setup

from comp_vlm import Pruner, get_adapter
from comp_vlm.adapters.clip import CLIPAdapter
from comp_vlm.flops import cross_attention_flops, model_flops, model_tower_flops, tower_flops, unit_flops
from comp_vlm.structure import (
    Coupling,
    LayerStructure,
    TowerStructure,
    resolve_couplings,
    source_output_tokens,
)
from comp_vlm.tasks.retrieval import RetrievalTask

LAYER = LayerStructure(hidden=8, heads=2, head_dim=4, neurons=16)
CROSS = Coupling("cross_kv", "vision", "text")


def vision(keep: float | None = 0.5, pooled_only: bool = False) -> TowerStructure:
    """CLS + 4 patches; a site at layer 1 keeping ``keep`` of the 4 patches."""
    last = replace(LAYER, site_keep=keep, mlp_tokens_pooled_only=pooled_only)
    return TowerStructure("vision", 5, 1, (LAYER, last))


def blip_text() -> TowerStructure:
    """4 text tokens; one layer with 2 cross-attention heads over 12-wide vision tokens (K/V count left open)."""
    return TowerStructure("text", 4, 1, (replace(LAYER, cross_heads=2, cross_kv_hidden=12),))


def test_source_output_tokens_follow_the_sites():
    assert source_output_tokens(vision(None)) == 5
    assert source_output_tokens(vision(0.5)) == 1 + 2  # CLS + round(0.5 * 4)
    assert source_output_tokens(vision(0.25)) == 1 + 1
    no_heads = replace(vision(0.5), layers=(LAYER, replace(LAYER, heads=0, site_keep=0.5)))
    assert source_output_tokens(no_heads) == 5  # no attention map: the site is off


def test_cross_attention_takes_its_kv_tokens_from_what_the_vision_tower_keeps():
    towers = resolve_couplings([vision(0.5), blip_text()], [CROSS])
    assert towers[0] == vision(0.5) and towers[1].layers[0].cross_kv_tokens == 3
    text = tower_flops(towers[1]).total
    # self-attention on 4 tokens + cross (q/out on 4 text tokens, K/V of 3 vision tokens, QK^T/AV 4x3) + MLP on 4
    self_attn = 4 * 2 * 4 * 8 * 8 + 2 * 2 * 4 * 4 * 8
    cross = 2 * 2 * 4 * 8 * 8 + 2 * 2 * 3 * 12 * 8 + 2 * 2 * 4 * 3 * 8
    mlp = 2 * 4 * 8 * 16 * 2
    assert text == self_attn + cross + mlp
    assert model_tower_flops([vision(0.5), blip_text()], [CROSS])["text"].total == text


def test_lowering_the_vision_keep_ratio_lowers_the_text_tower_by_the_hand_computed_amount():
    at = {keep: model_tower_flops([vision(keep), blip_text()], [CROSS]) for keep in (0.5, 0.25)}
    # one vision token fewer (3 -> 2): its K/V projection (2*12*8 per K and V) and its column of QK^T/AV (4 queries)
    saved_text = 2 * 2 * 1 * 12 * 8 + 2 * 2 * 4 * 1 * 8
    assert at[0.5]["text"].total - at[0.25]["text"].total == saved_text == 512
    saved_vision = 2 * 1 * 8 * 16 * 2  # its own layer-1 MLP on one token fewer
    total = {keep: model_flops([vision(keep), blip_text()], [CROSS]) for keep in (0.5, 0.25)}
    assert total[0.5] - total[0.25] == saved_text + saved_vision


def test_the_llm_input_is_the_text_plus_the_kept_image_tokens():
    llm = TowerStructure("llm", 6, 1, (replace(LAYER, kv_heads=1, mlp_matrices=3),))
    span = Coupling("token_span", "vision", "llm", skip=1)  # the CLS token never reaches the LLM
    resolved = resolve_couplings([vision(0.5), llm], [span])[1]
    assert (resolved.tokens, resolved.span_tokens) == (6 + 2, 2)
    assert resolve_couplings([vision(0.5), resolved], [span])[1] == resolved  # idempotent
    # q/o 8 wide, k/v 4 wide (one KV head), QK^T/AV on 8 tokens, gated MLP
    assert tower_flops(resolved).total == 2 * 8 * 8 * (2 * 8 + 2 * 4) + 2 * 2 * 8 * 8 * 8 + 2 * 8 * 8 * 16 * 3
    assert resolve_couplings([vision(0.25), llm], [span])[1].tokens == 6 + 1
    merged = Coupling("token_span", "vision", "llm", per_token=2)  # a projector merging 2 tokens into 1
    assert resolve_couplings([vision(0.5), llm], [merged])[1].tokens == 6 + 2  # ceil(3 / 2)


def test_a_chain_resolves_its_sources_first():
    """vision -> (span) middle -> (cross K/V) text: the text tower sees what the middle tower outputs."""
    middle = TowerStructure("middle", 2, 1, (replace(LAYER, site_keep=0.5),))
    couplings = [Coupling("cross_kv", "middle", "text"), Coupling("token_span", "vision", "middle")]
    text = resolve_couplings([blip_text(), middle, vision(0.5)], couplings)[0]
    assert text.layers[0].cross_kv_tokens == 1 + 2  # middle: 2 own + 3 vision tokens, its site keeps 2 of 4


def test_dead_compute_on_a_coupled_source_raises():
    with pytest.raises(ValueError, match="'vision' feeds 'text'"):
        resolve_couplings([vision(0.5, pooled_only=True), blip_text()], [CROSS])
    resolve_couplings([vision(0.5, pooled_only=True), blip_text()], [])  # uncoupled: CLIP's option stands


@pytest.mark.parametrize(("towers", "couplings", "message"), [
    (lambda: [vision(), blip_text()], [Coupling("cross_kv", "vision", "llm")], "unknown tower"),
    (lambda: [vision(), vision()], [], "unique"),
    (lambda: [vision(), TowerStructure("text", 4, 1, (LAYER,))], [CROSS], "no cross-attention layer"),
    (lambda: [vision(), blip_text()], [CROSS, Coupling("token_span", "text", "vision")], "cycle"),
    (lambda: [vision(), blip_text(), replace(vision(), name="v2")], [CROSS, Coupling("cross_kv", "v2", "text")],
     "several towers"),
])
def test_bad_couplings_raise(towers, couplings, message):
    with pytest.raises(ValueError, match=message):
        resolve_couplings(towers(), couplings)


def test_coupling_fields_are_checked():
    with pytest.raises(ValueError, match="unknown coupling kind"):
        Coupling("feeds", "vision", "text")
    with pytest.raises(ValueError, match="towers must differ"):
        Coupling("token_span", "vision", "vision")


def test_an_unresolved_cross_attention_layer_is_not_counted_as_free():
    with pytest.raises(ValueError, match="resolve the couplings"):
        tower_flops(blip_text())


def test_a_cross_head_costs_its_share_of_the_source_kv_and_the_mixing():
    lay = replace(LAYER, cross_heads=3, cross_kv_tokens=5, cross_kv_hidden=12)
    # q/out on the 4 tokens after the site, K/V of the 5 source tokens, QK^T/AV 4x5: one head, 4 wide
    one = 2 * 2 * 4 * 8 * 4 + 2 * 2 * 5 * 12 * 4 + 2 * 2 * 4 * 5 * 4
    assert unit_flops("cross_head", lay, 7, 4) == one
    assert 3 * one == cross_attention_flops(4, lay)
    resolved = resolve_couplings([vision(0.25), blip_text()], [CROSS])[1].layers[0]
    assert unit_flops("cross_head", resolved, 4, 4) == 2 * 2 * 4 * 8 * 4 + 2 * 2 * 2 * 12 * 4 + 2 * 2 * 4 * 2 * 4
    with pytest.raises(ValueError, match="pooled token"):
        replace(lay, mlp_tokens_pooled_only=True)


def test_no_couplings_is_the_plain_sum_and_clip_declares_none():
    towers = [vision(0.5), blip_text()]
    assert resolve_couplings(towers, ()) == tuple(towers)
    plain = [vision(0.5), replace(vision(0.25), name="v2")]
    assert model_flops(plain, ()) == sum(tower_flops(t).total for t in plain)
    model = make_clip(0, attn="eager")
    adapter = get_adapter(model).install()
    assert adapter.couplings() == ()
    adapter.set_keep_ratio("vision", 1, 0.5)
    assert adapter.count_flops() == sum(tower_flops(t).total for t in adapter.structure())
    assert adapter.dense_flops() == sum(tower_flops(t).total for t in adapter.dense_structure())


SPAN = (Coupling("token_span", "vision", "text"),)  # made up for the tiny CLIP: the FLOPs model only


@pytest.fixture
def coupled_pruner(monkeypatch) -> Pruner:
    """A search on the tiny CLIP whose adapter declares a vision -> text span (not what CLIP runs)."""
    monkeypatch.setattr(CLIPAdapter, "couplings", lambda self: SPAN)
    cfg, _, loaders = tiny_setup()
    return Pruner(fresh(cfg), RetrievalTask(), loaders.val, quick(ratio=0.5, dead_compute=False))


def test_the_search_counts_a_token_stage_through_the_couplings(coupled_pruner):
    """A T_v stage of a coupled model is credited with what the tower its tokens feed saves."""
    pruner = coupled_pruner
    assert pruner.dense_flops == model_flops(pruner.adapter.dense_structure(pruner.reference), SPAN)
    before = model_tower_flops(pruner.structural_towers(), SPAN)
    plan = pruner._plan_tokens("T_v", 0.1 * pruner.dense_flops)
    after = model_tower_flops(pruner.structural_towers(), SPAN)
    assert after["text"].total < before["text"].total  # fewer image tokens in the text tower's input
    assert plan.flops_after == sum(tf.total for tf in after.values()) / pruner.dense_flops


def test_the_search_prices_units_at_the_coupled_token_counts(coupled_pruner):
    pruner = coupled_pruner
    pruner.collector.unit_scores = lambda key, weight, width: torch.arange(weight.shape[1] // width).double()
    plan = pruner._plan_params("P_l", 0.05 * pruner.dense_flops)
    text = {t.name: t for t in pruner.adapter.structure(pruner.reference)}["text"]
    tf = model_tower_flops(pruner.adapter.structure(pruner.reference), SPAN)["text"]
    assert tf.tokens_in[0] == 10 + 17  # the reference's text tokens + the vision tower's output
    expected = sum(len(idx) * unit_flops(kind, text.layers[i], tf.tokens_in[i], tf.tokens_mlp[i])
                   for (kind, _, i), idx in plan.units.items())
    assert plan.units and sum(plan.removed_by.values()) * pruner.dense_flops == pytest.approx(expected)
