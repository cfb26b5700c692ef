"""Every term of every loss, its *gradient* against a hand computation (not only its value): a term
whose coefficient silently stopped acting on the gradient (β, the value coefficient, the clip)
would invalidate every study of it. No built-in loss has an entropy term (the logged entropy is a
metric); DPO's gradients are checked in tests/test_dpo.py.

Notation: lp = log π_T of a token (the leaf tensor), old = π_old, ref = π_ref, r = exp(lp − old)."""
import math

import pytest
import torch

from rlbench.policy_gradient import AdaptiveKL
from rlbench.plugins.algorithms.cispo import CISPO, CISPOConfig
from rlbench.plugins.algorithms.dr_grpo import DrGRPO, DrGRPOConfig
from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig
from rlbench.plugins.algorithms.gspo import GSPO, GSPOConfig
from rlbench.plugins.algorithms.ppo import PPO, PPOConfig
from rlbench.types import StepContext, TrainBatch

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # completion lengths 3 and 1
LP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, 0.0, 0.0]])
OLD = torch.tensor([[-1.1, -0.5, -1.0], [-0.3, 0.0, 0.0]])  # token 0,2 ratios e^0.1, e^-1.0
REF = torch.tensor([[-1.5, -0.2, -2.0], [-1.0, 0.0, 0.0]])


def _batch(adv, **extra):
    t = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
         "completion_mask": MASK, "advantages": adv, **extra}
    return TrainBatch(t, {"seqs": 2.0, "tokens": float(MASK.sum())})


def _grad(algo, batch, ctx, lp=LP):
    leaf = lp.clone().requires_grad_(True)
    loss, _ = algo.loss(leaf, batch, ctx)
    loss.backward()
    return leaf.grad


def _k3_grad(lp, ref):
    """d/dlp of k3 = exp(ref − lp) − (ref − lp) − 1."""
    return 1 - torch.exp(ref - lp)


@pytest.mark.parametrize("beta", [0.04, 0.5])
def test_kl_penalty_gradient_is_beta_times_the_k3_gradient(beta):
    # zero advantages: the KL term is the whole gradient; token_mean: every token weighs 1 / 4
    algo = GRPO(GRPOConfig(beta=beta, loss_agg="token_mean"))
    g = _grad(algo, _batch(torch.zeros(2)), StepContext(step=1, ref_logprobs=REF))
    assert torch.allclose(g, beta * _k3_grad(LP, REF) * MASK / 4, atol=1e-7)
    assert g[1, 0].item() == pytest.approx(beta * (1 - math.exp(-1.0 + 0.3)) / 4)


def test_kl_penalty_gradient_follows_the_adaptive_coefficient_and_vanishes_at_beta_zero():
    algo = GRPO(GRPOConfig(beta=0.1, kl_target=0.01, loss_agg="token_mean"))
    before = _grad(algo, _batch(torch.zeros(2)), StepContext(step=1, ref_logprobs=REF))
    algo.after_step({"kl": 0.05})  # KL above target: the controller raises β
    beta = algo.kl_ctl.beta
    assert beta > 0.1 and beta == pytest.approx(AdaptiveKL(0.1, 0.01, 10.0).update(0.05))
    after = _grad(algo, _batch(torch.zeros(2)), StepContext(step=1, ref_logprobs=REF))
    assert torch.allclose(after, before * beta / 0.1, atol=1e-7)  # the new β acts on the gradient
    zero = _grad(GRPO(GRPOConfig(beta=0.0, loss_agg="token_mean")), _batch(torch.zeros(2)),
                 StepContext(step=1, ref_logprobs=REF))
    assert torch.count_nonzero(zero) == 0


def test_clipped_surrogate_gradient_under_each_aggregation():
    adv = torch.tensor([1.0, -2.0])
    ctx = StepContext(step=1, old_logprobs=OLD, max_tokens=4)
    r = torch.exp(LP - OLD) * MASK
    # ε 0.2: token 2 of row 0 has r = e^-1 < 0.8 with A > 0 → min picks r·A (unclipped: r below the range
    # only clips when A < 0); row 1: r = 1. So every token here has gradient −A·r·weight.
    per_token = -adv.unsqueeze(-1) * r  # d(−A r)/dlp = −A r
    seq = GRPO(GRPOConfig(beta=0.0, loss_agg="seq_mean"))
    w_seq = MASK / MASK.sum(-1, keepdim=True) / 2  # 1 / (length · seqs)
    assert torch.allclose(_grad(seq, _batch(adv), ctx), per_token * w_seq, atol=1e-7)
    dr = DrGRPO(DrGRPOConfig())
    assert torch.allclose(_grad(dr, _batch(adv), ctx), per_token * MASK / (2 * 4), atol=1e-7)  # seqs × max_tokens
    # a clipped token (r = e^0.5 > 1.2 with A > 0) has no gradient
    lp = LP.clone()
    lp[0, 1] = OLD[0, 1] + 0.5
    g = _grad(GRPO(GRPOConfig(beta=0.0, loss_agg="token_mean")), _batch(adv), ctx, lp=lp)
    assert g[0, 1].item() == 0.0 and g[0, 0].item() == pytest.approx(-1.0 * math.exp(0.1) / 4)


def test_cispo_gradient_keeps_clipped_tokens_with_a_stopped_weight():
    adv = torch.tensor([1.0, -2.0])
    algo = CISPO(CISPOConfig(epsilon_high=0.05))
    lp = LP.clone()
    lp[0, 1] = OLD[0, 1] + 0.5  # r = e^0.5, clipped to 1.05: still a gradient, −1.05·A per token
    g = _grad(algo, _batch(adv), StepContext(step=1, sampler_logprobs=OLD), lp=lp)
    w = torch.clamp(torch.exp(lp - OLD), 0.0, 1.05) * MASK  # ε_low 1: no lower bound
    assert torch.allclose(g, -adv.unsqueeze(-1) * w / 4, atol=1e-7)
    assert g[0, 1].item() == pytest.approx(-1.05 / 4)


def test_gspo_gradient_spreads_the_sequence_ratio_over_its_tokens():
    adv = torch.tensor([1.0, -2.0])
    algo = GSPO(GSPOConfig(epsilon_low=10.0, epsilon_high=10.0, loss_agg="seq_mean"))  # wide: nothing clipped
    g = _grad(algo, _batch(adv), StepContext(step=1, old_logprobs=OLD))
    s = torch.exp(((LP - OLD) * MASK).sum(-1) / MASK.sum(-1))  # [2] geometric-mean ratio
    # per sequence −A·s, each sequence weighted 1/seqs: d/dlp_t = −A·s / (length · seqs) on real tokens
    want = -(adv * s).unsqueeze(-1) * MASK / MASK.sum(-1, keepdim=True) / 2
    assert torch.allclose(g, want, atol=1e-7)
    tight = GSPO(GSPOConfig(epsilon_low=1e-4, epsilon_high=1e-4, loss_agg="seq_mean"))  # s0 = e^-0.3: clipped
    assert torch.count_nonzero(_grad(tight, _batch(torch.tensor([-1.0, 0.0])), StepContext(step=1, old_logprobs=OLD))[0]) == 0


def test_ppo_policy_and_value_gradients():
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.2], [0.3, 0.0, 0.0]])
    old_v = torch.tensor([[0.9, 0.4, 0.2], [0.2, 0.0, 0.0]])
    # token 1: V moved 0.5 from V_old toward R = 1: clipped to 0.6, whose error 0.4 beats the unclipped 0.1
    values = torch.tensor([[0.95, 0.9, 0.1], [0.25, 0.0, 0.0]], requires_grad=True)
    algo = PPO(PPOConfig(epsilon=0.2, value_clip=0.2, vf_coef=0.5))
    batch = _batch(adv, returns=returns, old_values=old_v)
    leaf = LP.clone().requires_grad_(True)
    loss, _ = algo.loss(leaf, batch, StepContext(step=1, old_logprobs=OLD, values=values))
    loss.backward()
    r = torch.exp(LP - OLD)
    # policy: −A·r / tokens where unclipped; row 0 token 2 has r = e^-1 < 0.8 with A > 0: unclipped
    assert torch.allclose(leaf.grad, -adv * r * MASK / 4, atol=1e-7)
    # value: vf_coef · (V − R) / tokens where the unclipped error is the larger one; 0 where clipped wins
    unclipped = (values.detach() - returns) ** 2
    clipped = (old_v + (values.detach() - old_v).clamp(-0.2, 0.2) - returns) ** 2
    active = (clipped > unclipped).float()  # the clipped branch is taken: its gradient w.r.t. V is 0 (V clamped)
    want = 0.5 * (values.detach() - returns) * (1 - active) * MASK / 4
    assert active.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.allclose(values.grad, want, atol=1e-7) and values.grad[0, 1].item() == 0.0
    zero = PPO(PPOConfig(vf_coef=0.0))
    v2 = values.detach().clone().requires_grad_(True)
    zero.loss(LP.clone().requires_grad_(True), batch, StepContext(step=1, old_logprobs=OLD, values=v2))[0].backward()
    assert torch.count_nonzero(v2.grad) == 0  # vf_coef 0: no value gradient
