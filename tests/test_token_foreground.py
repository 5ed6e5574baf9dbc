"""benchmarks/token_foreground.py picks patches through the engine's own select_tokens (a real TokenState)."""

from __future__ import annotations

import torch
from token_foreground import kept_patches


def test_kept_patches_are_the_top_k_prunable_patches_by_score():
    # one image, CLS at position 0 (never prunable) and 4 patches; keep half of them: the two best scored
    positions = torch.arange(5)[None]
    valid = torch.ones(1, 5, dtype=torch.bool)
    prunable = torch.tensor([[False, True, True, True, True]])
    scores = torch.tensor([[9.0, 0.1, 0.7, 0.2, 0.9]])
    kept = kept_patches(scores, positions, valid, prunable, 0.5, 4)
    assert kept.tolist() == [[False, True, False, True]]
