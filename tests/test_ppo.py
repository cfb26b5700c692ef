"""PPO: GAE and the clipped value loss by hand, the critic trains and is checkpointed, PPO learns."""
import json

import pytest
import torch

from rlbench import rundir
from rlbench.ops import gae
from rlbench.plugins.algorithms.ppo import PPO, PPOConfig, clipped_value_loss
from rlbench.training.trainer import start
from rlbench.seeds import shuffle_seed
from rlbench.types import TrainBatch
from rlbench.training.accumulate import mini_batches

from conftest import tiny_config


def test_gae_on_a_four_token_example():
    rewards = torch.tensor([[0.0, 0, 0, 1], [0, 1, 0, 0]])
    values = torch.tensor([[0.5, 0.2, 0.9, 0.4], [0.3, 0.1, 0, 0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0, backwards: δ3 = 1 − 0.4 = 0.6 → A3 0.6; δ2 = 0.4 − 0.9 = −0.5 → A2 = −0.5 + 0.5·0.6 = −0.2;
    # δ1 = 0.9 − 0.2 = 0.7 → A1 = 0.7 − 0.1 = 0.6; δ0 = 0.2 − 0.5 = −0.3 → A0 = −0.3 + 0.3 = 0.0
    assert adv[0].tolist() == pytest.approx([0.0, 0.6, -0.2, 0.6])
    assert ret[0].tolist() == pytest.approx([0.5, 0.8, 0.7, 1.0])
    # row 1 (2 real tokens): δ1 = 1 − 0.1 = 0.9; δ0 = 0.1 − 0.3 = −0.2 → A0 = −0.2 + 0.45 = 0.25; padding 0
    assert adv[1].tolist() == pytest.approx([0.25, 0.9, 0.0, 0.0])
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    # γ = 0.5: δ3 = 0.6, δ2 = 0.5·0.4 − 0.9 = −0.7, δ1 = 0.45 − 0.2 = 0.25, δ0 = 0.1 − 0.5 = −0.4
    assert adv[0].tolist() == pytest.approx([-0.4 + 0.5 * (0.25 + 0.5 * (-0.7 + 0.5 * 0.6)),
                                             0.25 + 0.5 * (-0.7 + 0.5 * 0.6), -0.7 + 0.5 * 0.6, 0.6])


@pytest.mark.parametrize("v,expected,active", [
    (0.6, 0.5 * 0.4 ** 2, 0.0),  # within ±0.2 of V_old = 0.5: the clipped value equals V
    (0.9, 0.5 * 0.3 ** 2, 1.0),  # V moved 0.4: clipped to 0.7, whose error 0.3 is the larger one
    (0.2, 0.5 * 0.8 ** 2, 0.0),  # clipped to 0.3 (error 0.7) but the unclipped error 0.8 is larger
])
def test_value_clip_active_and_inactive(v, expected, active):
    loss, clipped = clipped_value_loss(torch.tensor([v]), torch.tensor([0.5]), torch.tensor([1.0]), 0.2)
    assert loss.item() == pytest.approx(expected) and clipped.item() == active


def test_ppo_needs_a_critic():
    n = PPO.needs(PPOConfig(epochs=3))
    assert n.critic and n.old_logprobs and n.epochs == 3 and n.reference


def test_ppo_learns_and_trains_its_critic(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=30", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.max_tokens=2",
                      "rollout.prompts_per_step=4", "rollout.group_size=8", "train.min_lr_ratio=1.0", "eval.kl=false",
                      "train.checkpoint_every=10", algorithm={"name": "ppo", "beta": 0.0, "epochs": 1},
                      task={"name": "first_char"})
    tr = start(cfg, tmp_path / "ppo")
    head0 = tr.accelerator.unwrap_model(tr.critic).head.weight.detach().clone()
    tr.run()
    lines = rundir.read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in lines]
    assert sum(rewards[:3]) / 3 < 0.7
    assert max(sum(rewards[i:i + 3]) / 3 for i in range(len(rewards) - 2)) >= 0.9, rewards
    assert not torch.equal(tr.accelerator.unwrap_model(tr.critic).head.weight, head0)
    assert lines[-1]["ppo/value_mean"] > lines[0]["ppo/value_mean"]  # the critic follows the rising reward
    assert (tmp_path / "ppo" / "checkpoints" / "step_000030" / "critic.safetensors").is_file()


def test_mini_batches_partition_each_epoch_and_count_optimizer_steps(tmp_path):
    cfg = tiny_config("train.steps=1", "rollout.prompts_per_step=3", "rollout.group_size=2", "eval.kl=false",
                      algorithm={"name": "ppo", "epochs": 2, "mini_batches": 3})
    tr = start(cfg, tmp_path / "mb")
    assert tr.needs.old_logprobs  # later mini-batches need the sampling policy's logprobs
    batch = TrainBatch({"input_ids": torch.arange(6).view(6, 1), "attention_mask": torch.ones(6, 1, dtype=torch.long),
                        "completion_mask": torch.tensor([[1.0], [1], [0], [1], [1], [1]])}, {"seqs": 6.0, "tokens": 5.0})
    orders = []
    for epoch in (0, 1):
        parts = list(mini_batches(batch, tr.needs.mini_batches, shuffle_seed(cfg.run.seed, 1, epoch)))
        assert len(parts) == 3 and sorted(int(i) for p in parts for i in p["input_ids"].view(-1)) == list(range(6))
        for p in parts:  # each mini-batch is normalised by its own rows
            assert p.totals["seqs"] == 2.0 and p.totals["tokens"] == p["completion_mask"].sum().clamp(min=1).item()
        orders.append([int(i) for p in parts for i in p["input_ids"].view(-1)])
    assert orders[0] != orders[1]  # reshuffled every epoch
    again = mini_batches(batch, tr.needs.mini_batches, shuffle_seed(cfg.run.seed, 1, 0))
    assert orders[0] == [int(i) for p in again for i in p["input_ids"].view(-1)]  # seeded
    tr.run()
    steps = {int(s["step"]) for s in tr.optimizer.state_dict()["state"].values()}
    assert steps == {6}  # 2 epochs × 3 mini-batches, one AdamW step each
    assert tr.scheduler.state_dict()["last_epoch"] == 6


def test_mini_batches_keep_preference_pairs_whole(tmp_path):
    cfg = tiny_config("train.steps=1", "eval.kl=false", algorithm={"name": "dpo"})
    tr = start(cfg, tmp_path / "pairs")
    batch = TrainBatch({"input_ids": torch.arange(8).view(8, 1), "attention_mask": torch.ones(8, 1, dtype=torch.long),
                        "completion_mask": torch.ones(8, 1)}, {"seqs": 8.0, "tokens": 8.0, "pairs": 4.0})
    parts = list(mini_batches(batch, 2, shuffle_seed(cfg.run.seed, 3, 0), pairs=tr.needs.pairs))
    assert [p.totals["pairs"] for p in parts] == [2.0, 2.0]
    for p in parts:
        ids = p["input_ids"].view(-1).tolist()
        assert all(ids[i] % 2 == 0 and ids[i + 1] == ids[i] + 1 for i in range(0, len(ids), 2))  # (chosen, rejected)


def test_critic_from_a_smaller_model(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=2", "model.tiny_hidden=128", "eval.kl=false", "rollout.max_tokens=2",
                      algorithm={"name": "ppo", "critic_model": "tiny-random", "epochs": 1}, task={"name": "first_char"})
    tr = start(cfg, tmp_path / "small")
    critic = tr.accelerator.unwrap_model(tr.critic)
    assert tr.policy.config.hidden_size == 128 and critic.head.in_features == 64
    body0 = next(critic.backbone.parameters()).detach().clone()
    assert tr.n_critic == sum(p.numel() for p in critic.parameters()) < tr.n_params  # its own, smaller body
    tr.run()
    assert not torch.equal(next(critic.backbone.parameters()), body0)  # trained
    lines = rundir.read_jsonl(tmp_path / "small" / "metrics.jsonl")
    assert all(m["ppo/value_loss"] > 0 for m in lines)  # a random critic does not predict the returns exactly
    cost = json.loads((tmp_path / "small" / "cost.json").read_text())
    assert cost["params_critic"] == tr.n_critic  # the critic's passes are costed with its own N


def test_cost_counts_every_pass(tmp_path, first_char_task):
    import json

    cfg = tiny_config("train.steps=1", "eval.kl=false", "rollout.max_tokens=2", algorithm={"name": "ppo", "epochs": 2},
                      task={"name": "first_char"})
    tr = start(cfg, tmp_path / "cost")
    tr.run()
    c = json.loads((tmp_path / "cost" / "cost.json").read_text())
    seq = c["tokens_reference"]  # prompt + completion tokens of the batch, one pass
    assert seq > 0 and c["tokens_old_logprobs"] == seq and c["tokens_critic"] == seq and c["tokens_trained"] == 2 * seq
    N, Nc = c["params"], c["params_critic"]
    assert c["tokens_prompt"] > 0  # the rollouts' prompt prefill counts too
    assert Nc > 0 and c["flops_estimate"] == (2 * N * (c["tokens_prompt"] + c["tokens_generated"] + 2 * seq)
                                              + 6 * (N + Nc) * 2 * seq + 2 * Nc * seq)
