"""The tiny CLIP and synthetic data shared by the search tests (engine end to end, search fixes)."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

from comp_vlm import PruneConfig
from comp_vlm.data.synthetic import SyntheticWorld, make_retrieval_loaders
from comp_vlm.data.text import build_word_tokenizer

REF = {"image_size": 16, "text_length": 10}


def tiny_setup(n_train: int = 96, n_val: int = 32, n_test: int = 32, batch_size: int = 16, projection_dim: int = 16):
    """(CLIP config, tokenizer, loaders): 3+3 layers, 32-d, 4 heads, 16-px images of the synthetic world."""
    world = SyntheticWorld(image_size=16, seed=0)
    tok = build_word_tokenizer(world.vocabulary())
    loaders = make_retrieval_loaders(world, tok, n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size,
                                     seed=0)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "max_position_embeddings": 24, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 4},
        projection_dim=projection_dim,
    )
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
