"""Token reducers (issue 24 item 2): what a site does with the tokens it does not keep -- drop, fuse, merge.

By hand: the merge assignment (a causal merge never uses a later token), the size-weighted merge, the fused token,
proportional attention, the FLOPs structure. Through CLIP (and the two-pool CLIP of test_token_pools), each
reducer with each scorer: masked = sliced, padded = each sample alone, FLOPs model = FlopCounterMode (the merge's
similarity matmul included), gradient checkpointing; the recipe round trip and a recipe without a reducer; bad input.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_clip
from contract.families import CLIP, call, random_unit_masks, registered
from test_clip_adapter import prune_all_sites
from test_token_pools import TwoPoolCLIPAdapter, set_keeps, two_pool_clip
from tiny_clip import fresh, quick, tiny_setup
from torch.utils.flop_counter import FlopCounterMode

from comp_vlm import (
    AdapterOptions,
    ConfigError,
    PruneConfig,
    RecipeError,
    get_adapter,
    load_pruned,
    prune,
    save_pruned,
)
from comp_vlm.adapters import runtime
from comp_vlm.adapters.base import options_from_recipe
from comp_vlm.adapters.clip import CLIPAdapter
from comp_vlm.adapters.common import eager_attention_with_probs, proportional_bias
from comp_vlm.cli import main
from comp_vlm.flops import tower_flops
from comp_vlm.recipe import RECIPE_FILE
from comp_vlm.structure import LayerStructure, TowerStructure
from comp_vlm.tasks.retrieval import RetrievalTask
from comp_vlm.tokens import TokenState, fuse_dropped, merge_targets, merge_tokens, with_fused_slots

ATOL = 2e-5
REDUCERS = ("drop", "fuse", "merge")
SCORERS = ("attention", "random")


@pytest.fixture(autouse=True)
def two_pools():
    with registered(TwoPoolCLIPAdapter):
        yield


def close(a, b, atol=ATOL):
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max().item()


def reduced_clip(seed: int, reducer: str, scorer: str = "attention", keep: float = 0.5, pools: bool = False,
                 dead_compute: bool = True):
    """A tiny CLIP (two text pools if ``pools``) with every site at ``keep`` (text pools at keep and keep / 2)."""
    model = two_pool_clip(seed) if pools else make_clip(seed, attn="eager")
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=dead_compute, token_scorer=scorer,
                                                        token_scorer_seed=seed, token_reducer=reducer))
    if pools:
        set_keeps(adapter, early=keep, late=keep / 2, vision=keep)
    else:
        prune_all_sites(adapter, keep)
    return model, adapter


# ---- by hand ---------------------------------------------------------------------------------------------------------

def test_merge_assignment_by_hand_and_a_causal_merge_never_uses_a_later_token():
    # slots 0..5; targets (kept) 1 and 4; sources 2, 3, 5. Key of 2 is closest to 4's, of 3 to 1's, of 5 to 4's.
    keys = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.1, 1.0], [2.0, 0.1], [0.0, 1.0], [0.0, 3.0]]])
    targets = torch.tensor([[False, True, False, False, True, False]])
    sources = torch.tensor([[False, False, True, True, False, True]])
    positions = torch.arange(6)[None]
    assert merge_targets(keys, sources, targets, positions, causal=False).tolist() == [[-1, -1, 4, 1, -1, 4]]
    # causal: 2 may only merge into 1 (4 is later); 3 into 1; 5 into 4 (earlier, most similar)
    causal = merge_targets(keys, sources, targets, positions, causal=True)
    assert causal.tolist() == [[-1, -1, 1, 1, -1, 4]]
    # no earlier target at all: the source is dropped (-1), never merged forward
    late = torch.tensor([[False, False, False, False, False, True]])
    assert merge_targets(keys, sources & ~late & torch.tensor([[0, 0, 1, 1, 0, 0]]).bool(), late, positions,
                         causal=True).tolist() == [[-1] * 6]
    # shuffled original positions: "earlier" means the position, not the slot
    shuffled = torch.tensor([[0, 5, 1, 2, 3, 4]])  # target slot 1 now sits after every source, slot 4 after 2, 3
    out = merge_targets(keys, sources, targets, shuffled, causal=True)
    assert out.tolist() == [[-1, -1, -1, -1, -1, 4]]
    assert all(shuffled[0, t] < shuffled[0, s] for s, t in enumerate(out[0].tolist()) if t >= 0)


def test_merge_is_size_weighted_and_a_causal_target_takes_its_last_position():
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    target = torch.tensor([[-1, -1, 1, 1]])  # slots 2 and 3 merge into slot 1
    positions = torch.tensor([[0, 1, 2, 3]])
    h, s, p = merge_tokens(hidden, size, positions, target, causal=True)
    assert torch.allclose(h[0, 1], torch.tensor([(3 * 2.0 + 1 * 4.0 + 2 * 8.0) / 6]))
    assert s.tolist() == [[1.0, 6.0, 1.0, 2.0]] and p.tolist() == [[0, 3, 2, 3]]
    assert torch.equal(h[0, 0], hidden[0, 0])  # a slot that receives nothing is untouched, bit for bit
    assert merge_tokens(hidden, size, positions, target, causal=False)[2].tolist() == [[0, 1, 2, 3]]


def test_fused_token_is_the_score_weighted_mean_and_takes_the_last_position():
    state = TokenState.start(1, 5, torch.device("cpu"))  # slot 0 always kept; 1..4 prunable, one pool
    hidden = torch.tensor([[[9.0], [1.0], [2.0], [3.0], [4.0]]])
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]])
    hidden, scores, state = with_fused_slots(hidden, scores, state)
    assert hidden.shape == (1, 6, 1) and state.fused == 1 and not state.valid[0, 5]
    kept = torch.tensor([[True, False, False, True, True, True]])  # drop slots 1 and 2
    h, st = fuse_dropped(hidden, scores, state, kept)
    assert torch.allclose(h[0, 5], torch.tensor([(0.1 * 1 + 0.2 * 2) / 0.3]))
    assert torch.allclose(st.size[0, 5], torch.tensor(0.3)) and st.positions[0, 5] == 2 and st.valid[0, 5]
    # a later site folds into it, weighted by the mass it holds
    h2, st2 = fuse_dropped(h, scores, st, torch.tensor([[True, True, True, False, True, True]]))
    assert torch.allclose(h2[0, 5], (0.3 * h[0, 5] + 0.3 * 3.0) / 0.6)
    assert st2.positions[0, 5] == 3
    # all dropped scores 0: a uniform mean, never NaN
    h3, _ = fuse_dropped(hidden, torch.zeros(1, 6), state, kept)
    assert torch.allclose(h3[0, 5], torch.tensor([1.5]))


def test_proportional_attention_with_every_size_one_is_plain_attention_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[:, :, :, 4] = torch.finfo(torch.float32).min
    assert proportional_bias(mask, torch.ones(2, 5)) is mask
    module = torch.nn.Module()
    plain = eager_attention_with_probs(module, q, k, v, mask)
    for a, b in zip(plain, eager_attention_with_probs(module, q, k, v, proportional_bias(mask, torch.ones(2, 5)))):
        assert torch.equal(a, b)
    # a key of size 2 weighs as two copies of it (ToMe): compare with the key duplicated
    size = torch.tensor([[2.0, 1, 1, 1, 1]] * 2)
    out, _ = eager_attention_with_probs(module, q, k, v, proportional_bias(torch.zeros(2, 1, 5, 5), size))
    k2, v2 = (torch.cat([x[:, :, :1], x], dim=2) for x in (k, v))
    ref, _ = eager_attention_with_probs(module, q, k2, v2, None)
    assert torch.allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="additive mask"):
        proportional_bias(None, size)


def test_flops_structure_by_hand():
    # 1 always kept + 8 prunable; layer 1 keeps 4 of 8, layer 2 keeps 2 of 4; no site at layer 0
    layers = (LayerStructure(8, 2, 4, 16), LayerStructure(8, 2, 4, 16, site_keep=0.5),
              LayerStructure(8, 2, 4, 16, site_keep=0.5))
    drop = tower_flops(TowerStructure("t", 9, 1, layers))
    fuse = tower_flops(TowerStructure("t", 9, 1, layers, reducer="fuse"))
    merge = tower_flops(TowerStructure("t", 9, 1, layers, reducer="merge"))
    assert drop.tokens_in == (9, 9, 5) and drop.tokens_mlp == (9, 5, 3)
    assert fuse.tokens_in == (9, 9, 6) and fuse.tokens_mlp == (9, 6, 4)  # one fused token from the first site on
    assert merge.tokens_in == drop.tokens_in and merge.tokens_mlp == drop.tokens_mlp
    # merge adds (dropped x kept) key dot products of width heads * head_dim = 8: 4 * 4 at layer 1, 2 * 2 at layer 2
    assert [m - d for m, d in zip(merge.per_layer, drop.per_layer)] == [0, 2 * 16 * 8, 2 * 4 * 8]
    with pytest.raises(ValueError, match="unknown token reducer"):
        TowerStructure("t", 9, 1, layers, reducer="squash")


# ---- through the model -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("pools", [False, True])
def test_masked_equals_sliced(reducer, scorer, pools):
    model, adapter = reduced_clip(1, reducer, scorer, keep=0.6, pools=pools, dead_compute=False)
    random_unit_masks(adapter, 1)
    sliced = copy.deepcopy(model)  # carries the random scorer's generator: both draw the same seeds
    get_adapter(sliced).slice()
    batch = CLIP.batch()
    close(call(CLIP, sliced, batch), call(CLIP, model, batch))


@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("pools", [False, True])
def test_padded_batch_equals_each_sample_alone(reducer, pools):
    model, _ = reduced_clip(4, reducer, keep=0.4, pools=pools)
    batch = CLIP.batch()
    together = call(CLIP, model, batch)
    for i in range(len(together[0])):
        close(tuple(t[i:i + 1] for t in together), call(CLIP, model, CLIP.sample(batch, i)))


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("pools,keep", [(False, 0.5), (False, 0.3), (True, 0.6)])
def test_flops_model_equals_flop_counter(reducer, scorer, pools, keep):
    model, adapter = reduced_clip(2, reducer, scorer, keep=keep, pools=pools)
    random_unit_masks(adapter, 2)
    adapter.slice()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        CLIP.features(model, CLIP.at_reference(model, CLIP.reference))
    assert adapter.count_flops(CLIP.reference) == counter.get_total_flops()
    if reducer != "drop":  # the reducer costs something: the structure knows it
        drop = [t.__class__(**{**t.__dict__, "reducer": "drop"}) for t in adapter.structure(CLIP.reference)]
        assert sum(tower_flops(t).total for t in drop) < adapter.count_flops(CLIP.reference)


@pytest.mark.parametrize("reducer", ("fuse", "merge"))
def test_the_fused_token_travels_and_merged_sizes_add_up(reducer):
    """Text tower, one pool, after the sites: the fused slot is valid where a token was dropped and sits before the
    pooled EOS; merged sizes add up to at most the tokens that entered (a causal merge may have to drop one)."""
    batch = CLIP.batch()
    model, _ = reduced_clip(5, reducer, keep=0.5, dead_compute=False)
    seen = []
    layers = model.text_model.encoder.layers
    hook = layers[len(layers) - 1].register_forward_hook(lambda m, a, out: seen.append(out[1]))
    with torch.no_grad():
        model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    state = seen[0]
    if reducer == "fuse":
        # valid where the first site dropped something: m >= 2 prunable tokens (BOS and EOS are kept)
        dropped = batch["attention_mask"].sum(dim=1) - 2 >= 2
        assert state.fused == 1 and torch.equal(state.valid[:, -1], dropped)
        assert not bool(state.prunable[:, -1].any()) and torch.equal(state.size[:, -1] > 0, dropped)
        # its position is one no kept token holds, the last it absorbed: before the pooled EOS
        assert bool((state.positions[dropped, -1] < state.pooled[dropped]).all())
    else:
        held = (state.size * state.valid).sum(dim=1)
        assert bool((held <= batch["attention_mask"].sum(dim=1)).all())
        assert bool((state.size[state.valid] >= 1).all()) and bool((state.size[state.valid] > 1).any())


def test_a_causal_merge_on_clips_text_tower_only_uses_earlier_tokens(monkeypatch):
    calls = []
    original = runtime.tokens.merge_targets

    def recording(keys, sources, targets, positions, causal):
        out = original(keys, sources, targets, positions, causal)
        calls.append((causal, positions.clone(), out.clone()))
        return out

    monkeypatch.setattr(runtime.tokens, "merge_targets", recording)
    model, _ = reduced_clip(6, "merge", keep=0.4)
    batch = CLIP.batch()
    with torch.no_grad():
        model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert calls and all(causal for causal, _, _ in calls)
    merged = 0
    for _, positions, target in calls:
        rows, sources = torch.nonzero(target >= 0, as_tuple=True)
        assert bool((positions[rows, target[rows, sources]] < positions[rows, sources]).all())
        merged += len(sources)
    assert merged > 0
    calls.clear()
    with torch.no_grad():
        model.vision_model(pixel_values=batch["pixel_values"])
    assert calls and not any(causal for causal, _, _ in calls)


@pytest.mark.parametrize("reducer", ("fuse", "merge"))
def test_sdpa_equals_eager(reducer):
    """The proportional-attention bias rides on the mask, so sdpa (the layers without an active site) sees it too."""
    outs = []
    for attn in ("eager", "sdpa"):
        model = make_clip(3, attn=attn)
        prune_all_sites(get_adapter(model).install(AdapterOptions(token_reducer=reducer, dead_compute=False)), 0.4)
        outs.append(call(CLIP, model, CLIP.batch()))
    close(*outs, atol=1e-5)


@pytest.mark.parametrize("reducer", ("fuse", "merge"))
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_the_random_scorer(reducer, reentrant):
    batch = CLIP.batch()
    grads = []
    for ckpt in (False, True):
        model, _ = reduced_clip(10, reducer, "random", keep=0.5)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        CLIP.loss(model, batch).backward()
        grads.append([model.vision_model.encoder.layers[i].mlp.fc1.weight.grad.clone() for i in (0, 1)]
                     + [model.text_model.encoder.layers[0].self_attn.k_proj.weight.grad.clone()])
    for plain, checkpointed in zip(*grads):
        assert torch.isfinite(plain).all() and torch.allclose(plain, checkpointed, atol=1e-5)


@pytest.mark.parametrize("reducer", ("fuse", "merge"))
def test_reducers_change_the_output_and_keep_all_changes_nothing(reducer):
    batch = CLIP.batch()
    drop = call(CLIP, reduced_clip(3, "drop")[0], batch)
    assert not torch.allclose(call(CLIP, reduced_clip(3, reducer)[0], batch)[0], drop[0])
    keep_all = call(CLIP, reduced_clip(3, reducer, keep=1.0)[0], batch)
    plain = call(CLIP, reduced_clip(3, "drop", keep=1.0)[0], batch)
    for a, b in zip(keep_all, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reducer", ("fuse", "merge"))
def test_the_search_runs_with_each_reducer_and_records_it(reducer):
    cfg, _, loaders = tiny_setup()
    res = prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                quick(ratio=0.3, strategy="sjp", finetune_steps=0, token_reducer=reducer))
    assert res.recipe.options["token_reducer"] == reducer and res.recipe.flops_kept <= 0.7 + 1e-9
    assert any(lay.keep_ratios for tower in res.recipe.towers.values() for lay in tower)
    model = next(iter(res.snapshots.values()))[0]
    assert get_adapter(model).options.token_reducer == reducer


# ---- recipes -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reducer", ("fuse", "merge"))
@pytest.mark.parametrize("pools", [False, True])
def test_recipe_round_trip(tmp_path, reducer, pools):
    model, adapter = reduced_clip(7, reducer, keep=0.5, pools=pools)
    random_unit_masks(adapter, 7)
    adapter.slice()
    assert adapter.recipe().options["token_reducer"] == reducer
    batch = CLIP.batch()
    ref = call(CLIP, model, batch)
    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned", attn_implementation="eager")
    assert get_adapter(loaded).options.token_reducer == reducer
    close(call(CLIP, loaded, batch), ref, atol=0.0)
    assert get_adapter(loaded).count_flops() == adapter.count_flops()


def test_a_format_2_recipe_without_a_reducer_loads_as_drop(tmp_path):
    model, _ = reduced_clip(8, "fuse", keep=0.5)
    save_pruned(model, tmp_path / "pruned")
    path = tmp_path / "pruned" / RECIPE_FILE
    data = json.loads(path.read_text())
    assert data["format_version"] == 2
    del data["options"]["token_reducer"]
    path.write_text(json.dumps(data))
    loaded = load_pruned(tmp_path / "pruned", attn_implementation="eager")
    assert get_adapter(loaded).options.token_reducer == "drop"
    drop, _ = reduced_clip(8, "drop", keep=0.5)
    close(call(CLIP, loaded, CLIP.batch()), call(CLIP, drop, CLIP.batch()), atol=0.0)
    assert options_from_recipe({}).token_reducer == "drop"


# ---- bad input ---------------------------------------------------------------------------------------------------------

def test_an_unknown_reducer_is_a_config_error_naming_the_field_and_choices():
    with pytest.raises(ConfigError, match="token_reducer must be one of drop, fuse, merge, got 'squash'"):
        PruneConfig(token_reducer="squash")
    with pytest.raises(ConfigError, match="token_reducer must be one of drop, fuse, merge, got 'squash'"):
        AdapterOptions(token_reducer="squash")  # the same rule as PruneConfig's (validation.CONTENT)
    with pytest.raises(RecipeError, match="token_reducer must be one of drop, fuse, merge, got 'squash'"):
        options_from_recipe({"token_reducer": "squash"})


class NoKeysCLIPModel(torch.nn.Module):
    """Stand-in model class for :class:`NoKeysAdapter` (never built)."""


class NoKeysAdapter(CLIPAdapter):
    """A family that does not expose its attention keys: it runs drop and fuse only."""

    model_classes = (NoKeysCLIPModel,)
    token_reducers = ("drop", "fuse")


def test_a_reducer_the_family_cannot_run_is_refused_at_install():
    model = make_clip(0)
    with pytest.raises(ConfigError, match="^the clip adapter cannot run token_reducer 'merge' .it runs drop, fuse.$"):
        NoKeysAdapter(model).install(AdapterOptions(token_reducer="merge"))
    assert not NoKeysAdapter(model).is_installed()
    NoKeysAdapter(model).install(AdapterOptions(token_reducer="fuse"))


def test_cli_flag(capsys, tmp_path):
    from comp_vlm.cli import build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--token-reducer", "merge"])
    assert args.token_reducer == "merge"
    unset = build_parser().parse_args(["prune", "--model", "m", "--out", "o"])
    assert unset.token_reducer is None and PruneConfig().token_reducer == "drop"  # unset: PruneConfig's default
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "m", "--out", str(tmp_path / "o"), "--token-reducer", "squash"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("comp-vlm: error:") and "--token-reducer" in err[0]
    assert "drop" in err[0] and "merge" in err[0]


@pytest.mark.parametrize("key", [("blip", "BlipForImageTextRetrieval"), ("blip", "BlipForQuestionAnswering"),
                                 ("llava", "LlavaForConditionalGeneration")], ids=lambda k: k[1])
@pytest.mark.parametrize("reducer", ["fuse", "merge"])
def test_families_whose_forwards_only_drop_refuse_other_reducers(key, reducer):
    """BLIP's and LLaVA's forwards carry no fused or merged tokens yet: installing one is one line, not a forward
    that drops while the FLOPs model counts a fused token."""
    from contract.families import CASES

    model = CASES[key].make(0, "eager")
    with pytest.raises(ConfigError, match=f"^the {key[0]} adapter cannot run token_reducer '{reducer}' "
                                          r"\(it runs drop\)$"):
        get_adapter(model).install(AdapterOptions(token_reducer=reducer))
