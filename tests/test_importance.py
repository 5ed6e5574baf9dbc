"""CIM (comp_vlm.importance): CIT token scores (Eq. 6-7) and CIP parameter scores (Eq. 3-5), selection helpers.

Expected numbers are worked out by hand in the comments next to each case.
"""

from __future__ import annotations

import math

import pytest
import torch

from comp_vlm.importance import (
    NonFiniteError,
    accumulate_stat,
    channel_stat,
    check_finite,
    cit_pooled_row,
    cit_received_attention,
    head_scores,
    head_stat,
    knapsack_select,
    masked_head_max,
    neuron_scores,
    normalize_groups,
    normalize_scores,
    rank_normalize,
    token_weights,
    zscore,
)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def b(x):
    return torch.tensor(x, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ CIT (Eq. 6-7)

# (B=1, H=2, q=3, k=3); token 0 is CLS
PROBS = torch.tensor(
    [[
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]],  # head 0
        [[0.2, 0.2, 0.6], [0.3, 0.2, 0.5], [0.1, 0.8, 0.1]],  # head 1
    ]]
)


def test_eq6_received_attention_by_hand():
    # max over heads: row0 [.5 .3 .6], row1 [.3 .6 .5], row2 [.2 .8 .6]
    # CLS row excluded -> column sums over rows 1, 2: token1 .6+.8 = 1.4, token2 .5+.6 = 1.1; CLS column excluded
    # Norm: 1.4 / 2.5 = .56, 1.1 / 2.5 = .44   (sum over heads would give .545/.455; CLS row kept .5/.5)
    query_rows = b([[False, True, True]])
    support = b([[False, True, True]])
    s = cit_received_attention(PROBS, None, query_rows, support)
    assert torch.allclose(s, torch.tensor([[0.0, 0.56, 0.44]]), atol=1e-6)
    assert torch.allclose(masked_head_max(PROBS, None)[0], torch.tensor([[0.5, 0.3, 0.6], [0.3, 0.6, 0.5], [0.2, 0.8, 0.6]]))


def test_eq7_soft_mask_scales_heads_before_max():
    # mask [1, .5]: head 1 halved -> row1 max(.1,.15)=.15, max(.6,.1)=.6, max(.3,.25)=.3
    m = masked_head_max(PROBS, torch.tensor([1.0, 0.5]))
    assert torch.allclose(m[0, 1], torch.tensor([0.15, 0.6, 0.3]))


def _extreme_head_probs():
    # (1, 2, 4, 4): head 0 mildly prefers token 1, head 1 (being pruned: flat-ish or extreme) puts .97 on token 3
    h0 = torch.tensor([[0.1, 0.5, 0.2, 0.2]] * 4)
    h1 = torch.tensor([[0.01, 0.01, 0.01, 0.97]] * 4)
    return torch.stack([h0, h1])[None]


def test_masked_head_cannot_change_token_ranking():
    probs = _extreme_head_probs()
    rows = b([[False, True, True, True]])
    support = b([[False, True, True, True]])
    live = cit_received_attention(probs, torch.tensor([1.0, 1.0]), rows, support)
    dead = cit_received_attention(probs, torch.tensor([1.0, 0.0]), rows, support)
    head0_only = cit_received_attention(probs[:, :1], None, rows, support)
    # mask 1: the extreme head wins the max on token 3 -> token 3 first
    assert int(live[0].argmax()) == 3
    # mask 0: identical to head 0 alone (.5 : .2 : .2 -> 5/9, 2/9, 2/9), token 1 first
    assert torch.allclose(dead, head0_only)
    assert torch.allclose(dead[0], torch.tensor([0.0, 5 / 9, 2 / 9, 2 / 9]))
    # and however extreme the masked head gets, nothing changes
    probs2 = probs.clone()
    probs2[0, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(cit_received_attention(probs2, torch.tensor([1.0, 0.0]), rows, support), dead)


def test_pooled_row_picks_pooled_query_and_zeroes_non_support():
    # (B=2, H=2, 4, 4) causal-like maps; sample 0 pooled at slot 3, sample 1 pooled at slot 2 (slot 3 = padding)
    probs = torch.zeros(2, 2, 4, 4)
    probs[:, :, :, 0] = 1.0  # every other row: all attention to BOS
    probs[0, 0, 3] = torch.tensor([0.4, 0.1, 0.3, 0.2])
    probs[0, 1, 3] = torch.tensor([0.7, 0.2, 0.05, 0.05])
    probs[1, 0, 2] = torch.tensor([0.5, 0.1, 0.4, 0.0])
    probs[1, 1, 2] = torch.tensor([0.2, 0.6, 0.2, 0.0])
    pooled = torch.tensor([3, 2])
    support = b([[False, True, True, False], [False, True, False, False]])  # BOS, pooled, padding excluded
    s = cit_pooled_row(probs, None, pooled, support)
    # sample 0 row 3, max over heads: [.7 .2 .3 .2] -> support {1, 2}: .2/.5 = .4, .3/.5 = .6
    # sample 1 row 2: [.5 .6 .4 0] -> support {1}: 1.0
    assert torch.allclose(s, torch.tensor([[0.0, 0.4, 0.6, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    # with head 1 masked out, sample 0 becomes .1/.4, .3/.4
    s2 = cit_pooled_row(probs, torch.tensor([1.0, 0.0]), pooled, support)
    assert torch.allclose(s2[0], torch.tensor([0.0, 0.25, 0.75, 0.0]))


def test_padding_gets_zero_and_normalize_handles_empty_support():
    s = normalize_scores(torch.tensor([[3.0, 1.0, 9.0], [2.0, 2.0, 2.0]]), b([[True, True, False], [False] * 3]))
    assert s.tolist() == [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0]]
    # received attention: a padding key with large attention still scores 0
    probs = torch.full((1, 1, 3, 3), 1 / 3)
    out = cit_received_attention(probs, None, b([[False, True, True]]), b([[False, True, False]]))
    assert out.tolist() == [[0.0, 1.0, 0.0]]


def test_received_attention_bf16_sums_in_float32():
    probs = PROBS.to(torch.bfloat16)
    s = cit_received_attention(probs, None, b([[False, True, True]]), b([[False, True, True]]))
    assert s.dtype == torch.float32 and torch.allclose(s, torch.tensor([[0.0, 0.56, 0.44]]), atol=1e-2)


# ------------------------------------------------------------------------------------------------ ω (Eq. 4)


def test_cip_weights_anchor_one_and_others_sum_to_one():
    scores = t([[5.0, 1.0, 3.0, 1.0, 7.0], [0.0, 2.0, 2.0, 9.0, 4.0]], torch.float32)
    support = b([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    w = token_weights(scores, support, anchor_slot=torch.tensor([0, 3]))
    # sample 0: anchor 0 -> 1; others {1,2,3}: 1,3,1 / 5; padding slot 4 -> 0 despite its score 7
    # sample 1: anchor 3 (score 9 ignored) -> 1; others {0,1,2,4}: 0,2,2,4 / 8
    assert torch.allclose(w, torch.tensor([[1.0, 0.2, 0.6, 0.2, 0.0], [0.0, 0.25, 0.25, 1.0, 0.5]]))
    others = support.clone()
    others[0, 0] = others[1, 3] = False
    assert torch.allclose((w * others).sum(1), torch.ones(2))
    assert w.dtype == torch.float32


def test_cip_weights_without_anchor_drop_the_cls_term():
    w = token_weights(t([[5.0, 1.0, 3.0, 1.0, 7.0]]), b([[1, 1, 1, 1, 0]]), anchor_slot=None)
    assert torch.allclose(w, torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.0]]))


def test_cip_weights_zero_scores_fall_back_to_uniform():
    w = token_weights(torch.zeros(1, 4), b([[1, 1, 1, 0]]), anchor_slot=torch.tensor([0]))
    assert torch.allclose(w, torch.tensor([[1.0, 0.5, 0.5, 0.0]]))
    assert not torch.isnan(token_weights(torch.zeros(1, 2), b([[1, 0]]), torch.tensor([0]))).any()


def test_uniform_rms_and_no_cip_weights():
    support = b([[1, 1, 1, 1, 0]])
    u = token_weights(None, support, anchor_slot=torch.tensor([0]), weighting="uniform-rms")
    assert torch.allclose(u, torch.tensor([[1.0, 1 / 3, 1 / 3, 1 / 3, 0.0]]))
    u_nocls = token_weights(None, support, weighting="uniform-rms")
    assert torch.allclose(u_nocls, torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]]))
    n = token_weights(t([[5.0, 1.0, 3.0, 1.0, 7.0]]), support, torch.tensor([0]), weighting="no-cip")
    assert n.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="weighting"):
        token_weights(None, support, weighting="cip-ish")
    with pytest.raises(ValueError, match="token_scores"):
        token_weights(None, support, weighting="cip")


def test_no_cip_is_plain_l2_norm():
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [0.0, 4.0]]])
    w = token_weights(None, b([[1, 1, 1]]), weighting="no-cip")
    assert torch.allclose(channel_stat(x, w).sqrt(), x[0].double().norm(dim=0))


# ------------------------------------------------------------------------------------------------ statistics


def test_channel_stat_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [0.0, 4.0]]])  # (B=1, n=3, C=2)
    w = torch.tensor([[1.0, 0.5, 0.25]])
    # c0: 1*1 + .5*9 + .25*0 = 5.5 ; c1: 1*4 + .5*0 + .25*16 = 8
    s = channel_stat(x, w)
    assert s.dtype == torch.float64 and s.tolist() == [5.5, 8.0]


def test_stat_flattens_heads_in_column_order():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)  # (B, n, H, d)
    w = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(channel_stat(x, w), channel_stat(x.reshape(2, 3, 4), w))
    with pytest.raises(ValueError):
        channel_stat(x, w[:, :2])


def test_stats_of_two_halves_sum_to_whole_batch_and_order_free():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, generator=g)
    w = token_weights(torch.rand(6, 5, generator=g), torch.rand(6, 5, generator=g) > 0.2, torch.zeros(6, dtype=torch.long))
    whole = channel_stat(x, w)
    halves = accumulate_stat(accumulate_stat(None, x[:3], w[:3]), x[3:], w[3:])
    reversed_ = accumulate_stat(accumulate_stat(None, x[3:], w[3:]), x[:3], w[:3])
    assert torch.allclose(halves, whole, rtol=1e-6)
    assert torch.allclose(halves, reversed_, rtol=1e-12)


def test_zero_weight_token_cannot_change_unit_score():
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -1.0]])  # (out=2, in=3)
    x = torch.tensor([[[1.0, 2.0, 0.5], [0.3, 0.1, 0.2], [2.0, 1.0, 1.0]]])
    scores = torch.tensor([[0.0, 0.0, 1.0]])  # token 1 has importance 0 ...
    support = b([[1, 1, 1]])
    w = token_weights(scores, support, torch.tensor([0]))
    assert w[0, 1] == 0
    before = neuron_scores(weight, channel_stat(x, w))
    x2 = x.clone()
    x2[0, 1] = torch.tensor([1e3, -5e2, 7e2])  # ... so any activation on it is irrelevant
    assert torch.equal(neuron_scores(weight, channel_stat(x2, w)), before)
    # a pruned (non-support) token likewise carries no weight even with a large importance score
    w_pruned = token_weights(torch.tensor([[0.0, 9.0, 1.0]]), b([[1, 0, 1]]), torch.tensor([0]))
    assert torch.equal(neuron_scores(weight, channel_stat(x2, w_pruned)), before)
    # whereas under no-cip the same token does change the score
    w_plain = token_weights(None, support, torch.tensor([0]), weighting="no-cip")
    assert not torch.equal(neuron_scores(weight, channel_stat(x2, w_plain)), neuron_scores(weight, channel_stat(x, w_plain)))


def test_cip_and_no_cip_can_rank_differently():
    # token 1 important (S=.9), token 2 not (S=.1); unit 0 fires on token 1 (1.0), unit 1 on token 2 (2.0)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    weight = torch.ones(3, 2)
    cip = neuron_scores(weight, channel_stat(x, token_weights(torch.tensor([[0.9, 0.1]]), b([[1, 1]]))))
    plain = neuron_scores(weight, channel_stat(x, token_weights(None, b([[1, 1]]), weighting="no-cip")))
    assert torch.allclose(cip, t([math.sqrt(0.9), math.sqrt(0.4)]))  # .9*1, .1*4
    assert torch.allclose(plain, t([1.0, 2.0]))
    assert int(cip.argmax()) == 0 and int(plain.argmax()) == 1


# ------------------------------------------------------------------------------------------------ scores (Eq. 3/4)


def test_neuron_scores_use_columns_of_non_square_out_proj():
    # fc2.weight (out=4, in=2): unit i's outgoing weights are the column weight[:, i]
    weight = torch.tensor([[1.0, 9.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    stat = t([4.0, 1.0])
    s = neuron_scores(weight, stat)
    # columns: mean|W| = [1, 2.25] -> scores [1*2, 2.25*1] = [2, 2.25]: unit 1 ranks above unit 0
    assert torch.allclose(s, t([2.0, 2.25])) and s.dtype == torch.float64
    # the (wrong) row reading: rows 0, 1 -> mean|W| = [5, .5] -> [10, .5]: unit 0 would rank first
    wrong = weight[:2].abs().mean(dim=1).double() * stat.sqrt()
    assert torch.argsort(s).tolist() != torch.argsort(wrong).tolist()
    with pytest.raises(ValueError):
        neuron_scores(weight, t([1.0, 1.0, 1.0, 1.0]))  # stat sized like the rows


def test_head_stat_sums_channels():
    assert head_stat(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 2).tolist() == [3.0, 7.0, 11.0]
    assert head_stat(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 3).tolist() == [6.0, 15.0]
    with pytest.raises(ValueError):
        head_stat(t([1.0, 2.0, 3.0]), 2)


def test_head_scores_use_column_blocks_and_sqrt_of_summed_stat():
    # out_proj.weight (out=5, in=4), H=2 heads of d=2: head h owns columns 2h, 2h+1
    weight = torch.tensor(
        [[2.0, 1.0, 0.0, 0.0], [2.0, -1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0], [-2.0, 1.0, -1.0, 0.0], [2.0, 1.0, 1.0, 1.0]]
    )
    stat = t([1.0, 8.0, 1.0, 3.0])
    s = head_scores(weight, stat, head_dim=2)
    # column means [2, 1, .6, .2] -> block means head0 1.5, head1 .4 ; summed stats [9, 4] -> sqrt [3, 2]
    assert torch.allclose(s, t([4.5, 0.8]))
    # sum-of-sqrt per channel would give 1.5*(1+2.83), .4*(1+1.73): different numbers
    assert not torch.allclose(s, t([1.5 * (1 + math.sqrt(8)), 0.4 * (1 + math.sqrt(3))]))
    # row-block reading (rows 0-1: .75 vs rows 2-3: 1.0) ranks the other way with equal stats
    eq = head_scores(weight, torch.ones(4, dtype=torch.float64), 2)
    wrong = torch.stack([weight[0:2].abs().mean(), weight[2:4].abs().mean()]).double() * math.sqrt(2)
    assert int(eq.argmax()) == 0 and int(wrong.argmax()) == 1


# ------------------------------------------------------------------------------------------------ normalisation


def test_zscore_by_hand_and_degenerate_groups():
    z = zscore(t([1.0, 2.0, 3.0]))  # mean 2, population std sqrt(2/3)
    assert torch.allclose(z, t([-math.sqrt(1.5), 0.0, math.sqrt(1.5)]))
    assert zscore(t([4.2])).tolist() == [0.0]
    assert zscore(t([0.1, 0.1, 0.1])).tolist() == [0.0, 0.0, 0.0]
    assert zscore(torch.full((7,), 1e6 / 3, dtype=torch.float32)).tolist() == [0.0] * 7
    assert zscore(t([0.0, 0.0])).tolist() == [0.0, 0.0]


def test_rank_normalize_by_hand_with_ties():
    # ranks: 1 -> 0, 2,2 -> 1.5 each, 3 -> 3 ; (r + .5) / 4
    assert rank_normalize(t([3.0, 1.0, 2.0, 2.0])).tolist() == [0.875, 0.125, 0.5, 0.5]
    assert rank_normalize(t([7.0])).tolist() == [0.5]
    assert rank_normalize(t([2.0, 2.0, 2.0])).tolist() == [0.5, 0.5, 0.5]


def test_normalize_groups_rank_and_zscore():
    scores = t([10.0, 20.0, 5.0, 7.0, 7.0, 100.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    r = normalize_groups(scores, groups, "rank")
    assert torch.allclose(r, t([0.25, 0.75, 0.5 / 3, 2 / 3, 2 / 3, 0.5]))
    z = normalize_groups(scores, groups, "zscore")
    # group 0: z = -1, 1 ; group 1: mean 19/3, pop std sqrt(8/9) -> z = -sqrt2, 1/sqrt2, 1/sqrt2 ; group 2: 0
    phi = {-1: 0.15865525393145707, 1: 0.8413447460685429, "-r2": 0.07864960352514258, "ir2": 0.7602499389065233}
    assert torch.allclose(z, t([phi[-1], phi[1], phi["-r2"], phi["ir2"], phi["ir2"], 0.5]))
    assert bool((z > 0).all()) and not torch.isnan(z).any()
    with pytest.raises(ValueError):
        normalize_groups(scores, groups, "minmax")


# ------------------------------------------------------------------------------------------------ knapsack greedy

SCORES = t([0.2, 0.6, 0.4, 0.1, 0.3, 0.3])
COSTS = t([2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
FLOORS = torch.tensor([1, 1])
# S/ΔF = [.1, .3, .4, .1, .3, .3] -> order 0, 3 (tie .1: lower index first), 1, 4, 5 (tie .3), 2
# (sorting by S alone would give 3, 0, 4, 5, 2, 1)


def _sel(idx):
    m = torch.zeros(6, dtype=torch.bool)
    m[list(idx)] = True
    return m


def test_knapsack_order_and_overshoot():
    new, removed = knapsack_select(SCORES, COSTS, 4.0, _sel([]), GROUPS, FLOORS)
    # take 0 (2), 3 (3), 1 (5 >= 4: overshoots by 1, last one)
    assert new.nonzero().flatten().tolist() == [0, 1, 3] and removed == 5.0


def test_knapsack_stops_when_target_met_exactly_and_tie_by_index():
    new, removed = knapsack_select(SCORES, COSTS, 3.0, _sel([]), GROUPS, FLOORS)
    assert new.nonzero().flatten().tolist() == [0, 3] and removed == 3.0
    new, removed = knapsack_select(SCORES, COSTS, 2.0, _sel([]), GROUPS, FLOORS)
    assert new.nonzero().flatten().tolist() == [0] and removed == 2.0  # tie 0 vs 3 -> 0 first
    flat = torch.ones(6, dtype=torch.float64)
    new, _ = knapsack_select(flat, torch.ones(6, dtype=torch.float64), 2.0, _sel([]), GROUPS, torch.tensor([0, 0]))
    assert new.nonzero().flatten().tolist() == [0, 1]


def test_knapsack_floors_monotone_and_unreachable_target():
    already = _sel([3])
    new, removed = knapsack_select(SCORES, COSTS, 10.0, already, GROUPS, FLOORS)
    # order 0, 1, 4, 5, 2: group 0 may lose 2 of 3 (0, 1; 2 skipped), group 1 has 2 left -> may lose 1 (4; 5 skipped)
    assert new.nonzero().flatten().tolist() == [0, 1, 3, 4] and removed == 5.0  # below target: exhausted
    assert bool(new[already].all())
    kept = torch.bincount(GROUPS[~new], minlength=2)
    assert bool((kept >= FLOORS).all())
    # floor 0 lets a whole group go
    new0, removed0 = knapsack_select(SCORES, COSTS, 100.0, _sel([]), GROUPS, torch.tensor([0, 0]))
    assert bool(new0.all()) and removed0 == 8.0
    # already at the floor: nothing more from that group
    new1, removed1 = knapsack_select(SCORES, COSTS, 100.0, _sel([3, 4]), GROUPS, torch.tensor([3, 1]))
    assert new1.nonzero().flatten().tolist() == [3, 4] and removed1 == 0.0


def test_knapsack_eligible_target_zero_and_bad_inputs():
    eligible = GROUPS == 1
    new, removed = knapsack_select(SCORES, COSTS, 2.0, _sel([]), GROUPS, FLOORS, eligible=eligible)
    assert new.nonzero().flatten().tolist() == [3, 4] and removed == 2.0
    new, removed = knapsack_select(SCORES, COSTS, 0.0, _sel([1]), GROUPS, FLOORS)
    assert torch.equal(new, _sel([1])) and removed == 0.0
    with pytest.raises(ValueError):
        knapsack_select(SCORES - 0.5, COSTS, 1.0, _sel([]), GROUPS, FLOORS)
    with pytest.raises(ValueError):
        knapsack_select(SCORES, COSTS * 0, 1.0, _sel([]), GROUPS, FLOORS)
    with pytest.raises(ValueError):
        knapsack_select(SCORES, COSTS, 1.0, _sel([]), GROUPS, torch.tensor([1]))  # no floor for group 1
    with pytest.raises(ValueError, match="knapsack scores"):
        knapsack_select(t([0.1, float("nan"), 0.3, 0.1, 0.1, 0.1]), COSTS, 1.0, _sel([]), GROUPS, FLOORS)


def _reference_greedy(scores, costs, target, selected, groups, floors):
    new = selected.clone()
    kept = {g: int((groups == g).sum()) - int(selected[groups == g].sum()) for g in range(len(floors))}
    cand = [i for i in range(len(scores)) if not selected[i]]
    cand.sort(key=lambda i: (float(scores[i]) / float(costs[i]), i))
    removed = 0.0
    for i in cand:
        if removed >= target:
            break
        g = int(groups[i])
        if kept[g] - 1 < int(floors[g]):
            continue
        new[i] = True
        kept[g] -= 1
        removed += float(costs[i])
    return new, removed


def test_knapsack_matches_sequential_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        u, n_groups = 30, 4
        scores = torch.randint(0, 5, (u,), generator=gen).double() / 4  # many ties
        costs = torch.randint(1, 4, (u,), generator=gen).double()
        groups = torch.randint(0, n_groups, (u,), generator=gen)
        floors = torch.randint(0, 4, (n_groups,), generator=gen)
        selected = torch.rand(u, generator=gen) < 0.2
        target = float(torch.randint(0, 50, (1,), generator=gen))
        got = knapsack_select(scores, costs, target, selected, groups, floors)
        want = _reference_greedy(scores, costs, target, selected, groups, floors)
        assert torch.equal(got[0], want[0]), trial
        assert got[1] == pytest.approx(want[1]), trial


# ------------------------------------------------------------------------------------------------ guard


def test_check_finite_names_the_label():
    ok = t([1.0, 2.0])
    assert check_finite(ok, "x") is ok
    with pytest.raises(ValueError, match="mlp stat layer 3"):
        check_finite(t([1.0, float("nan")]), "mlp stat layer 3")
    with pytest.raises(NonFiniteError, match="head scores.*1 inf"):
        check_finite(t([float("inf"), 0.0]), "head scores")
