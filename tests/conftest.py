from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from comp_vlm.data.text import build_word_tokenizer

# tiny models: one thread is fastest, and two threads collapse when the other core is busy (measured ~70x)
torch.set_num_threads(1)

WORDS = ["a", "an", "the", "red", "green", "blue", "small", "big", "circle", "square", "triangle", "left", "of", "right", "photo", "this", "is", "and", "with", "on"]


def tiny_clip_config(
    vision_layers: int = 3, text_layers: int = 3, heads: int = 4, hidden: int = 32, mlp: int = 48,
    image_size: int = 16, patch: int = 4, eos_token_id: int | None = None, vocab: int | None = None,
) -> CLIPConfig:
    tok = build_word_tokenizer(WORDS)
    vocab = vocab or len(tok)
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=text_layers,
        num_attention_heads=heads, max_position_embeddings=24, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id if eos_token_id is None else eos_token_id, pad_token_id=tok.pad_token_id,
    )
    # a non-square vision MLP and a different width than text: catches transposed slicing
    vision = dict(
        hidden_size=hidden + 8, intermediate_size=mlp + 16, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def make_clip(seed: int = 0, attn: str = "sdpa", **kw) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel._from_config(tiny_clip_config(**kw), attn_implementation=attn)
    # random init is small; scale weights up a little so attention is not uniform and tokens differ
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embedding" not in name:
                p.mul_(3.0)
    return model.eval()


@pytest.fixture
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture
def text_batch(tokenizer):
    texts = ["a photo of a red circle", "this is a small blue square left of a big green triangle", "red",
             "a big circle and a small square on the left"]
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.fixture
def pixels():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 16, 16, generator=g)
