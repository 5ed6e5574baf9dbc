"""Tiny BLIP models and inputs shared by the BLIP contract cases and tests/test_blip.py."""

from __future__ import annotations

import torch
from conftest import WORDS
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering

from comp_vlm.data.text import build_word_tokenizer

QUESTIONS = ["is the red circle left of the square", "a small blue square", "red",
             "is this a big circle and a small square on the left"]
ANSWER_LENGTH = 3
IMAGE = 16


def tiny_blip_config(vqa: bool) -> BlipConfig:
    """3 vision + 3 text layers, 4 heads, 16-px images, patch 4. The retrieval model's vision tower is wider than its
    text tower (catches a transposed slice); VQA needs them equal (one text config for encoder and decoder)."""
    tok = build_word_tokenizer(WORDS)
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
            "num_attention_heads": 4, "max_position_embeddings": 24, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "sep_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32 if vqa else 40, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": IMAGE, "patch_size": 4, "initializer_range": 0.02}
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=24)


def make_blip(seed: int = 0, vqa: bool = False) -> torch.nn.Module:
    """A tiny BLIP retrieval (or VQA) model in eval mode, eager attention (BLIP's only one), weights scaled up so
    attention is not uniform."""
    torch.manual_seed(seed)
    cls = BlipForQuestionAnswering if vqa else BlipForImageTextRetrieval
    model = cls._from_config(tiny_blip_config(vqa), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embedding" not in name:
                p.mul_(3.0)
    return model.eval()


def question_batch(texts: list[str] = QUESTIONS, seed: int = 1) -> dict[str, torch.Tensor]:
    """Padded questions (right padding) with one random image each and, for VQA, answers of ANSWER_LENGTH tokens."""
    tok = build_word_tokenizer(WORDS)
    text = tok(texts, padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(texts), 3, IMAGE, IMAGE, generator=gen)
    answers = torch.randint(3, len(tok) - 1, (len(texts), ANSWER_LENGTH), generator=gen)
    answers[:, 0] = tok.bos_token_id
    return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
            "decoder_input_ids": answers}


def sample(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a :func:`question_batch` alone, its question unpadded."""
    length = int(batch["attention_mask"][i].sum())
    return {k: v[i:i + 1, :length] if k in ("input_ids", "attention_mask") else v[i:i + 1] for k, v in batch.items()}
