"""Invariants every algorithm must keep, checked on random inputs (hypothesis).

Each algorithm's real ``prepare`` and ``loss`` run on synthetic rollouts with ragged completion
lengths; the policy's logprobs are a leaf tensor, so gradients are exact and cheap:
  * the loss and its gradient do not depend on how the batch is split into micro-batches, nor on
    the order of its completions (pairs stay together for DPO), single-turn and on multi-turn
    trajectories whose environment tokens sit between sampled turns;
and the shared maths (rlbench.ops):
  * group advantages are unchanged by adding a constant to a group's rewards, zero for groups of
    equal rewards, scale-invariant with std scaling and scale-equivariant without (Dr. GRPO, RLOO);
  * k3 ≥ 0, and 0 exactly where the logprobs are equal;
  * the clipped surrogate equals the unclipped one while every ratio is inside the clip range;
  * per-token rewards, returns and GAE advantages are zero on padding;
  * DPO: swapping chosen and rejected flips the sign of the margin, and the loss is its own
    function of the flipped margin.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlbench import manager, ops
from rlbench.plugins.algorithms.dpo import dpo_loss
from rlbench.types import Prompt, Rollouts, StepContext

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALGORITHMS = {  # name: config overrides that make every term of the loss active
    "grpo": {"beta": 0.1, "epsilon_low": 0.1, "epsilon_high": 0.3, "epochs": 2},
    "dr_grpo": {"beta": 0.05, "epochs": 2},
    "dapo": {"beta": 0.02, "epochs": 2},
    "gspo": {"beta": 0.05, "epsilon_low": 0.01, "epsilon_high": 0.02, "epochs": 2},
    "rloo": {"beta": 0.1, "epochs": 2},
    "reinforce_pp": {"beta": 0.1, "epochs": 2},
    "ppo": {"beta": 0.1, "epochs": 2},
    "cispo": {"beta": 0.05, "epsilon_low": 0.5, "epsilon_high": 0.1, "epochs": 2},
    "dpo": {"beta": 0.2},
    "sft": {},
    "rft": {"accept": 1.0},  # rewards are drawn from {0, 1, 2}: some rows kept, some not
    "opd": {"teacher": "tiny-random", "reward_coef": 0.5},
}


def _algorithm(name):
    cls = manager.get("algorithm", name)
    return cls(cls.Config(**ALGORITHMS[name]))


def _case(seed: int, groups: int, group_size: int, C: int, pairs: bool, multi_turn: bool = False):
    """Rollouts with ragged lengths, rewards, and the trainer's context (reference / old logprobs,
    critic values), all from one seed. ``multi_turn``: each row of 3 or more tokens has a run of
    environment tokens between two sampled turns (0 in the loss mask, 1 in ``env_mask``)."""
    g = torch.Generator().manual_seed(seed)
    if pairs:
        group_size = 2
    N = groups * group_size
    lengths = torch.randint(1, C + 1, (N,), generator=g)
    real = (torch.arange(C) < lengths.unsqueeze(-1)).float()  # [N, C]
    env = torch.zeros(N, C)  # [N, C]
    if multi_turn:
        for i, k in enumerate(lengths.tolist()):
            if k >= 3:
                a = int(torch.randint(1, k - 1, (1,), generator=g))
                b = int(torch.randint(a + 1, k, (1,), generator=g))
                env[i, a:b] = 1.0
    mask = real - env  # [N, C] sampled tokens
    ro = Rollouts(prompts=[Prompt(id=f"p{b}", text="", answer=None) for b in range(groups)],
                  prompt_ids=[[3, 4 + b] for b in range(groups)], group=torch.arange(groups).repeat_interleave(group_size),
                  completion_ids=torch.randint(5, 50, (N, C), generator=g) * real.long(), completion_mask=mask,
                  sampler_logprobs=(-1.5 + 0.3 * torch.randn(N, C, generator=g)) * mask, texts=[""] * N,
                  finish_reasons=["stop"] * N, env_mask=env if multi_turn else None)
    rewards = torch.randint(0, 3, (N,), generator=g).float()
    if pairs:  # DPO needs a best and a worst in every group
        rewards = torch.stack([torch.ones(groups), torch.zeros(groups)], -1).reshape(-1)
    ctx = StepContext(step=1, max_tokens=C, ref_logprobs=(-1.5 + 0.3 * torch.randn(N, C, generator=g)) * mask,
                      old_logprobs=(-1.5 + 0.3 * torch.randn(N, C, generator=g)) * mask,
                      values=torch.randn(N, C, generator=g) * mask)
    logp = ((-1.5 + 0.3 * torch.randn(N, C, generator=g)) * mask).requires_grad_(True)
    current_values = (torch.randn(N, C, generator=g) * mask).requires_grad_(True)
    ctx.teacher_logprobs = (-1.5 + 0.3 * torch.randn(N, C, generator=g)) * mask  # opd's (drawn last)
    # Completion 0 is never clipped (its ratio is exactly 1) and its group's rewards differ, so the
    # policy gradient is never zero by chance: every other token may sit outside the clip range.
    ctx.old_logprobs[0] = logp.detach()[0]
    if not pairs:
        rewards[0], rewards[1] = 0.0, 1.0
    return ro, rewards, ctx, logp, current_values


def _loss_over(algo, batch, ctx, logp, values, rows_of_parts):
    """The summed loss of the batch's row parts (micro-batches), each with its rows' context."""
    total = 0.0
    for rows in rows_of_parts:
        part = batch.select(rows)
        part.totals = dict(batch.totals)  # micro-batches share the whole batch's normalisers
        rr = part["row"]
        mctx = ctx.select(rr, ctx.ref_logprobs.shape[1])
        mctx.values = values[rr]
        loss, _ = algo.loss(logp[rr], part, mctx)
        total = total + loss
    return total


@pytest.mark.parametrize("multi_turn", [False, True], ids=["single-turn", "multi-turn"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
@SETTINGS
@given(seed=st.integers(0, 2**31), groups=st.integers(2, 4), group_size=st.integers(2, 4), C=st.integers(1, 6),
       data=st.data())
def test_loss_and_gradient_do_not_depend_on_micro_batching_or_order(name, multi_turn, seed, groups, group_size, C,
                                                                   data):
    algo = _algorithm(name)
    pairs = name == "dpo"
    ro, rewards, ctx, logp, values = _case(seed, groups, group_size, C, pairs, multi_turn)
    batch = algo.prepare(ro, rewards, ctx)
    n = batch.size
    unit = 2 if pairs else 1  # DPO's rows come in (chosen, rejected) pairs
    units = n // unit
    whole = _loss_over(algo, batch, ctx, logp, values, [torch.arange(n)])
    g_whole = torch.autograd.grad(whole, [logp, values], allow_unused=True)
    # a random split into micro-batches (whole units), in order
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, units - 1)), max_size=3)))
    bounds = [0] + [c * unit for c in cuts if c < units] + [n]
    split = _loss_over(algo, batch, ctx, logp, values, [torch.arange(a, b) for a, b in zip(bounds, bounds[1:]) if b > a])
    g_split = torch.autograd.grad(split, [logp, values], allow_unused=True)
    # a random order of the units
    perm = torch.tensor(data.draw(st.permutations(list(range(units)))))
    order = (perm.unsqueeze(-1) * unit + torch.arange(unit)).reshape(-1)
    shuffled = _loss_over(algo, batch, ctx, logp, values, [order])
    g_shuffled = torch.autograd.grad(shuffled, [logp, values], allow_unused=True)
    for other, grads in ((split, g_split), (shuffled, g_shuffled)):
        assert other.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)
        for a, b in zip(g_whole, grads):
            if a is None or b is None:
                assert a is None and b is None
                continue
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert g_whole[0] is not None and g_whole[0].abs().sum() > 0  # the policy really gets a gradient


@SETTINGS
@given(seed=st.integers(0, 2**31), groups=st.integers(1, 4), group_size=st.integers(2, 6),
       shift=st.floats(-5, 5), scale=st.floats(0.1, 10))
def test_group_advantages_shift_scale_and_uniform_groups(seed, groups, group_size, shift, scale):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 4, (groups * group_size,), generator=g).float()
    r[:group_size] = 2.0  # the first group is uniform
    shifts = (torch.arange(groups).float() * shift).repeat_interleave(group_size)  # a constant per group
    for scale_std in (True, False):
        adv, zero = ops.group_advantages(r, group_size, scale_std, eps=0.0)
        assert zero[0] and torch.all(adv[:group_size] == 0)
        shifted, _ = ops.group_advantages(r + shifts, group_size, scale_std, eps=0.0)
        assert torch.allclose(shifted, adv, atol=1e-4)
        scaled, _ = ops.group_advantages(r * scale, group_size, scale_std, eps=0.0)
        assert torch.allclose(scaled, adv if scale_std else adv * scale, rtol=1e-4, atol=1e-4)
        # unbiased std: the scaled advantages of a non-uniform group have unit sample variance
        for b in range(groups):
            a = adv[b * group_size:(b + 1) * group_size]
            if scale_std and not zero[b]:
                assert a.std().item() == pytest.approx(1.0, rel=1e-4)
    from rlbench.plugins.algorithms.rloo import leave_one_out_advantages

    loo, zero = leave_one_out_advantages(r, group_size)
    assert torch.all(loo[:group_size] == 0) and zero[0]
    assert torch.allclose(leave_one_out_advantages(r * scale + shifts, group_size)[0], loo * scale, rtol=1e-4, atol=1e-4)
    mean_g = r.view(-1, group_size).mean(-1, keepdim=True)  # G/(G−1)·(r − mean): an independent form
    assert torch.allclose(loo, (group_size / (group_size - 1) * (r.view(-1, group_size) - mean_g)).reshape(-1), atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**31), n=st.integers(1, 50))
def test_k3_is_nonnegative_and_zero_only_at_equal_logprobs(seed, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * 3
    b = a + torch.randn(n, generator=g, dtype=torch.float64)
    b[0] = a[0]
    k = ops.k3_kl(a, b)
    assert torch.all(k >= 0) and k[0] == 0
    assert torch.all(k[1:][(a - b)[1:].abs() > 1e-3] > 0)


@SETTINGS
@given(seed=st.integers(0, 2**31), eps_low=st.floats(0.05, 0.5), eps_high=st.floats(0.05, 0.5))
def test_clipped_surrogate_is_the_plain_surrogate_inside_the_clip_range(seed, eps_low, eps_high):
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(1 - eps_low), math.log(1 + eps_high)
    d = lo + (hi - lo) * (0.01 + 0.98 * torch.rand(3, 5, generator=g))  # every log-ratio strictly inside
    old = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, generator=g)
    loss, clipped = ops.clipped_surrogate(old + d, old, adv, eps_low, eps_high)
    assert torch.allclose(loss, -torch.exp(d) * adv.unsqueeze(-1), atol=1e-6) and clipped.sum() == 0


@SETTINGS
@given(seed=st.integers(0, 2**31), N=st.integers(1, 5), C=st.integers(1, 7), beta=st.floats(0, 2),
       gamma=st.floats(0.5, 1), lam=st.floats(0, 1))
def test_token_rewards_returns_and_gae_live_on_real_tokens_only(seed, N, C, beta, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, C + 1, (N,), generator=g)
    mask = (torch.arange(C) < lengths.unsqueeze(-1)).float()
    rewards, kl = torch.randn(N, generator=g), torch.randn(N, C, generator=g) * 5
    r = ops.kl_penalized_rewards(rewards, mask, kl, beta)
    ret = ops.returns_to_go(r, mask)
    adv, returns = ops.gae(r, torch.randn(N, C, generator=g), mask, gamma, lam)
    pad = mask == 0
    for t in (r, ret, adv, returns):
        assert torch.all(t[pad] == 0)
    # the sequence reward sits on the last real token; with γ = 1 the first return is the total
    for i in range(N):
        n = int(lengths[i])
        if n:
            assert r[i, n - 1].item() == pytest.approx(rewards[i].item() - beta * kl[i, n - 1].item(), abs=1e-5)
            assert ret[i, 0].item() == pytest.approx(rewards[i].item() - beta * kl[i, :n].sum().item(), abs=1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**31), P=st.integers(1, 4), C=st.integers(1, 5), beta=st.floats(0.01, 1))
def test_dpo_swapping_chosen_and_rejected_flips_the_margin(seed, P, C, beta):
    g = torch.Generator().manual_seed(seed)
    logp, ref = torch.randn(2 * P, C, generator=g), torch.randn(2 * P, C, generator=g)
    mask = (torch.rand(2 * P, C, generator=g) > 0.3).float()
    swap = torch.arange(2 * P).view(P, 2).flip(-1).reshape(-1)  # rejected, chosen, …
    for loss_type in ("sigmoid", "ipo"):
        loss, h = dpo_loss(logp, ref, mask, beta, loss_type)
        loss_s, h_s = dpo_loss(logp[swap], ref[swap], mask[swap], beta, loss_type)
        assert torch.allclose(h_s, -h, atol=1e-6)
        want = -torch.nn.functional.logsigmoid(-h) if loss_type == "sigmoid" else (-h / beta - 1 / (2 * beta)) ** 2
        assert torch.allclose(loss_s, want, rtol=1e-5, atol=1e-6)
