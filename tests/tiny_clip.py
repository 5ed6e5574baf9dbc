"""The tiny CLIP and synthetic data shared by the search tests (engine end to end, search fixes)."""

from __future__ import annotations

import torch
from transformers import CLIPModel

from comp_vlm import PruneConfig
from comp_vlm.data.synthetic import SyntheticWorld, make_retrieval_loaders
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.zoo import clip_config

REF = {"image_size": 16, "text_length": 10}


def tiny_setup(n_train: int = 96, n_val: int = 32, n_test: int = 32, batch_size: int = 16, projection_dim: int = 16):
    """(CLIP config, tokenizer, loaders): 3+3 layers, 32-d, 4 heads, 16-px images of the synthetic world."""
    world = SyntheticWorld(image_size=16, seed=0)
    tok = build_word_tokenizer(world.vocabulary())
    loaders = make_retrieval_loaders(world, tok, n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size,
                                     seed=0)
    cfg = clip_config(tok, vision_hidden=32, text_hidden=32, layers=3, heads=4, mlp_ratio=2,
                      projection_dim=projection_dim, image_size=16, patch_size=4, max_positions=24)
    return cfg, tok, loaders


def fresh(cfg):
    torch.manual_seed(0)
    return CLIPModel._from_config(cfg)


def quick(**kw):
    """A PruneConfig with seconds-long stages for the tiny model."""
    base = {"stage_steps": 4, "flops_step": 0.1, "finetune_steps": 2, "calibration_batches": 2, "progress": False,
            "reference": REF}
    base.update(kw)
    return PruneConfig(**base)
