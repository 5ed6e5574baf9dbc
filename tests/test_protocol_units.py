"""Protocol gaps a family needs filled (issue 20, items 1-4 and 6): a parameter mode per unit kind, layer fields
from the adapter, width attributes, per-span widths (GQA key/value groups) and the family's attention
implementation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_clip, tiny_clip_config
from contract.families import registered
from tiny_clip import fresh, quick, tiny_setup
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPModel

from comp_vlm import ConfigError, Pruner, get_adapter, load_pruned, save_pruned
from comp_vlm.adapters import units
from comp_vlm.adapters.base import attn_implementation_for
from comp_vlm.adapters.clip import CLIPAdapter
from comp_vlm.adapters.units import Span
from comp_vlm.flops import attention_flops, unit_flops
from comp_vlm.structure import LayerStructure
from comp_vlm.tasks.retrieval import RetrievalTask


def with_text_neuron_mode(specs, mode: str):
    """``specs`` with the text tower's neurons in ``mode``."""
    return [replace(s, units=tuple(replace(u, mode=mode) if (s.name, u.kind) == ("text", "neuron") else u
                                   for u in s.units)) for s in specs]


class PcCLIPModel(CLIPModel):
    """A CLIP whose adapter puts the text neurons in P_c (test only)."""


class PcCLIPAdapter(CLIPAdapter):
    model_classes = (PcCLIPModel,)

    def tower_specs(self):
        return with_text_neuron_mode(super().tower_specs(), "P_c")


# ---- item 1: a parameter mode per unit kind ------------------------------------------------------------------------

def test_a_unit_kind_in_its_own_mode_is_a_mode_with_its_own_groups():
    cfg, _, _ = tiny_setup()
    with registered(PcCLIPAdapter):
        adapter = get_adapter(PcCLIPModel._from_config(cfg))
        assert isinstance(adapter, PcCLIPAdapter)
        assert adapter.modes() == ["P_v", "T_v", "P_l", "P_c", "T_l"]
        assert {(g.tower, g.kind) for g in adapter.unit_groups("P_c")} == {("text", "neuron")}
        assert {(g.tower, g.kind) for g in adapter.unit_groups("P_l")} == {("text", "head")}
        assert {(g.tower, g.kind) for g in adapter.unit_groups("P_v")} == {("vision", "head"), ("vision", "neuron")}
        assert adapter.unit_group(("neuron", "text", 1)).mode == "P_c"
        assert adapter.unit_group(("head", "text", 1)).mode == "P_l"
    assert get_adapter(fresh(cfg)).modes() == ["P_v", "T_v", "P_l", "T_l"]  # CLIP itself unchanged


def test_the_pruner_plans_a_pc_stage_from_those_groups_alone():
    cfg, _, loaders = tiny_setup()
    with registered(PcCLIPAdapter):
        torch.manual_seed(0)
        pruner = Pruner(PcCLIPModel._from_config(cfg), RetrievalTask(), loaders.val, quick(ratio=0.5,
                                                                                            dead_compute=False))
        assert "P_c" in pruner.scheduler.modes
        pruner.collector.unit_scores = lambda key, weight, width: torch.arange(weight.shape[1] // width).double()
        before = pruner.flops_kept()
        plan = pruner._plan_params("P_c", 0.05 * pruner.dense_flops)
        assert plan.units and {(kind, tower) for kind, tower, _ in plan.units} == {("neuron", "text")}
        assert set(plan.removed_by) == {"text/neurons"}  # P_c's share, by tower and kind
        assert plan.flops_after < before
        pruner._restore_plan(plan)
        heads = pruner._plan_params("P_l", 0.02 * pruner.dense_flops)  # P_l is now the text heads alone
        assert heads.units and {(kind, tower) for kind, tower, _ in heads.units} == {("head", "text")}


@pytest.mark.parametrize("mode", ["T_l", "P_x"])
def test_a_unit_mode_that_is_not_a_parameter_mode_is_refused_at_construction(mode):
    class BadAdapter(CLIPAdapter):
        def tower_specs(self):
            return with_text_neuron_mode(super().tower_specs(), mode)

    with pytest.raises(ConfigError, match=f"tower 'text': 'neuron' units have mode '{mode}', not a parameter mode"):
        BadAdapter(make_clip())


# ---- item 2: layer fields from the adapter -------------------------------------------------------------------------

def test_an_adapter_sets_further_layer_fields_in_its_structure():
    class CrossFieldAdapter(CLIPAdapter):
        def layer_fields(self, spec, layer):
            return {"cross_kv_hidden": 7 + layer} if spec.name == "text" else {}

    model = make_clip()
    adapter = CrossFieldAdapter(model)
    for structure in (adapter.structure(), adapter.dense_structure()):
        towers = {t.name: t for t in structure}
        assert [lay.cross_kv_hidden for lay in towers["text"].layers] == [7, 8, 9]
        assert [lay.cross_kv_hidden for lay in towers["vision"].layers] == [0, 0, 0]
    assert all(lay.cross_kv_hidden == 0 for t in get_adapter(model).structure() for lay in t.layers)


# ---- items 3 and 4: width attributes and per-span widths (a toy GQA layer) ------------------------------------------

class ToyGQA(nn.Module):
    """Grouped-query attention: ``groups`` key/value heads, each shared by ``q_per_kv`` query heads. Its reshapes
    read the owner's ``kv_heads`` (a count) and ``kv_size`` (kv_heads x head_dim, a width), as transformers'
    attention modules read ``num_heads`` / ``all_head_size``."""

    def __init__(self, d: int = 10, head_dim: int = 2, groups: int = 3, q_per_kv: int = 2) -> None:
        super().__init__()
        self.head_dim, self.q_per_kv = head_dim, q_per_kv
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(d, groups * q_per_kv * head_dim)
        self.attn.k_proj = nn.Linear(d, groups * head_dim)
        self.attn.v_proj = nn.Linear(d, groups * head_dim)
        self.attn.o_proj = nn.Linear(groups * q_per_kv * head_dim, d)
        self.attn.kv_heads, self.attn.kv_size = groups, groups * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, (b, n, _), hd = self.attn, x.shape, self.head_dim
        q = a.q_proj(x).view(b, n, a.kv_heads, self.q_per_kv, hd).permute(0, 2, 3, 1, 4)  # b, g, r, n, hd
        k = a.k_proj(x).view(b, n, a.kv_size // hd, hd).transpose(1, 2)[:, :, None]  # b, g, 1, n, hd
        v = a.v_proj(x).view(b, n, a.kv_size // hd, hd).transpose(1, 2)[:, :, None]
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / hd**0.5, dim=-1)
        out = torch.matmul(probs, v).permute(0, 3, 1, 2, 4).reshape(b, n, -1)  # groups' query heads in order
        return a.o_proj(out)


def toy_spec(layer: ToyGQA) -> units.UnitSpec:
    return units.kv_groups("attn", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", layer.head_dim,
                           layer.attn.kv_heads, layer.q_per_kv, count_attrs=("kv_heads",), width_attrs=("kv_size",))


def test_a_gqa_layer_sliced_by_groups_equals_the_masked_one():
    torch.manual_seed(0)
    layer, x = ToyGQA(), torch.randn(2, 5, 10)
    spec = toy_spec(layer)
    units.set_mask(layer, spec, torch.tensor([1.0, 0.0, 1.0]))
    masked = layer(x)
    for m in layer.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    units.slice_units(layer, spec, units.kept(layer, spec))
    a = layer.attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == (8, 4, 4, 8)
    assert (a.kv_heads, a.kv_size) == (2, 4) and units.dense_index(layer, spec) == [0, 2]
    assert torch.allclose(layer(x), masked, atol=1e-6)


def test_a_gqa_group_keeps_its_query_heads_rows_and_columns():
    """Group 1 of 3 (2 query heads of width 2 each) owns q rows / o columns 4..7 but k/v rows 2..3."""
    spec = toy_spec(ToyGQA())
    group = torch.tensor([1])
    channels = {s.path: units.span_channels(s, group, spec.width, spec.dense).tolist() for s in spec.spans}
    assert channels == {"attn.q_proj": [4, 5, 6, 7], "attn.k_proj": [2, 3], "attn.v_proj": [2, 3],
                        "attn.o_proj": [4, 5, 6, 7]}
    assert spec.stat_width == 4  # the scores read o_proj's columns in blocks of the group's query heads
    with pytest.raises(ValueError, match="width >= 1"):
        Span("attn.q_proj", "out", width=0)


def test_a_gqa_group_sets_heads_and_kv_heads_and_its_flops_match_the_flop_counter():
    torch.manual_seed(1)
    layer, n = ToyGQA(), 5
    spec = toy_spec(layer)
    units.slice_units(layer, spec, [0, 2])
    structure = LayerStructure(hidden=10, head_dim=layer.head_dim, neurons=0, **spec.structure_counts(2))
    assert (structure.heads, structure.kv_heads) == (4, 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(torch.randn(1, n, 10))
    assert attention_flops(n, structure) == counter.get_total_flops()
    one_fewer = replace(structure, **spec.structure_counts(1))
    assert unit_flops("kv_group", structure, n, n) == attention_flops(n, structure) - attention_flops(n, one_fewer)


# ---- item 6: the family's attention implementation -----------------------------------------------------------------

class EagerCLIPModel(CLIPModel):
    """A CLIP whose adapter builds it with eager attention (test only)."""


class EagerCLIPAdapter(CLIPAdapter):
    model_classes = (EagerCLIPModel,)
    attn_implementation = "eager"


def test_load_pruned_builds_the_model_with_its_familys_attention(tmp_path):
    torch.manual_seed(0)
    with registered(EagerCLIPAdapter):
        model = EagerCLIPModel._from_config(tiny_clip_config(), attn_implementation="eager").eval()
        adapter = get_adapter(model).install()
        adapter.set_unit_mask(("head", "vision", 1), [1.0, 0.0, 1.0, 1.0])
        adapter.slice()
        save_pruned(model, tmp_path / "pruned")
        loaded = load_pruned(tmp_path / "pruned")
        assert type(loaded) is EagerCLIPModel and loaded.config._attn_implementation == "eager"
        assert attn_implementation_for(EagerCLIPModel) == "eager"
        overridden = load_pruned(tmp_path / "pruned", attn_implementation="sdpa")
        assert overridden.config._attn_implementation != "eager"
        ids = torch.tensor([[1, 5, 6, 2]])
        pixels = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids, pixel_values=pixels).logits_per_image,
                                  model(input_ids=ids, pixel_values=pixels).logits_per_image, atol=1e-5)
    assert attn_implementation_for("CLIPModel") == "sdpa"
