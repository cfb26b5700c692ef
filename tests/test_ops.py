"""rlbench.ops against values worked out by hand (asymmetric settings, ragged masks)."""
import math

import pytest
import torch

from rlbench import ops


def test_uniform_groups_is_the_one_equal_rewards_test():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.5])
    assert ops.uniform_groups(r, 3).tolist() == [True, False, False]
    assert ops.uniform_groups(torch.tensor([0.3, 0.3]), 1).tolist() == [True, True]  # G = 1: every group is uniform


def test_k1_is_signed_and_k3_is_not():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    assert ops.k1_kl(logp, ref).tolist() == [1.0, -1.0]
    # k3 = e^d − d − 1 with d = ref − logp: d = −1 → e^−1 + 1 − 1 = e^−1; d = 1 → e − 2
    assert ops.k3_kl(logp, ref).tolist() == pytest.approx([math.exp(-1), math.e - 2])


def test_clipped_surrogate_with_asymmetric_clip_range():
    # ε_low 0.1, ε_high 0.3; A = +1 on row 0, −1 on row 1; ratios 0.5, 1.2, 1.5
    ratio = torch.tensor([[0.5, 1.2, 1.5], [0.5, 1.2, 1.5]])
    loss, clipped = ops.clipped_surrogate(ratio.log(), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 0.1, 0.3)
    # A > 0: −min(ρ, clip(ρ, 0.9, 1.3)) = −0.5 (ρ below: unclipped is the min), −1.2, −1.3 (clipped)
    # A < 0: −min(−ρ, −clip(ρ)) = max(ρ, clip(ρ)) = 0.9 (clipped), 1.2, 1.5
    assert loss.tolist() == [pytest.approx([-0.5, -1.2, -1.3]), pytest.approx([0.9, 1.2, 1.5])]
    assert clipped.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize("mode,expected", [
    ("token_mean", (1 + 2 + 3 + 10) / 4),                 # every real token of the batch alike
    ("seq_mean", ((1 + 2 + 3) / 3 + 10 / 1) / 2),         # each completion's mean, then the mean of completions
    ("constant_length", (1 + 2 + 3 + 10) / (2 * 5)),      # token sums over completions × max_tokens
])
def test_aggregate_modes_by_hand(mode, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])  # the 99s are padding
    out = ops.aggregate(per_token, mask, mode, {"tokens": 4.0, "seqs": 2.0}, max_tokens=5)
    assert out.item() == pytest.approx(expected)


def test_aggregate_shares_of_micro_batches_sum_to_the_batch_loss():
    g = torch.Generator().manual_seed(0)
    per_token, mask = torch.randn(5, 4, generator=g), (torch.rand(5, 4, generator=g) > 0.3).float()
    mask[:, 0] = 1
    totals = {"tokens": float(mask.sum()), "seqs": 5.0}
    for mode in ops.LOSS_AGGS:
        whole = ops.aggregate(per_token, mask, mode, totals, max_tokens=4)
        parts = ops.aggregate(per_token[:2], mask[:2], mode, totals, 4) + ops.aggregate(per_token[2:], mask[2:], mode, totals, 4)
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6), mode


def test_kl_penalized_rewards_and_returns_with_a_ragged_mask():
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # lengths 2, 4, 0
    kl = torch.tensor([[0.5, 1.0, 7.0, 7.0], [0.1, 0.2, 0.3, 0.4], [9.0, 9.0, 9.0, 9.0]])
    r = ops.kl_penalized_rewards(torch.tensor([2.0, -1.0, 5.0]), mask, kl, beta=0.5)
    # −β·kl on real tokens, the sequence reward on the last real one; nothing on padding or an empty row
    assert r.tolist() == [pytest.approx([-0.25, -0.5 + 2.0, 0, 0]), pytest.approx([-0.05, -0.1, -0.15, -0.2 - 1.0]),
                          [0.0, 0.0, 0.0, 0.0]]
    ret = ops.returns_to_go(r, mask)
    assert ret.tolist() == [pytest.approx([1.25, 1.5, 0, 0]), pytest.approx([-1.5, -1.45, -1.35, -1.2]), [0.0] * 4]


def test_whiten_uses_the_population_variance_and_leaves_padding_zero():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    w = ops.whiten(x, mask, eps=0.0)
    # tokens 1, 3, 5: mean 3, population variance (4 + 0 + 4) / 3 = 8/3 (n, not n − 1)
    sd = math.sqrt(8 / 3)
    assert w.tolist() == [pytest.approx([-2 / sd, 0.0, 0.0]), pytest.approx([2 / sd, 0.0, 0.0])]


def test_gae_with_gamma_and_lambda_below_one_and_padding_in_the_middle_of_the_batch():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0 (2 tokens): δ1 = 1 − 0.5 = 0.5; δ0 = 0 + 0.9·0.5 − 0.5 = −0.05 → A0 = −0.05 + 0.45·0.5 = 0.175
    assert adv[0].tolist() == pytest.approx([0.175, 0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([0.675, 1.0, 0.0])
    # row 1: δ2 = 2 − 1 = 1; δ1 = 0.9 − 1 = −0.1 → A1 = −0.1 + 0.45 = 0.35; δ0 = −0.1 → A0 = −0.1 + 0.45·0.35
    assert adv[1].tolist() == pytest.approx([-0.1 + 0.45 * 0.35, 0.35, 1.0])


def test_whiten_of_equal_values_is_zero_not_nan():
    w = ops.whiten(torch.full((2, 3), 0.7), torch.tensor([[1.0, 1, 0], [1, 0, 0]]))
    assert torch.equal(w, torch.zeros(2, 3))


def test_constant_length_needs_the_budget():
    with pytest.raises(ValueError) as e:
        ops.aggregate(torch.ones(1, 2), torch.ones(1, 2), "constant_length", {"seqs": 1.0, "tokens": 2.0})
    assert str(e.value) == "aggregate: constant_length needs max_tokens > 0 (the completion budget)"
    assert ops.aggregate(torch.ones(1, 2), torch.ones(1, 2), "token_mean", {"seqs": 1.0, "tokens": 2.0}).item() == 1.0


def test_group_advantages_of_pairs_by_hand():
    # groups of two: mean 0.5 / 2.0, unbiased std sqrt(0.5) / 0 (uniform), eps 0
    adv, uniform = ops.group_advantages(torch.tensor([0.0, 1.0, 2.0, 2.0]), 2, eps=0.0)
    s = 0.5 / math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([-s, s, 0.0, 0.0])
    assert uniform.tolist() == [False, True]
    # without std scaling (Dr. GRPO): r - mean
    adv, _ = ops.group_advantages(torch.tensor([0.0, 1.0, 3.0, 7.0]), 2, scale_std=False)
    assert adv.tolist() == pytest.approx([-0.5, 0.5, -2.0, 2.0])


def test_gae_skips_the_environment_tokens_of_a_two_turn_trajectory():
    """Sampled, sampled, env, env, sampled, sampled: GAE runs over the four sampled tokens only (the
    environment's are skipped, not zero-reward steps), computed here by hand."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, -0.1, 0.4]])  # the env positions' values must not matter
    kl = torch.tensor([[0.1, -0.2, 5.0, 5.0, 0.3, 0.05]])
    rewards = ops.kl_penalized_rewards(torch.tensor([1.0]), mask, kl, beta=0.5)
    # -β·kl on sampled tokens, the sequence reward on the last sampled token (position 5), 0 on env tokens
    r = [-0.05, 0.1, 0.0, 0.0, -0.15, 1.0 - 0.025]
    assert rewards[0].tolist() == pytest.approx(r)
    gamma, lam = 0.9, 0.8
    adv, ret = ops.gae(rewards, values, mask, gamma, lam)
    v = {0: 0.5, 1: 0.2, 4: -0.1, 5: 0.4}
    d5 = r[5] + gamma * 0.0 - v[5]
    d4 = r[4] + gamma * v[5] - v[4]
    d1 = r[1] + gamma * v[4] - v[1]  # the next sampled token after 1 is 4
    d0 = r[0] + gamma * v[1] - v[0]
    a5 = d5
    a4 = d4 + gamma * lam * a5
    a1 = d1 + gamma * lam * a4
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, 0.0, 0.0, a4, a5])
    assert ret[0].tolist() == pytest.approx([a0 + v[0], a1 + v[1], 0.0, 0.0, a4 + v[4], a5 + v[5]])
    # returns-to-go (REINFORCE++, γ = 1): the env tokens carry nothing of their own
    assert ops.returns_to_go(rewards, mask)[0].tolist() == pytest.approx(
        [sum(r[0:]), sum(r[1:]), 0.0, 0.0, sum(r[4:]), r[5]])
    assert ops.last_index(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])).tolist() == [2, 0, 1]
