"""Online DPO: pair selection, the sigmoid and IPO losses and margins by hand, learning."""
import math

import pytest
import torch

from rlbench import rundir
from rlbench.plugins.algorithms.dpo import DPO, DPOConfig, preference_pairs
from rlbench.trainer import accumulate_gradients, start
from rlbench.types import StepContext, TrainBatch

from conftest import tiny_config


def test_pairs_are_best_and_worst_of_each_group_and_ties_are_skipped():
    rows, skipped = preference_pairs(torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.2, 0.0, 0.9]), 3)
    assert rows.tolist() == [1, 0, 8, 7] and skipped == 1


def _two_pairs():
    # one-token completions: sequence logprob = token logprob
    logp = torch.tensor([[-1.0], [-2.0], [-3.0], [-1.0]], requires_grad=True)  # c0, r0, c1, r1
    ref = torch.tensor([[-1.5], [-1.5], [-2.0], [-2.0]])
    t = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "attention_mask": torch.ones(4, 2, dtype=torch.long),
         "completion_mask": torch.ones(4, 1), "ref_logprobs": ref}
    return logp, TrainBatch(t, {"seqs": 4.0, "tokens": 4.0, "pairs": 2.0})


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_sigmoid_loss_and_margin_by_hand():
    # pair 0: (−1 + 1.5) − (−2 + 1.5) = 1.0 → h = 0.1;  pair 1: (−3 + 2) − (−1 + 2) = −2 → h = −0.2
    logp, batch = _two_pairs()
    loss, m = DPO(DPOConfig(beta=0.1)).loss(logp, batch, StepContext(step=1))
    # −log σ(0.1) = 0.644397, −log σ(−0.2) = 0.798139
    assert loss.item() == pytest.approx((0.644397 + 0.798139) / 2, abs=1e-5)
    assert m["dpo/reward_margin"] == pytest.approx((0.1 - 0.2) / 2)
    assert m["dpo/pair_accuracy"] == 0.5
    loss.backward()
    # d(−log σ(h))/dℓ_c = −β σ(−h) / P
    assert logp.grad[0, 0].item() == pytest.approx(-0.1 * sig(-0.1) / 2)
    assert logp.grad[1, 0].item() == pytest.approx(0.1 * sig(-0.1) / 2)


def test_ipo_loss_by_hand():
    logp, batch = _two_pairs()
    loss, _ = DPO(DPOConfig(beta=0.1, loss_type="ipo")).loss(logp, batch, StepContext(step=1))
    # (h/β − 1/(2β))²: (1 − 5)² = 16 and (−2 − 5)² = 49
    assert loss.item() == pytest.approx((16 + 49) / 2)


def test_pairs_stay_together_under_micro_batching(tokenizer):
    from rlbench import models

    logp, batch = _two_pairs()
    g = torch.Generator().manual_seed(0)
    batch.tensors["input_ids"] = torch.randint(10, 1000, (4, 6), generator=g)
    batch.tensors["attention_mask"] = torch.ones(4, 6, dtype=torch.long)
    batch.tensors["completion_mask"] = torch.ones(4, 1)
    algo = DPO(DPOConfig())
    losses = []
    for micro in (4, 3, 2):  # 3 is rounded down to 2 so a pair is never split
        model = models.tiny_random(tokenizer, seed=0)
        losses.append(accumulate_gradients(model, algo, batch, micro, StepContext(step=1), pairs=True)["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_online_dpo_learns_a_trivial_reward(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=30", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.max_tokens=2",
                      "rollout.prompts_per_step=4", "rollout.group_size=8", "train.min_lr_ratio=1.0", "eval.kl=false",
                      algorithm={"name": "dpo"}, task={"name": "first_char"})
    start(cfg, tmp_path / "dpo").run()
    lines = rundir.read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in lines]
    assert sum(rewards[:3]) / 3 < 0.7
    assert max(sum(rewards[i:i + 3]) / 3 for i in range(len(rewards) - 2)) >= 0.9, rewards
    assert all("dpo/pairs" in r for r in lines)
    assert all("dpo/reward_margin" in r for r in lines if r["dpo/pairs"] > 0)  # no pairs (all rewards equal): no update
