"""Several token pools in one tower (issue 20 item 5).

A test-only CLIP adapter splits each text sample's prunable tokens into two pools: the first half (rounded up) is
pool "early", the rest pool "late". The split depends on each sample's own length, so a padded batch labels every
sample as it would alone. "early" is in mode T_l and "late" in T_v: one sequence holding pools of two modes, as
LLaVA's LLM holds image (T_v) and instruction (T_l) tokens; a second adapter puts both in T_l, so that one mode's
level has two pools in one tower to move. The vision tower keeps CLIP's single pool "tokens".
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_clip
from contract.families import CLIP, call, random_unit_masks, registered
from tiny_clip import REF, fresh, quick, tiny_setup
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel

from comp_vlm import AdapterOptions, Pruner, get_adapter, load_pruned, save_pruned
from comp_vlm.adapters.base import TowerSpec
from comp_vlm.adapters.clip import CLIPAdapter
from comp_vlm.adapters.runtime import TokenPool
from comp_vlm.errors import ConfigError, RecipeError
from comp_vlm.flops import tower_flops
from comp_vlm.recipe import Recipe
from comp_vlm.structure import Coupling, LayerStructure, TowerStructure, kept_token_count, resolve_couplings
from comp_vlm.tasks.retrieval import RetrievalTask
from comp_vlm.tokens import TokenState, select_tokens

ATOL = 2e-5


def halves(state: TokenState) -> torch.Tensor:
    """Pool 0: the first ceil(m/2) of a sample's m prunable tokens; pool 1: the others."""
    rank = state.prunable.long().cumsum(dim=1) - 1
    m = state.prunable.sum(dim=1, keepdim=True)
    return (rank >= (m + 1) // 2).long()


class TwoPoolCLIPModel(CLIPModel):
    """A CLIPModel under another class name, for :class:`TwoPoolCLIPAdapter`."""


class SameModeCLIPModel(CLIPModel):
    """A CLIPModel under another class name, for :class:`SameModeCLIPAdapter`."""


class TwoPoolCLIPAdapter(CLIPAdapter):
    model_classes = (TwoPoolCLIPModel,)
    text_pools = (TokenPool("early", "T_l"), TokenPool("late", "T_v"))

    def tower_specs(self) -> list[TowerSpec]:
        return [replace(s, token_mode=None, pools=self.text_pools, pool_labels=halves) if s.name == "text" else s
                for s in super().tower_specs()]

    def pool_tokens(self, spec: TowerSpec, reference: dict, prunable: int) -> dict[str, int]:
        if spec.name != "text":
            return super().pool_tokens(spec, reference, prunable)
        early = (prunable + 1) // 2
        return {"early": early, "late": prunable - early}


class SameModeCLIPAdapter(TwoPoolCLIPAdapter):
    model_classes = (SameModeCLIPModel,)
    text_pools = (TokenPool("early", "T_l"), TokenPool("late", "T_l"))


@pytest.fixture(autouse=True)
def adapters():
    with registered(TwoPoolCLIPAdapter), registered(SameModeCLIPAdapter):
        yield


def two_pool_clip(seed: int, attn: str = "eager") -> TwoPoolCLIPModel:
    model = make_clip(seed, attn=attn)
    model.__class__ = TwoPoolCLIPModel
    return model


def set_keeps(adapter, early: float, late: float, vision: float = 0.5) -> None:
    """Every site: the vision pool at ``vision``, the text pools at ``early`` and ``late``."""
    for site in adapter.token_sites():
        keep = {"tokens": vision, "early": early, "late": late}[site.pool]
        adapter.set_keep_ratio(site.tower, site.layer, keep, site.pool)


def close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], atol: float = ATOL) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max().item()


# ---- the token state and the FLOPs structure, by hand ------------------------------------------------------------

def test_a_site_keeps_the_top_k_of_each_pool():
    first = torch.zeros(1, 8, dtype=torch.bool)
    first[0, 0] = True
    state = TokenState.start(1, 8, torch.device("cpu"), pooled=torch.tensor([7]), always_kept=first)
    state = state.labelled(torch.tensor([[0, 0, 1, 0, 1, 0, 1, 0]]), 2)  # pool 0: slots 1, 3, 5; pool 1: 2, 4, 6
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.0]])
    # pool 0 keeps max(1, floor(3 * 0.5 + 0.5)) = 2 (slots 5, 3), pool 1 keeps floor(3 / 3 + 0.5) = 1 (slot 2)
    assert select_tokens(scores, state, (0.5, 1 / 3))[0].tolist() == [[0, 2, 3, 5, 7]]
    # one ratio for both pools: 2 of each (one pool of six at 0.5 would keep slots 2, 4, 6)
    assert select_tokens(scores, state, 0.5)[0].tolist() == [[0, 2, 3, 4, 5, 7]]
    slots, ok = select_tokens(scores, state, (0.5, 1 / 3))
    assert state.gather(slots, ok, causal=True, dtype=torch.float32).pool.tolist() == [[-1, 1, 0, 0, -1]]
    with pytest.raises(ValueError, match="pool labels"):
        state.labelled(torch.full((1, 8), 2), 2)


def test_flops_structure_counts_each_pool_and_a_span_fills_its_pool():
    vision = TowerStructure("vision", 5, 1, (LayerStructure(8, 2, 4, 16),))
    llm = TowerStructure("llm", 10, 2, (LayerStructure(8, 2, 4, 16, site_keep={"image": 0.5, "text": 0.25}),
                                        LayerStructure(8, 2, 4, 16, site_keep={"image": 0.5})),
                         pools=(("image", 0), ("text", 8)))
    span = Coupling("token_span", "vision", "llm", skip=1, pool="image")  # 5 - 1 = 4 image tokens
    resolved = resolve_couplings([vision, llm], [span])[1]
    assert resolved.pool_tokens() == {"image": 4, "text": 8} and resolved.tokens == 14
    # layer 0: image 4 -> 2, text 8 -> 2, + 2 always kept; layer 1: image 2 -> 1, text stays 2
    assert tower_flops(resolved).tokens_in == (14, 6) and tower_flops(resolved).tokens_mlp == (6, 5)
    assert resolve_couplings(resolve_couplings([vision, llm], [span]), [span])[1] == resolved  # idempotent
    with pytest.raises(ValueError, match="token pool 'tokens', which 'llm' lacks"):
        resolve_couplings([vision, llm], [Coupling("token_span", "vision", "llm")])
    with pytest.raises(ValueError, match=r"token pools \['img'\] it lacks"):
        tower_flops(replace(llm, layers=(LayerStructure(8, 2, 4, 16, site_keep={"img": 0.5}),)))
    with pytest.raises(ValueError, match="do not add up"):
        replace(llm, pools=(("image", 1), ("text", 8)))


# ---- the two-pool CLIP through the adapter protocol --------------------------------------------------------------

def test_sites_keep_k_of_each_pool_of_each_sample():
    """Dead compute: one text site (layer 1); the TokenState it hands on names the kept original positions, so the
    kept tokens of each pool can be counted per sample against the rounding rule."""
    model = two_pool_clip(0)
    adapter = get_adapter(model).install()
    assert adapter.site_layers(adapter.tower("text")) == [1]
    set_keeps(adapter, early=0.5, late=0.25)
    batch = CLIP.batch()
    seen = []
    hook = model.text_model.encoder.layers[1].register_forward_hook(lambda m, a, out: seen.append(out[1]))
    with torch.no_grad():
        model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    state = seen[0]
    kept_rows = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    kept_rows[torch.arange(len(kept_rows))[:, None].expand_as(state.positions)[state.valid],
              state.positions[state.valid]] = True
    for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        m = length - 2  # BOS and the pooled EOS are always kept
        early = (m + 1) // 2
        kept = kept_rows[i, 1:length - 1]
        assert int(kept[:early].sum()) == kept_token_count(early, 0.5)
        assert int(kept[early:].sum()) == kept_token_count(m - early, 0.25)


@pytest.mark.parametrize("early,late", [(0.6, 0.3), (0.25, 0.9)])
def test_masked_equals_sliced(early, late):
    model = two_pool_clip(1)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    random_unit_masks(adapter, 1)
    set_keeps(adapter, early, late)
    batch = CLIP.batch()
    masked = call(CLIP, model, batch)
    adapter.slice()
    close(call(CLIP, model, batch), masked)


@pytest.mark.parametrize("early,late", [(0.6, 0.3), (0.25, 0.9)])
def test_flops_model_equals_flop_counter(early, late):
    model = two_pool_clip(2)
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 2)
    set_keeps(adapter, early, late)
    adapter.slice()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        CLIP.features(model, CLIP.at_reference(model, CLIP.reference))
    assert adapter.count_flops(CLIP.reference) == counter.get_total_flops()
    text = {t.name: t for t in adapter.structure(CLIP.reference)}["text"]
    assert text.pools == (("early", 4), ("late", 3)) and text.layers[1].site_keep == {"early": early, "late": late}


def test_recipe_round_trips_both_ratios(tmp_path):
    model = two_pool_clip(3)
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 3)
    set_keeps(adapter, early=0.6, late=0.3)
    adapter.slice()
    recipe = adapter.recipe()
    assert [lay.keep_ratios for lay in recipe.towers["text"]] == [{}, {"early": 0.6, "late": 0.3}, {}]
    assert Recipe.from_json(recipe.to_json()).to_dict() == recipe.to_dict()
    batch = CLIP.batch()
    ref = call(CLIP, model, batch)
    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned", attn_implementation="eager")
    assert type(loaded) is TwoPoolCLIPModel
    close(call(CLIP, loaded, batch), ref, atol=0.0)
    assert get_adapter(loaded).recipe().to_dict()["towers"] == recipe.to_dict()["towers"]
    assert (get_adapter(loaded).keep_ratio("text", 1, "early"), get_adapter(loaded).keep_ratio("text", 1, "late")) \
        == (0.6, 0.3)


@pytest.mark.parametrize("early,late", [(0.5, 0.2), (0.2, 0.7)])
def test_padded_batch_equals_each_sample_alone(early, late):
    model = two_pool_clip(4)
    adapter = get_adapter(model).install()
    set_keeps(adapter, early, late)
    batch = CLIP.batch()
    together = call(CLIP, model, batch)
    for i in range(len(together[0])):
        close(tuple(t[i:i + 1] for t in together), call(CLIP, model, CLIP.sample(batch, i)))


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_a_pool_the_tower_lacks_is_a_config_error():
    adapter = get_adapter(two_pool_clip(0)).install()
    with pytest.raises(ConfigError, match=r"tower 'text' has no token pool 'tokens' \(pools: \['early', 'late'\]\)"):
        adapter.set_keep_ratio("text", 1, 0.5)
    with pytest.raises(ConfigError, match=r"tower 'vision' has no token pool 'early' \(pools: \['tokens'\]\)"):
        adapter.set_keep_ratio("vision", 1, 0.5, pool="early")
    with pytest.raises(ConfigError, match="no token pool 'image'"):
        adapter.keep_ratio("text", 1, "image")


def test_a_recipe_with_a_pool_the_model_lacks_is_a_recipe_error():
    model = two_pool_clip(0)
    adapter = get_adapter(model).install()
    set_keeps(adapter, early=0.6, late=0.3)
    data = adapter.recipe().to_dict()
    data["towers"]["text"][1]["keep_ratios"] = {"early": 0.6, "tokens": 0.3}
    with pytest.raises(RecipeError, match=r"token pools \['tokens'\] are not the model's \['early', 'late'\]"):
        get_adapter(two_pool_clip(0)).apply_recipe(Recipe.from_dict(data))


@pytest.mark.parametrize("change,message", [
    ({"token_mode": None, "pools": (TokenPool("a", "P_v"),)}, "token pool 'a' has mode 'P_v', not a token mode"),
    ({"pools": (TokenPool("a", "T_l"),)}, "give token_mode .one pool. or pools, not both"),
    ({"token_mode": None, "pools": (TokenPool("a", "T_l"), TokenPool("b", "T_l"))}, "several token pools need"),
    ({"token_mode": None, "pools": (TokenPool("a", "T_l"), TokenPool("a", "T_v")), "pool_labels": halves},
     "repeat"),
])
def test_ill_formed_pools_are_config_errors_at_construction(change, message):
    class Bad(CLIPAdapter):
        def tower_specs(self):
            return [replace(s, **change) if s.name == "text" else s for s in super().tower_specs()]

    with pytest.raises(ConfigError, match=message):
        Bad(make_clip(0))


# ---- the search ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@pytest.mark.parametrize("model_class,mode,moved", [
    (TwoPoolCLIPModel, "T_v", {("vision", "tokens"), ("text", "late")}),
    (TwoPoolCLIPModel, "T_l", {("text", "early")}),
    (SameModeCLIPModel, "T_l", {("text", "early"), ("text", "late")}),
])
def test_a_token_level_moves_every_pool_of_its_mode(setup, model_class, mode, moved):
    cfg, _, loaders = setup
    model = fresh(cfg)
    model.__class__ = model_class
    pruner = Pruner(model, RetrievalTask(), loaders.val, quick(ratio=0.6))
    assert pruner.reference == {**pruner.reference, **REF}
    plan = pruner._plan_tokens(mode, 0.05 * pruner.dense_flops)
    assert plan.token_level < 1.0
    pruner.plan, pruner.stage_step = plan, pruner.config.stage_steps // 2  # the live ratios switch at K/2
    pruner._apply_masks()
    adapter = pruner.adapter
    keeps = {(s.tower, s.pool): adapter.keep_ratio(s.tower, s.layer, s.pool) for s in adapter.token_sites()}
    assert {key for key, keep in keeps.items() if keep < 1.0} == moved
    assert len({keeps[key] for key in moved}) == 1  # one level, the same pyramid: every pool of the mode alike
    structural = {t.name: t for t in pruner.structural_towers()}
    planned = {(t, p) for t, tower in structural.items() for lay in tower.layers for p in (lay.site_keep or {})}
    assert planned == moved
