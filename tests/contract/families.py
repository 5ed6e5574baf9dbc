"""One contract case per registered model class of an adapter family: how to build a tiny model of it and how
to call it.

A new adapter joins the contract by adding a case here for every model class it registers (a family may register
several: BLIP's retrieval and VQA classes), keyed by (family, model class name);
``test_every_registered_model_class_has_a_case`` fails until it does. A case only knows its model's inputs and
outputs; the contract itself speaks the adapter protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import tiny_blip
import torch
from conftest import WORDS, make_clip
from torch import nn

from comp_vlm.data.text import build_word_tokenizer

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    family: str
    model_class: str  # the name of the registered model class ``make`` builds
    make: Callable[[int, str], nn.Module]  # (seed, attention implementation) -> model in eval mode
    batch: Callable[[], Inputs]  # a padded batch of several samples
    sample: Callable[[Inputs, int], Inputs]  # sample i of ``batch()`` alone, unpadded
    outputs: Callable[[nn.Module, Inputs], tuple[torch.Tensor, ...]]  # per-sample outputs (batch first)
    loss: Callable[[nn.Module, Inputs], torch.Tensor]  # a training loss on a batch
    at_reference: Callable[[nn.Module, dict], Inputs]  # one sample at the FLOPs reference shape
    features: Callable[[nn.Module, Inputs], object]  # the forward the FLOPs model counts (no task head)
    reference: dict
    # where the unmodified model is no reference on ``batch()`` (a transformers bug the adapter corrects): a batch
    # on which it is
    keep_all_batch: Callable[[], Inputs] | None = None


# ---- CLIP ---------------------------------------------------------------------------------------------------------

CLIP_TEXTS = ["a photo of a red circle", "this is a small blue square left of a big green triangle", "red",
              "a big circle and a small square on the left"]


def clip_batch() -> Inputs:
    text = build_word_tokenizer(WORDS)(CLIP_TEXTS, padding=True, return_tensors="pt")
    pixels = torch.randn(len(CLIP_TEXTS), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def clip_sample(batch: Inputs, i: int) -> Inputs:
    length = int(batch["attention_mask"][i].sum())
    return {"pixel_values": batch["pixel_values"][i:i + 1], "input_ids": batch["input_ids"][i:i + 1, :length],
            "attention_mask": batch["attention_mask"][i:i + 1, :length]}


def clip_outputs(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    out = model(**inputs)
    return out.image_embeds, out.text_embeds


def clip_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs, return_loss=True).loss


def clip_at_reference(model: nn.Module, reference: dict) -> Inputs:
    cfg = model.config
    length = int(reference["text_length"])
    ids = torch.randint(3, cfg.text_config.vocab_size, (1, length), generator=torch.Generator().manual_seed(2))
    ids[0, 0], ids[0, -1] = cfg.text_config.bos_token_id, cfg.text_config.eos_token_id
    size = int(reference["image_size"])
    return {"pixel_values": torch.randn(1, 3, size, size), "input_ids": ids}


def clip_features(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """Image and text features; the logit matrix between them is the task's, outside the FLOPs model."""
    return (model.get_image_features(pixel_values=inputs["pixel_values"]),
            model.get_text_features(input_ids=inputs["input_ids"]))


CLIP = Case("clip", "CLIPModel", lambda seed, attn: make_clip(seed, attn=attn), clip_batch, clip_sample, clip_outputs, clip_loss,
            clip_at_reference, clip_features, {"image_size": 16, "text_length": 9})

# ---- BLIP ---------------------------------------------------------------------------------------------------------
# BLIP has eager attention only: a case builds it so whatever the contract asks for.


def blip_retrieval_batch() -> Inputs:
    batch = tiny_blip.question_batch()
    batch.pop("decoder_input_ids")
    return batch


def blip_itm_scores(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (model(**inputs).itm_score,)


def blip_itm_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """ITM cross-entropy on alternating labels plus the ITC similarities' mean (both paths get gradients)."""
    labels = torch.arange(len(inputs["input_ids"])) % 2
    itm = nn.functional.cross_entropy(model(**inputs).itm_score, labels)
    return itm + model(**inputs, use_itm_head=False).itm_score.mean()


def blip_at_reference(model: nn.Module, reference: dict) -> Inputs:
    """One image (``image_size`` x ``image_width``) and one text of ``text_length`` tokens (and, for VQA, an answer
    of ``answer_length``)."""
    cfg = model.config.text_config
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, cfg.vocab_size, (1, int(reference["text_length"])), generator=gen)
    ids[0, 0] = cfg.bos_token_id
    height, width = int(reference["image_size"]), int(reference["image_width"])
    inputs = {"pixel_values": torch.randn(1, 3, height, width, generator=gen), "input_ids": ids,
              "interpolate_pos_encoding": height != width}
    if "answer_length" in reference:
        inputs["decoder_input_ids"] = torch.randint(3, cfg.vocab_size, (1, int(reference["answer_length"])),
                                                    generator=gen)
    return inputs


def blip_features(model: nn.Module, inputs: Inputs) -> object:
    """The ITM path (cross-attention on, ITM head) for retrieval; the teacher-forced answer for VQA."""
    return model(**inputs)


def blip_vqa_outputs(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The image's kept tokens and the answer decoder's logits (which the model's forward does not return)."""
    logits = []
    handle = model.text_decoder.register_forward_hook(lambda m, a, out: logits.append(out.logits))
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    return out.image_embeds, logits[0]


def blip_vqa_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs, labels=inputs["decoder_input_ids"]).loss


def blip_vqa_same_length_batch() -> Inputs:
    """Questions of one length: transformers' VQA decoder ignores the question mask (the adapter applies it), so
    the unmodified model is a reference only where no question is padded."""
    return tiny_blip.question_batch(["a small blue square", "the big red circle", "is this a triangle"])


BLIP_REFERENCE = {"image_size": 16, "image_width": 32, "text_length": 7}
BLIP_RETRIEVAL = Case("blip", "BlipForImageTextRetrieval", lambda seed, attn: tiny_blip.make_blip(seed),
                      blip_retrieval_batch, tiny_blip.sample, blip_itm_scores, blip_itm_loss, blip_at_reference,
                      blip_features, BLIP_REFERENCE)
BLIP_VQA = Case("blip", "BlipForQuestionAnswering", lambda seed, attn: tiny_blip.make_blip(seed, vqa=True),
                tiny_blip.question_batch, tiny_blip.sample, blip_vqa_outputs, blip_vqa_loss, blip_at_reference,
                blip_features, {**BLIP_REFERENCE, "answer_length": 5}, keep_all_batch=blip_vqa_same_length_batch)

# ---- LLaVA ----------------------------------------------------------------------------------------------------------

LLAVA_VOCAB = 40  # ids: 0 pad, 1 BOS, 2 EOS, 3.. words; the image token is the last id
LLAVA_TEXTS = [[5, 9, 11, 7, 21, 30], [12, 8], [33, 4, 6, 17, 25, 9, 13, 19, 27], [3, 14, 26]]  # text after the image


def make_llava(seed: int, attn: str, kv_heads: int = 2, vision_layers: int = 3) -> nn.Module:
    """A tiny LlavaForConditionalGeneration: CLIP vision tower (16 px, patch 4: 16 image tokens), projector, and a
    4-layer Llama (GQA 4/``kv_heads``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=16, patch_size=4, projection_dim=24)
    text = LlamaConfig(vocab_size=LLAVA_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_VOCAB - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
    with torch.no_grad():  # random init is small: scale weights up so attention is not uniform and tokens differ
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def llava_image_tokens(model: nn.Module, image_size: int) -> int:
    vc = model.config.vision_config
    return (image_size // vc.patch_size) ** 2 + (model.config.vision_feature_select_strategy != "default")


def llava_prompt(text: list[int], image_tokens: int) -> list[int]:
    """BOS, the image tokens, then the text."""
    return [1] + [LLAVA_VOCAB - 1] * image_tokens + text


def llava_batch() -> Inputs:
    """Left-padded prompts (as generate takes them)."""
    prompts = [llava_prompt(t, 16) for t in LLAVA_TEXTS]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pixels = torch.randn(len(prompts), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": (ids != 0).long()}


def llava_sample(batch: Inputs, i: int) -> Inputs:
    length = int(batch["attention_mask"][i].sum())
    return {"pixel_values": batch["pixel_values"][i:i + 1], "input_ids": batch["input_ids"][i:i + 1, -length:],
            "attention_mask": batch["attention_mask"][i:i + 1, -length:]}


def llava_positions(inputs: Inputs) -> torch.Tensor:
    """Position ids from the attention mask, as generate builds them (left padding keeps each row's positions)."""
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def llava_outputs(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The logits at the last two positions (the last prompt token and the one before)."""
    out = model(**inputs, position_ids=llava_positions(inputs), use_cache=False)
    return (out.logits[:, -2:],)


def llava_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Next-token loss on each row's last two tokens (the answer)."""
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    return model(**inputs, position_ids=llava_positions(inputs), labels=labels, use_cache=False).loss


def llava_at_reference(model: nn.Module, reference: dict) -> Inputs:
    """One prompt: BOS, the image tokens, then ``text_length - 1`` words (no padding)."""
    length = int(reference["text_length"])
    text = torch.randint(3, LLAVA_VOCAB - 1, (length - 1,), generator=torch.Generator().manual_seed(2)).tolist()
    ids = torch.tensor([llava_prompt(text, llava_image_tokens(model, int(reference["image_size"])))])
    size = int(reference["image_size"])
    return {"pixel_values": torch.randn(1, 3, size, size), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def llava_features(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The prefill of generate: logits of the last token only."""
    return model(**inputs, logits_to_keep=1, use_cache=False).logits


LLAVA = Case("llava", "LlavaForConditionalGeneration", make_llava, llava_batch, llava_sample, llava_outputs,
             llava_loss, llava_at_reference, llava_features, {"image_size": 16, "text_length": 8})

# ---- SigLIP ---------------------------------------------------------------------------------------------------------

SIGLIP_VOCAB, SIGLIP_LENGTH = 30, 10  # ids: 1 pad, 2 EOS, 3.. words; texts padded to max_length, no attention mask
SIGLIP_TEXTS = [[5, 9, 11, 7, 21], [12, 8], [23, 4, 6, 17, 25, 9, 13, 19, 27], [3, 14, 26]]


def make_siglip(seed: int, attn: str) -> nn.Module:
    """A tiny SiglipModel: vision 16 px, patch 4 (16 patches, no CLS), 3 layers; text 3 layers of 10 positions."""
    from transformers import SiglipConfig, SiglipModel

    text = {"vocab_size": SIGLIP_VOCAB, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3,
            "num_attention_heads": 4, "max_position_embeddings": SIGLIP_LENGTH, "projection_size": 24,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
    vision = {"hidden_size": 24, "intermediate_size": 36, "num_hidden_layers": 3, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 4}
    torch.manual_seed(seed)
    model = SiglipModel._from_config(SiglipConfig(text_config=text, vision_config=vision), attn_implementation=attn)
    with torch.no_grad():  # random init is small: scale weights up so attention is not uniform and tokens differ
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def siglip_ids(texts: list[list[int]]) -> torch.Tensor:
    """Each text, then EOS, padded to max_length (as SigLIP was trained)."""
    rows = [t + [2] for t in texts]
    return torch.tensor([r + [1] * (SIGLIP_LENGTH - len(r)) for r in rows])


def siglip_batch() -> Inputs:
    pixels = torch.randn(len(SIGLIP_TEXTS), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"pixel_values": pixels, "input_ids": siglip_ids(SIGLIP_TEXTS)}


def siglip_sample(batch: Inputs, i: int) -> Inputs:
    """Sample i alone, at the same max_length (where SigLIP's "alone" is defined)."""
    return {k: v[i:i + 1] for k, v in batch.items()}


def siglip_outputs(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    out = model(**inputs)
    return out.image_embeds, out.text_embeds


def siglip_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs, return_loss=True).loss


def siglip_at_reference(model: nn.Module, reference: dict) -> Inputs:
    length = int(reference["text_length"])
    ids = torch.randint(3, SIGLIP_VOCAB, (1, length), generator=torch.Generator().manual_seed(2))
    size = int(reference["image_size"])
    return {"pixel_values": torch.randn(1, 3, size, size), "input_ids": ids}


SIGLIP = Case("siglip", "SiglipModel", make_siglip, siglip_batch, siglip_sample, siglip_outputs, siglip_loss,
              siglip_at_reference, clip_features, {"image_size": 16, "text_length": SIGLIP_LENGTH})

CaseKey = tuple[str, str]  # (family, model class name)

CASES: dict[CaseKey, Case] = {(case.family, case.model_class): case
                             for case in (CLIP, BLIP_RETRIEVAL, BLIP_VQA, LLAVA, SIGLIP)}


def case_id(key: CaseKey) -> str:
    """A test id for a case: its family, or family-ModelClass where the family has several cases."""
    family, model_class = key
    return family if sum(f == family for f, _ in CASES) == 1 else f"{family}-{model_class}"


@contextmanager
def registered(adapter_cls: type) -> Iterator[type]:
    """Register a test-only adapter class for the ``with`` block, leaving the registry as it was afterwards."""
    from comp_vlm.adapters.base import _REGISTRY, register_adapter

    register_adapter(adapter_cls)
    try:
        yield adapter_cls
    finally:
        _REGISTRY.remove(adapter_cls)


def call(case: Case, model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return case.outputs(model, inputs)


def random_unit_masks(adapter, seed: int) -> None:
    """0/1 masks over every unit group, one group emptied entirely (a layer whose units of a kind all go)."""
    gen = torch.Generator().manual_seed(seed)
    groups = adapter.unit_groups()
    for i, group in enumerate(groups):
        values = (torch.rand(group.size, generator=gen) > 0.4).float()
        if i == len(groups) // 2:
            values.zero_()
        adapter.set_unit_mask(group, values)


def all_sites(adapter, keep: float) -> None:
    for site in adapter.token_sites():
        adapter.set_keep_ratio(site.tower, site.layer, keep, site.pool)
