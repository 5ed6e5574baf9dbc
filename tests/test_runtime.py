"""The site runtime: the installed token scorer is the one the sites use; the built-in scorers; keep-all and
gradient checkpointing with a non-default scorer; the scorer's name through options, config, recipe and CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_clip
from test_clip_adapter import assert_close, embeds, prune_all_sites

from comp_vlm import AdapterOptions, ConfigError, PruneConfig, RecipeError, get_adapter
from comp_vlm.adapters.base import options_from_recipe
from comp_vlm.adapters.runtime import (
    TOKEN_SCORERS,
    RandomScorer,
    attention_scores,
    call_scorer,
    make_token_scorer,
)
from comp_vlm.cli import build_parser, search_settings
from comp_vlm.importance import normalize_scores
from comp_vlm.tokens import TokenState


def last_tokens_first(probs, head_mask, state, causal):
    """A scorer that prefers later tokens: the score grows with the original position."""
    return normalize_scores(state.positions.float() + 1, state.prunable)


class Recording:
    """Scores by ``scorer`` and records the original positions of the slots of every call."""

    def __init__(self, scorer):
        self.scorer, self.positions = scorer, []

    def __call__(self, probs, head_mask, state, causal):
        self.positions.append(state.positions.clone())
        return self.scorer(probs, head_mask, state, causal)


def image_features(model, pixels):
    with torch.no_grad():
        return model.vision_model(pixel_values=pixels).pooler_output


# ---- the injected scorer is the one used ------------------------------------------------------------------------
def test_injected_scorer_decides_what_a_site_keeps(pixels):
    model = make_clip(0, vision_layers=3)
    scorer = Recording(last_tokens_first)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False), scorer=scorer)
    for layer in (1, 2):  # 16 patches + CLS; the site at 1 keeps round(0.5 * 16) = 8 patches
        adapter.set_keep_ratio("vision", layer, 0.5)
    image_features(model, pixels)
    assert [p.shape[1] for p in scorer.positions] == [17, 9]
    expected = torch.tensor([0, *range(9, 17)]).expand(len(pixels), -1)  # CLS and the 8 last patches
    assert torch.equal(scorer.positions[1], expected)


def test_default_scorer_keeps_other_tokens_than_the_injected_one(pixels):
    model = make_clip(0, vision_layers=3)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    assert adapter.token_scorer is attention_scores
    scorer = Recording(attention_scores)
    adapter.install(scorer=scorer)  # same scores as the default, recorded
    for layer in (1, 2):
        adapter.set_keep_ratio("vision", layer, 0.5)
    image_features(model, pixels)
    assert not torch.equal(scorer.positions[1], torch.tensor([0, *range(9, 17)]).expand(len(pixels), -1))


def test_scorer_survives_reinstall_and_deepcopy_and_goes_with_changed_options():
    model = make_clip(0)
    scorer = Recording(last_tokens_first)
    adapter = get_adapter(model).install(scorer=scorer)
    adapter.install()
    adapter.install(AdapterOptions())  # the same options: sites, keep ratios and scorer stay
    assert adapter.token_scorer is scorer
    assert isinstance(get_adapter(copy.deepcopy(model)).token_scorer, Recording)
    adapter.install(AdapterOptions(token_scorer="random"))
    assert isinstance(adapter.token_scorer, RandomScorer)
    adapter.uninstall()
    assert get_adapter(model).install().token_scorer is attention_scores


# ---- the built-in scorers -----------------------------------------------------------------------------------------
def test_attention_scorer_is_cit_received_attention_for_a_bidirectional_tower():
    # tokens [CLS, a, b]; two heads; the non-CLS queries (rows 1, 2) sum the max over heads of what a and b receive
    probs = torch.tensor([[[[.5, .25, .25], [.2, .6, .2], [.1, .3, .6]],
                           [[.4, .4, .2], [.1, .1, .8], [.3, .3, .4]]]])
    state = TokenState.start(1, 3, torch.device("cpu"))
    scorer = make_token_scorer("attention")
    # max over heads: row 1 [.2, .6, .8], row 2 [.3, .3, .6] -> a .9, b 1.4
    assert torch.allclose(scorer(probs, None, state, False), torch.tensor([[0, .9 / 2.3, 1.4 / 2.3]]))
    # CIT: head 1 at half weight -> row 1 [.2, .6, .4], row 2 [.15, .3, .6] -> a .9, b 1.0
    got = scorer(probs, torch.tensor([1.0, 0.5]), state, False)
    assert torch.allclose(got, torch.tensor([[0, .9 / 1.9, 1.0 / 1.9]]))


def test_attention_scorer_reads_the_pooled_row_of_a_causal_tower():
    # tokens [BOS, x, y, EOS], pooled at the EOS; only the EOS row counts: max over heads [.4, .2, .4, .4]
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0, 3] = torch.tensor([.1, .2, .3, .4])
    probs[0, 1, 3] = torch.tensor([.4, .1, .4, .1])
    first = torch.tensor([[True, False, False, False]])
    state = TokenState.start(1, 4, torch.device("cpu"), pooled=torch.tensor([3]), always_kept=first)
    got = make_token_scorer("attention")(probs, None, state, True)
    assert torch.allclose(got, torch.tensor([[0, 1 / 3, 2 / 3, 0]]))


def _state(batch=4, length=12):
    return TokenState.start(batch, length, torch.device("cpu"))


def test_random_scorer_is_seeded_normalised_and_leaves_the_global_rng_alone():
    probs, state = torch.zeros(4, 1, 12, 12), _state()
    before = torch.get_rng_state()
    a, b, c = (make_token_scorer("random", seed)(probs, None, state, False) for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 0).all() and (a[:, 1:] > 0).all()  # CLS is not prunable
    assert torch.allclose(a.sum(dim=1), torch.ones(4))


def test_random_scorer_draws_anew_per_call_but_fixes_a_call():
    probs, state = torch.zeros(4, 1, 12, 12), _state()
    scorer = RandomScorer(0)
    first, second = scorer(probs, None, state, False), scorer(probs, None, state, False)
    assert not torch.equal(first, second)
    fixed = call_scorer(scorer)
    assert torch.equal(fixed(probs, None, state, False), fixed(probs, None, state, False))
    assert call_scorer(attention_scores) is attention_scores


def _random_run(pixels, text_batch, seed, global_seed):
    model = make_clip(3)
    prune_all_sites(get_adapter(model).install(AdapterOptions(token_scorer="random", token_scorer_seed=seed)), 0.5)
    torch.manual_seed(global_seed)
    before = torch.get_rng_state()
    out = embeds(model, pixels, text_batch)
    assert torch.equal(torch.get_rng_state(), before)
    return out


def test_random_sites_are_reproducible_under_a_seed_whatever_the_global_rng(pixels, text_batch):
    a = _random_run(pixels, text_batch, seed=0, global_seed=0)
    assert_close(a, _random_run(pixels, text_batch, seed=0, global_seed=1), atol=0)
    other = _random_run(pixels, text_batch, seed=1, global_seed=0)
    assert not all(torch.equal(x, y) for x, y in zip(a, other))


# ---- invariants with a non-default scorer -----------------------------------------------------------------------
@pytest.mark.parametrize("install", [{"options": AdapterOptions(dead_compute=False, token_scorer="random")},
                                     {"options": AdapterOptions(dead_compute=False), "scorer": last_tokens_first}])
def test_keep_all_equals_unmodified_with_any_scorer(install, pixels, text_batch):
    model = make_clip(4)
    with torch.no_grad():
        ref_v = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        ref_t = model.text_model(**text_batch, output_hidden_states=True)
    ref = embeds(model, pixels, text_batch)
    adapter = get_adapter(model).install(**install)
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, 1.0)
    with torch.no_grad():
        got_v = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        got_t = model.text_model(**text_batch, output_hidden_states=True)
    assert_close(ref_v.hidden_states, got_v.hidden_states)
    assert_close(ref_t.hidden_states, got_t.hidden_states)
    assert_close(ref, embeds(model, pixels, text_batch))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_replays_the_random_scorer(text_batch, reentrant):
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = make_clip(10)
        adapter = get_adapter(model).install(AdapterOptions(token_scorer="random", token_scorer_seed=5))
        prune_all_sites(adapter, 0.5)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        out = model(pixel_values=pixels, **text_batch, return_loss=True)
        out.loss.backward()
        grads.append([model.vision_model.encoder.layers[i].mlp.fc1.weight.grad.clone() for i in (0, 1)])
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, atol=1e-5)


# ---- the scorer's name: options, config, recipe, CLI ----------------------------------------------------------------
def test_unknown_scorer_is_a_config_error_everywhere():
    with pytest.raises(ConfigError, match="token_scorer must be one of attention, random, got 'nope'"):
        PruneConfig(token_scorer="nope")
    with pytest.raises(ConfigError, match="token_scorer must be one of attention, random, got 'nope'"):
        AdapterOptions(token_scorer="nope")
    with pytest.raises(RecipeError, match="token_scorer must be one of attention, random"):
        options_from_recipe({"token_scorer": "nope"})
    with pytest.raises(ConfigError, match="choose from attention, random"):
        make_token_scorer("nope")


def test_pruner_installs_the_configured_scorer_and_records_it():
    from comp_vlm.search import Pruner
    from comp_vlm.tasks import RetrievalTask

    model = make_clip(0)
    Pruner(model, RetrievalTask(), [{}], PruneConfig(token_scorer="random", seed=7, progress=False))
    adapter = get_adapter(model)
    assert isinstance(adapter.token_scorer, RandomScorer)
    assert adapter.recipe().options["token_scorer"] == "random"
    assert adapter.recipe().options["token_scorer_seed"] == 7


def test_cli_flag_lists_the_registry():
    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--token-scorer", "random"])
    assert args.token_scorer == "random"
    unset = build_parser().parse_args(["prune", "--model", "m", "--out", "o"])
    assert unset.token_scorer is None and PruneConfig(**search_settings(unset)).token_scorer == "attention"
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
                  if a.dest == "token_scorer")
    assert tuple(action.choices) == tuple(TOKEN_SCORERS)
