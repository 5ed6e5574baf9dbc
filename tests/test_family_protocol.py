"""The family protocol (issue 20 item 10): the base class performs the family duties (installed flag, every layer's
``comp_runtime``, the ``comp_vlm`` attention), refuses a family that overrides a ``@final`` member, and every
registered family's tower forwards call ``end_tower``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_clip
from contract.families import CASES, all_sites, call, case_id, registered
from transformers import CLIPModel

from comp_vlm import AdapterOptions, get_adapter, masks
from comp_vlm.adapters import clip
from comp_vlm.adapters.base import INSTALLED_ATTR, RUNTIME_ATTR, ModelAdapter, final_members
from comp_vlm.adapters.clip import CLIPAdapter, TextCallHook, install_clip_tower, uninstall_clip_tower
from comp_vlm.adapters.common import COMP_ATTENTION
from comp_vlm.adapters.runtime import SiteRuntime
from comp_vlm.collect import StatsCollector

KEYS = sorted(CASES)
HOOKS = {"tower_specs", "default_reference", "tower_io", "_install_forward", "_uninstall_forward", "layer_fields",
         "pool_tokens", "couplings", "layer_runtime", "validate_recipe"}


class HooksOnlyModel(CLIPModel):
    """Stand-in model class for :class:`HooksOnlyAdapter`."""


class HooksOnlyAdapter(ModelAdapter):
    """A family written from the documented hooks alone: CLIP's towers, and forwards that do nothing but install
    themselves (no flag, no runtime, no attention switch)."""

    family = "hooks-only"
    model_classes = (HooksOnlyModel,)
    tower_specs = CLIPAdapter.tower_specs
    default_reference = CLIPAdapter.default_reference
    tower_io = CLIPAdapter.tower_io

    def _encoders(self) -> list[torch.nn.Module]:
        return [self.model.vision_model.encoder, self.model.text_model.encoder]

    def _install_forward(self) -> None:
        for encoder in self._encoders():
            install_clip_tower(encoder)
        self.model.text_model.register_forward_pre_hook(TextCallHook(), with_kwargs=True)

    def _uninstall_forward(self) -> None:
        for encoder in self._encoders():
            uninstall_clip_tower(encoder)
        masks.remove_hooks(self.model.text_model, (TextCallHook,))


def hooks_only_model() -> HooksOnlyModel:
    dense = make_clip(0)
    model = HooksOnlyModel._from_config(dense.config, attn_implementation="sdpa").eval()
    model.load_state_dict(dense.state_dict())
    return model


def test_a_family_of_hooks_alone_installs_and_keeps_all():
    clip_case = CASES[("clip", "CLIPModel")]
    model, batch = hooks_only_model(), clip_case.batch()
    dense = call(clip_case, model, batch)
    with registered(HooksOnlyAdapter):
        adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
        assert adapter.is_installed() and model.config._attn_implementation == COMP_ATTENTION
        all_sites(adapter, 1.0)
        kept_all = call(clip_case, model, batch)
        all_sites(adapter, 0.5)  # a site needs the attention probabilities: the comp_vlm attention is on
        pruned = call(clip_case, model, batch)
        adapter.uninstall()
        assert not adapter.is_installed() and model.config._attn_implementation == "sdpa"
        assert all(RUNTIME_ATTR not in layer.__dict__ for spec in adapter.tower_specs()
                   for layer in adapter.layers(spec))
    for a, b, c in zip(kept_all, dense, pruned):
        assert torch.allclose(a, b, atol=2e-5)
        assert not torch.allclose(c, b, atol=1e-3)
    for a, b in zip(call(clip_case, model, batch), dense):  # uninstalled: the class forwards again
        assert torch.equal(a, b)


def test_the_generic_members_are_final_and_the_hooks_are_not():
    marked = final_members(ModelAdapter)
    assert {"install", "uninstall", "is_installed", "options", "token_scorer", "structure", "recipe",
            "apply_recipe", "slice", "unit_groups", "param_groups", "set_keep_ratio"} <= marked
    assert not marked & HOOKS


@pytest.mark.parametrize("member", ["install", "uninstall", "structure", "options"])
def test_a_family_that_overrides_a_final_member_is_refused(member):
    with pytest.raises(TypeError, match=f"^Bad overrides {member}: ModelAdapter marks them @final"):
        type("Bad", (CLIPAdapter,), {member: lambda self: None})


def test_a_family_that_merges_without_a_key_projection_is_refused():
    with pytest.raises(TypeError, match="^Bad lists token reducer 'merge' but sets no key_projection$"):
        type("Bad", (CLIPAdapter,), {"key_projection": None})


@pytest.fixture(params=KEYS, ids=lambda key: case_id(key))
def case(request):
    return CASES[request.param]


def test_install_performs_the_duties_and_uninstall_undoes_them(case):
    model = case.make(0, "eager")
    adapter = get_adapter(model)
    assert not adapter.is_installed()
    adapter.install()
    assert model.__dict__[INSTALLED_ATTR] is True
    for spec in adapter.tower_specs():
        for i, layer in enumerate(adapter.layers(spec)):
            runtime = layer.__dict__[RUNTIME_ATTR]
            assert isinstance(runtime, SiteRuntime) and runtime == adapter.layer_runtime(spec, i)
            assert (runtime.tower, runtime.index, runtime.pools) == (spec.name, i, spec.site_pools())
    adapter.uninstall()
    assert INSTALLED_ATTR not in model.__dict__
    assert all(RUNTIME_ATTR not in layer.__dict__ for spec in adapter.tower_specs() for layer in adapter.layers(spec))


def test_install_switches_an_sdpa_family_to_the_comp_vlm_attention(case):
    adapter_cls = type(get_adapter(case.make(0, "eager")))
    if adapter_cls.attn_implementation != "sdpa":
        pytest.skip(f"{adapter_cls.__name__} builds its models with {adapter_cls.attn_implementation}")
    model = case.make(0, "sdpa")
    get_adapter(model).install()
    assert model.config._attn_implementation == COMP_ATTENTION
    get_adapter(model).uninstall()
    assert model.config._attn_implementation == "sdpa"


def missing_end_tower(case) -> list[str]:
    """The towers whose last layer has no neuron statistic, or whose MLP statistic is still pending, after one
    recorded training forward: their tower forward did not call ``end_tower``."""
    model = case.make(0, "eager").train()
    adapter = get_adapter(model)
    collector = StatsCollector()
    collector.enabled = True
    adapter.attach_collector(collector)
    case.loss(model, case.batch())
    return sorted({*collector._pending} | {spec.name for spec in adapter.tower_specs()
                                            if ("neuron", spec.name, len(adapter.layers(spec)) - 1)
                                            not in collector.stats})


def test_every_tower_forward_ends_its_tower(case):
    assert missing_end_tower(case) == []


def test_a_tower_forward_without_end_tower_is_caught(monkeypatch):
    monkeypatch.setattr(clip, "end_tower", lambda layers: None)
    assert missing_end_tower(CASES[("clip", "CLIPModel")]) == ["text", "vision"]
