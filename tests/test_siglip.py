"""SigLIP (issue 20 item 16): the attention-pooling head reads only the kept patches (output and FLOPs), the
retrieval task's sigmoid loss is transformers' ``return_loss``, and a short prune -> save -> load round trip."""

from __future__ import annotations

import torch
from contract.families import SIGLIP_TEXTS, all_sites, make_siglip, siglip_batch, siglip_ids
from tiny_clip import quick
from torch.utils.flop_counter import FlopCounterMode

import comp_vlm
from comp_vlm import get_adapter, load_pruned
from comp_vlm.structure import source_output_tokens
from comp_vlm.tasks.retrieval import RetrievalTask, contrastive_loss


def vision_tower(adapter, reference):
    return next(t for t in adapter.structure(reference) if t.name == "vision")


def test_the_pooling_head_reads_only_the_kept_patches():
    model = make_siglip(0, "eager")
    adapter = get_adapter(model).install()
    all_sites(adapter, 0.3)
    pixels = siglip_batch()["pixel_values"]
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels)
        head = model.vision_model.head
        for i in range(len(pixels)):
            full = out.last_hidden_state[i]  # kept patches in place, zeros where a site dropped one
            kept = full[full.abs().sum(-1) > 0]
            assert len(kept) == source_output_tokens(vision_tower(adapter, {"image_size": 16})) < len(full)
            alone = type(head).forward(head, kept[None])
            assert torch.allclose(out.pooler_output[i:i + 1], alone, atol=1e-5)
            assert not torch.allclose(out.pooler_output[i:i + 1], type(head).forward(head, full[None]), atol=1e-3)


def head_flops(model, pixels) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.get_image_features(pixel_values=pixels)
    return sum(counter.get_flop_counts()["SiglipVisionModel.head"].values())


def test_the_pooling_head_flops_follow_the_kept_patches():
    model = make_siglip(1, "eager")
    adapter = get_adapter(model).install()
    reference = {"image_size": 16, "text_length": 10}
    pixels = torch.randn(1, 3, 16, 16)
    per_token = adapter.output_token_flops(adapter.tower("vision"), reference)
    counts = {}
    for keep in (1.0, 0.3):
        all_sites(adapter, keep)
        counts[keep] = (head_flops(model, pixels), source_output_tokens(vision_tower(adapter, reference)))
    (dense_head, dense_tokens), (pruned_head, pruned_tokens) = counts[1.0], counts[0.3]
    assert dense_tokens == 16 and pruned_tokens < dense_tokens
    assert dense_head - pruned_head == per_token * (dense_tokens - pruned_tokens)
    d, i = model.config.vision_config.hidden_size, model.config.vision_config.intermediate_size
    assert per_token == 4 * d * d + 4 * d  # keys and values of each token, the probe's QK and AV
    assert pruned_head == 4 * d * (d + i) + per_token * pruned_tokens  # + the probe's q/out projections and MLP


def test_the_sigmoid_loss_is_transformers_siglip_loss():
    model = make_siglip(2, "eager")
    batch = siglip_batch()
    with torch.no_grad():
        reference = model(**batch, return_loss=True).loss
        task = RetrievalTask()
        assert torch.allclose(task.loss(model, batch), reference, atol=1e-5)
        assert abs(task.evaluate(model, [batch])["loss"] - reference.item()) < 1e-4
        infonce = contrastive_loss(*task._embeddings(model, batch), task.scale(model))
        assert not torch.allclose(task.loss(model, batch), infonce, atol=1e-3)


def siglip_loader(seed: int, batches: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        texts = [torch.randint(3, 30, (int(n),), generator=gen).tolist()
                 for n in torch.randint(2, 9, (len(SIGLIP_TEXTS),), generator=gen)]
        out.append({"pixel_values": torch.randn(len(texts), 3, 16, 16, generator=gen), "input_ids": siglip_ids(texts)})
    return out


def test_prune_save_load_round_trip(tmp_path):
    model = make_siglip(3, "sdpa")
    result = comp_vlm.prune(model, RetrievalTask(), siglip_loader(0, 4), siglip_loader(1, 2),
                            quick(ratio=0.7, reference={"image_size": 16, "text_length": 10}))
    assert result.recipe.pruned_flops <= 0.7 * result.recipe.dense_flops + 0.1 * result.recipe.dense_flops
    assert result.recipe.pruned_flops < result.recipe.dense_flops
    result.save(str(tmp_path / "pruned"))
    loaded = load_pruned(tmp_path / "pruned").eval()
    batch = siglip_batch()
    pruned = result.model.eval()
    with torch.no_grad():
        a, b = pruned(**batch), loaded(**batch)
    assert torch.allclose(a.image_embeds, b.image_embeds, atol=1e-5)
    assert torch.allclose(a.text_embeds, b.text_embeds, atol=1e-5)
    assert get_adapter(loaded).recipe().to_dict()["towers"] == result.recipe.to_dict()["towers"]


def test_a_padding_mask_keeps_the_pooled_last_position():
    """With an attention mask hiding the padding (the last position included), keep-all is the unmodified model,
    and under token sites each text equals itself alone with its mask: the pooled pad stays a query."""
    model = make_siglip(4, "eager")
    batch = siglip_batch()
    batch["attention_mask"] = (batch["input_ids"] != 1).long()
    with torch.no_grad():
        dense = model(**batch).text_embeds
        adapter = get_adapter(model).install()
        all_sites(adapter, 1.0)
        assert torch.allclose(model(**batch).text_embeds, dense, atol=1e-5)
        all_sites(adapter, 0.5)
        together = model(**batch).text_embeds
        for i in range(len(together)):
            alone = model(**{k: v[i:i + 1] for k, v in batch.items()}).text_embeds
            assert torch.allclose(together[i:i + 1], alone, atol=1e-5)
        assert not torch.allclose(together, dense, atol=1e-3) and torch.isfinite(together).all()
