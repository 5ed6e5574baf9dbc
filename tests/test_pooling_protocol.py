"""Issue 20 item 15, the parts a SigLIP-like family needs from the shared code: a tower with no pooled token, a
pooling head whose FLOPs follow the kept tokens, and a contrastive loss supplied by the family."""

from __future__ import annotations

from dataclasses import replace

import torch
from conftest import make_clip
from contract.families import CASES, all_sites, registered
from torch import nn
from transformers import CLIPModel

from comp_vlm import AdapterOptions, get_adapter
from comp_vlm.adapters.clip import CLIPAdapter
from comp_vlm.adapters.runtime import attention_scores
from comp_vlm.collect import StatsCollector
from comp_vlm.flops import tower_flops
from comp_vlm.structure import LayerStructure, TowerStructure, source_output_tokens
from comp_vlm.tasks.retrieval import (
    CONTRASTIVE_LOSSES,
    RetrievalTask,
    contrastive_loss,
    register_contrastive_loss,
)
from comp_vlm.tokens import TokenState, scatter_to_full, select_tokens

CPU = torch.device("cpu")


# ---- a tower with no pooled token ---------------------------------------------------------------------------------
def test_a_tower_with_no_pooled_token_can_prune_every_token():
    state = TokenState.start(1, 4, CPU, pooled_token=False)
    assert state.prunable.all() and not state.has_pooled and state.anchor_slot is None
    slots, ok = select_tokens(torch.tensor([[0.1, 0.4, 0.3, 0.2]]), state, 0.5)
    assert slots.tolist() == [[1, 2]] and ok.all()  # slot 0 is no longer kept for the pooled token


def test_no_pooled_token_scores_received_attention_from_every_query_even_causal():
    state = TokenState.start(1, 3, CPU, pooled_token=False)
    probs = torch.tensor([[[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]]]])  # (B, H, q, k)
    received = torch.tensor([0.9, 0.6, 1.5])  # column sums over all three queries
    for causal in (False, True):
        assert torch.allclose(attention_scores(probs, None, state, causal), received[None] / received.sum())


def test_the_collector_has_no_anchor_in_a_tower_with_no_pooled_token():
    x = torch.tensor([[[1.0], [2.0], [3.0]]])  # (B, n, C)
    scores = torch.tensor([[0.5, 0.25, 0.25]])
    collector = StatsCollector()
    collector._add(("neuron", "t", 0), x, collector._weights(scores, TokenState.start(1, 3, CPU, pooled_token=False)))
    assert collector.stats[("neuron", "t", 0)].item() == 0.5 * 1 + 0.25 * 4 + 0.25 * 9  # ω = scores, slot 0 too
    anchored = StatsCollector()
    anchored._add(("neuron", "t", 0), x, anchored._weights(scores, TokenState.start(1, 3, CPU)))
    assert anchored.stats[("neuron", "t", 0)].item() == 1.0 * 1 + 0.5 * 4 + 0.5 * 9  # slot 0 the anchor, ω_0 = 1


def test_a_masked_pooled_token_stays_a_query_through_a_site():
    """SigLIP pools at the last position, which a padding mask may hide as a key: a site keeps it, and the scatter
    puts it back where the pooling reads it."""
    valid = torch.tensor([[True, True, True, False]])
    state = TokenState.start(1, 4, CPU, valid=valid, pooled=torch.tensor([3]))
    slots, ok = select_tokens(torch.tensor([[0.2, 0.5, 0.3, 0.0]]), state, 0.5)
    assert slots.tolist() == [[1, 2, 3]]  # 2 of the 3 prunable tokens, and the pooled one
    gathered = state.gather(slots, ok, False, torch.float32)
    assert gathered.valid.tolist() == [[True, True, False]]  # a query, still no key
    assert gathered.attn_mask[0, 0, :, 2].tolist() == [torch.finfo(torch.float32).min] * 3
    full = scatter_to_full(torch.tensor([[[1.0], [2.0], [3.0]]]), gathered)
    assert full[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


# ---- a pooling head whose FLOPs follow the kept tokens ----------------------------------------------------------
def test_output_token_flops_count_every_token_leaving_the_tower():
    layer = LayerStructure(hidden=8, heads=2, head_dim=4, neurons=16)
    dense = TowerStructure("v", 10, 0, (layer, layer), extra_flops=100, output_token_flops=7)
    pruned = TowerStructure("v", 10, 0, (layer, LayerStructure(8, 2, 4, 16, site_keep=0.3)), extra_flops=100,
                            output_token_flops=7)
    plain = TowerStructure("v", 10, 0, (layer, LayerStructure(8, 2, 4, 16, site_keep=0.3)), extra_flops=100)
    assert tower_flops(dense).total - tower_flops(replace(dense, output_token_flops=0)).total == 7 * 10
    assert tower_flops(pruned).total - tower_flops(plain).total == 7 * 3  # floor(0.3 * 10 + 0.5) tokens leave


class HeadModel(CLIPModel):
    """Stand-in model class for :class:`HeadAdapter`."""


class HeadAdapter(CLIPAdapter):
    """CLIP with a (pretend) head reading every vision token leaving the tower: 5 FLOPs each."""

    model_classes = (HeadModel,)

    def output_token_flops(self, spec, reference):
        return 5 if spec.name == "vision" else 0


def test_the_adapter_hook_counts_the_head_on_the_kept_tokens():
    dense = make_clip(0)
    model = HeadModel._from_config(dense.config, attn_implementation="eager").eval()
    model.load_state_dict(dense.state_dict())
    reference = CASES[("clip", "CLIPModel")].reference
    options = AdapterOptions(dead_compute=False)
    with registered(HeadAdapter):
        adapter = get_adapter(model).install(options)
        all_sites(adapter, 0.5)
        base = get_adapter(dense).install(options)
        all_sites(base, 0.5)
        vision = next(t for t in adapter.structure(reference) if t.name == "vision")
        assert vision.output_token_flops == 5
        kept, dense_tokens = source_output_tokens(vision), vision.tokens
        assert 0 < kept < dense_tokens
        assert adapter.count_flops(reference) - base.count_flops(reference) == 5 * kept
        assert adapter.dense_flops(reference) - base.dense_flops(reference) == 5 * dense_tokens


# ---- a loss supplied by the family ------------------------------------------------------------------------------
class BiasedModel(CLIPModel):
    """Stand-in for a family with its own contrastive loss."""


def sum_loss(model: nn.Module, img: torch.Tensor, txt: torch.Tensor, positives) -> torch.Tensor:
    return (img.sum() - txt.sum()) * model.logit_scale.exp().squeeze()


def test_the_retrieval_task_computes_the_family_loss(monkeypatch):
    dense = make_clip(0)
    model = BiasedModel._from_config(dense.config, attn_implementation="eager").eval()
    model.load_state_dict(dense.state_dict())
    sub = type("SubBiasedModel", (BiasedModel,), {})._from_config(dense.config, attn_implementation="eager").eval()
    sub.load_state_dict(dense.state_dict())
    batch = CASES[("clip", "CLIPModel")].batch()
    task = RetrievalTask()
    img, txt = task._embeddings(model, batch)
    infonce = contrastive_loss(img, txt, task.scale(model))
    assert torch.allclose(task.loss(model, batch), infonce)  # no family loss: InfoNCE
    monkeypatch.setitem(CONTRASTIVE_LOSSES, BiasedModel, sum_loss)
    register_contrastive_loss(BiasedModel, sum_loss)
    expected = sum_loss(model, img, txt, None)
    for m in (model, sub):  # the class and its subclasses
        assert torch.allclose(task.loss(m, batch), expected)
        assert abs(task.evaluate(m, [batch])["loss"] - expected.item()) < 1e-4
    assert torch.allclose(task.loss(dense, batch), infonce)  # CLIP itself unchanged
