"""Token selection, gather, masks and scatter (comp_vlm.tokens) on hand-made cases."""

from __future__ import annotations

import torch

from comp_vlm.tokens import TokenState, build_attention_mask, kept_counts, scatter_to_full, select_tokens


def state_for(valid_rows, pooled):
    valid = torch.tensor(valid_rows, dtype=torch.bool)
    b, n = valid.shape
    first = torch.zeros(b, n, dtype=torch.bool)
    first[:, 0] = True
    return TokenState.start(b, n, torch.device("cpu"), valid=valid, pooled=torch.tensor(pooled), always_kept=first)


def test_select_keeps_top_k_sorted_and_always_kept():
    st = state_for([[1, 1, 1, 1, 1, 1]], [5])
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.4, 0.0]])
    slots, ok = select_tokens(scores, st, 0.5)  # 4 prunable (1..4) -> keep 2: slots 2 (0.5), 4 (0.4)
    assert slots.tolist() == [[0, 2, 4, 5]] and ok.all()


def test_ties_broken_by_lower_index():
    st = state_for([[1, 1, 1, 1, 1, 1]], [0])
    slots, _ = select_tokens(torch.zeros(1, 6), st, 0.4)  # 5 prunable -> keep 2 -> slots 1, 2
    assert slots.tolist() == [[0, 1, 2]]


def test_padding_never_kept_and_fillers_marked_invalid():
    st = state_for([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], [5, 2])
    scores = torch.tensor([[0.0, 5, 4, 3, 2, 1], [0.0, 7, 9, 9, 9, 9]])
    slots, ok = select_tokens(scores, st, 0.5)
    # sample 0: prunable 1..4 -> keep 2 (1, 2) + CLS 0 + pooled 5; sample 1: prunable {1} -> keep 1 + 0 + pooled 2
    assert slots[0].tolist() == [0, 1, 2, 5]
    assert slots[1, :3].tolist() == [0, 1, 2] and ok[1].tolist() == [True, True, True, False]
    new = st.gather(slots, ok, causal=True, dtype=torch.float32)
    assert not new.valid[1, 3] and new.prunable[1].tolist() == [False, True, False, False]
    assert new.pooled_slot.tolist() == [3, 2]


def test_kept_counts_matches_formula():
    prunable = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0] * 8], dtype=torch.bool)
    assert kept_counts(prunable, 0.5).tolist() == [4, 1, 0]


def test_causal_mask_follows_original_positions():
    positions = torch.tensor([[0, 2, 5]])
    valid = torch.tensor([[True, True, False]])
    m = build_attention_mask(positions, valid, causal=True, dtype=torch.float32)[0, 0]
    allowed = m == 0
    assert allowed.tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert build_attention_mask(positions, torch.ones(1, 3, dtype=torch.bool), False, torch.float32) is None


def test_scatter_restores_positions_and_skips_fillers():
    st = state_for([[1, 1, 1, 1]], [3])
    slots = torch.tensor([[0, 2, 3, 1]])
    ok = torch.tensor([[True, True, True, False]])
    new = st.gather(slots, ok, causal=False, dtype=torch.float32)
    h = torch.arange(4.0).view(1, 4, 1) + 1
    out = scatter_to_full(h, new)
    assert out[0, :, 0].tolist() == [1.0, 0.0, 2.0, 3.0]
