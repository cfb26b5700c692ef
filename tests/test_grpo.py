"""GRPO's advantages, loss and KL against values worked out by hand."""
import math

import pytest
import torch

from rlbench.ops import group_advantages, k3_kl
from rlbench.policy_gradient import AdaptiveKL
from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig
from rlbench.types import StepContext, TrainBatch

LN2 = math.log(2.0)


def test_group_advantages_by_hand():
    # group [1,0,0,0]: mean 0.25, unbiased std 0.5 -> (1.5, -0.5, -0.5, -0.5); group [1,1,1,1]: std 0
    adv, zero = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4, scale_std=True, eps=0.0)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    assert zero.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, scale_std=True, eps=1e-4)
    assert adv.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    adv, _ = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, scale_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def _batch(ref=None):
    # 2 completions x 3 tokens; the second has 2 real tokens. old logprobs 0, so ratio = exp(logp).
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 1.0]])
    logp = ratios.log().requires_grad_(True)
    t = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
         "completion_mask": mask, "advantages": torch.tensor([1.0, -1.0])}
    return logp, TrainBatch(t, {"seqs": 2.0, "tokens": 5.0}), StepContext(step=1, old_logprobs=torch.zeros(2, 3),
                                                                         ref_logprobs=ref)


# per-token surrogate, by hand (eps 0.2): seq0 (A=+1): r=1 -> -1, r=1.5 -> -1.2 (clipped), r=0.5 -> -0.5
#                                          seq1 (A=-1): r=1 -> +1, r=1.5 -> +1.5 (unclipped is the min)
@pytest.mark.parametrize("agg,eps,expected,clip_frac", [
    ("seq_mean", 0.2, ((-1 - 1.2 - 0.5) / 3 + (1 + 1.5) / 2) / 2, 0.2),   # 0.175
    ("token_mean", 0.2, (-1 - 1.2 - 0.5 + 1 + 1.5) / 5, 0.2),              # -0.04
    ("seq_mean", 1.0, ((-1 - 1.5 - 0.5) / 3 + (1 + 1.5) / 2) / 2, 0.0),   # clipping inactive: 0.125
    ("token_mean", 1.0, (-1 - 1.5 - 0.5 + 1 + 1.5) / 5, 0.0),              # -0.1
])
def test_loss_beta0_by_hand(agg, eps, expected, clip_frac):
    algo = GRPO(GRPOConfig(beta=0.0, epsilon_low=eps, epsilon_high=eps, loss_agg=agg))
    logp, batch, ctx = _batch()
    loss, m = algo.loss(logp, batch, ctx)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(clip_frac)
    loss.backward()
    # d/dlogp of -r*A = -A*r (unclipped tokens); a clipped token has no gradient; padding has none.
    g = logp.grad
    denom = 5.0 if agg == "token_mean" else None
    if agg == "token_mean":
        want = torch.tensor([[-1.0, 0.0 if eps == 0.2 else -1.5, -0.5], [1.0, 1.5, 0.0]]) / denom
        assert torch.allclose(g, want, atol=1e-6)
    else:
        want = torch.tensor([[-1.0 / 3, 0.0 if eps == 0.2 else -1.5 / 3, -0.5 / 3], [1.0 / 2, 1.5 / 2, 0.0]]) / 2
        assert torch.allclose(g, want, atol=1e-6)


@pytest.mark.parametrize("agg,kl_mean", [
    ("seq_mean", (2 - LN2 - 1) / 2),        # seq0 every token k3 = e^ln2 - ln2 - 1; seq1 k3 = 0
    ("token_mean", 3 * (2 - LN2 - 1) / 5),
])
def test_loss_beta_positive_by_hand(agg, kl_mean):
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 1.0]])
    ref = ratios.log() + torch.tensor([[LN2] * 3, [0.0] * 3])  # d = ref - logp = ln2 on seq0, 0 on seq1
    base = GRPO(GRPOConfig(beta=0.0, loss_agg=agg))
    algo = GRPO(GRPOConfig(beta=0.1, loss_agg=agg))
    logp, batch, ctx = _batch(ref)
    l0, _ = base.loss(logp, batch, ctx)
    l1, m = algo.loss(logp, batch, ctx)
    assert m["pg/kl_term"] == pytest.approx(kl_mean, abs=1e-6)
    assert (l1 - l0).item() == pytest.approx(0.1 * kl_mean, abs=1e-6)


def test_std_zero_group_gives_only_kl():
    algo = GRPO(GRPOConfig(beta=0.0))
    from rlbench.types import Rollouts
    r = Rollouts(prompts=[None, None], prompt_ids=[[5, 6], [7]], group=torch.tensor([0, 0, 1, 1]),
                 completion_ids=torch.ones(4, 2, dtype=torch.long), completion_mask=torch.ones(4, 2),
                 sampler_logprobs=torch.zeros(4, 2), texts=[""] * 4, finish_reasons=["stop"] * 4)
    batch = algo.prepare(r, torch.tensor([1.0, 1.0, 0.0, 1.0]), StepContext(step=1))
    assert batch["advantages"][:2].tolist() == [0.0, 0.0]
    assert batch.metrics["pg/zero_std_groups"] == 1.0 and batch.metrics["pg/zero_std_frac"] == 0.5
    # left-padded prompt + completion layout
    assert batch["input_ids"][2].tolist() == [0, 7, 1, 1]
    assert batch["attention_mask"][2].tolist() == [0, 1, 1, 1]
    assert batch.totals == {"seqs": 4.0, "tokens": 8.0}
    assert batch["row"].tolist() == [0, 1, 2, 3]  # each row's index into the rollouts


def test_k3_properties():
    x = torch.randn(100)
    assert torch.all(k3_kl(x, x) == 0)
    assert torch.all(k3_kl(x, x + torch.randn(100)) >= 0)
    assert k3_kl(torch.tensor(0.0), torch.tensor(LN2)).item() == pytest.approx(1 - LN2)


def test_k3_kl_of_models_zero_for_identical_positive_otherwise(tokenizer):
    from rlbench.modeling import logprobs, models

    a = models.tiny_random(tokenizer, seed=0)
    b = models.tiny_random(tokenizer, seed=0)
    c = models.tiny_random(tokenizer, seed=1)
    ids = torch.randint(0, 1000, (3, 12))
    am = torch.ones_like(ids)
    la, _ = logprobs.token_logprobs(a, ids, am, 6)
    lb, _ = logprobs.token_logprobs(b, ids, am, 6)
    lc, _ = logprobs.token_logprobs(c, ids, am, 6)
    assert k3_kl(la, lb).mean().item() == 0.0
    assert k3_kl(la, lc).mean().item() > 1e-3
    mask = torch.ones(3, 6)
    assert logprobs.exact_kl(a, b, ids, am, mask, 2).abs().max().item() < 1e-6
    assert logprobs.exact_kl(a, c, ids, am, mask, 2).min().item() > 0


def test_adaptive_kl_controller():
    ctl = AdaptiveKL(beta=0.1, target=0.01, horizon=10)
    assert ctl.update(0.02) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    ctl = AdaptiveKL(beta=0.1, target=0.01, horizon=10)
    assert ctl.update(0.011) == pytest.approx(0.1 * (1 + 0.1 / 10))
    ctl = AdaptiveKL(beta=0.1, target=0.01, horizon=10)
    assert ctl.update(0.0) == pytest.approx(0.1 * 0.98)
    fixed = AdaptiveKL(beta=0.1, target=0.0, horizon=10)
    assert fixed.update(5.0) == 0.1


def test_needs_follow_config():
    assert GRPO.needs(GRPOConfig(beta=0.0)).reference is False
    assert GRPO.needs(GRPOConfig(beta=0.0, kl_target=0.01)).reference is True
    assert GRPO.needs(GRPOConfig(epochs=2)).old_logprobs is True
