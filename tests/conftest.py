from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.zoo import clip_config

# tiny models: one thread is fastest, and two threads collapse when the other core is busy (measured ~70x)
torch.set_num_threads(1)

WORDS = ["a", "an", "the", "red", "green", "blue", "small", "big", "circle", "square", "triangle", "left", "of", "right", "photo", "this", "is", "and", "with", "on"]


def tiny_clip_config(
    vision_layers: int = 3, text_layers: int = 3, heads: int = 4, hidden: int = 32, mlp: int = 48,
    image_size: int = 16, patch: int = 4, eos_token_id: int | None = None, vocab: int | None = None,
) -> CLIPConfig:
    # a non-square vision MLP and a different width than text: catches transposed slicing
    return clip_config(build_word_tokenizer(WORDS), vision_hidden=hidden + 8, text_hidden=hidden, layers=vision_layers,
                       text_layers=text_layers, heads=heads, vision_mlp=mlp + 16, text_mlp=mlp, projection_dim=24,
                       image_size=image_size, patch_size=patch, max_positions=24, vocab_size=vocab or None,
                       eos_token_id=eos_token_id)


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
