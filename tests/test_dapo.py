"""DAPO: overlong shaping and clip-higher by hand, dynamic sampling in the trainer, learning."""
import zlib
from dataclasses import dataclass

import pytest
import torch

import rlbench
from rlbench import manager, rundir
from rlbench.plugins.algorithms.dapo import DAPO, DAPOConfig, overlong_penalty
from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig
from rlbench.training.trainer import start
from rlbench.types import Prompt, Rollouts, StepContext, TrainBatch

from conftest import tiny_config


def _rollouts(lengths, group_size, C=10):
    N = len(lengths)
    mask = torch.zeros(N, C)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    B = N // group_size
    return Rollouts(prompts=[Prompt(id=f"p{b}", text="", answer=None) for b in range(B)],
                    prompt_ids=[[5, 6, 7 + b] for b in range(B)],
                    group=torch.arange(B).repeat_interleave(group_size), completion_ids=(mask * 9).long(),
                    completion_mask=mask, sampler_logprobs=-mask, texts=[f"t{i}" for i in range(N)],
                    finish_reasons=["length" if n == C else "stop" for n in lengths])


def test_overlong_penalty_by_hand():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then linear to −penalty at 10
    pen = overlong_penalty(torch.tensor([5, 6, 8, 9, 10]), 10, 4, 1.0)
    assert pen.tolist() == pytest.approx([0, 0, -0.5, -0.75, -1.0])
    assert overlong_penalty(torch.tensor([8, 10]), 10, 4, 0.5).tolist() == pytest.approx([-0.25, -0.5])
    assert overlong_penalty(torch.tensor([10]), 10, 0, 1.0).tolist() == [0.0]  # buffer 0: off


def test_dapo_advantages_include_the_length_penalty():
    algo = DAPO(DAPOConfig(overlong_buffer_frac=0.4))  # L_cache = 4 of 10
    batch = algo.prepare(_rollouts([2, 10, 10, 4], 4), torch.tensor([1.0, 0, 0, 0]), StepContext(step=1, max_tokens=10))
    # shaped rewards [1, −1, −1, 0]: mean −0.25, unbiased std sqrt(2.75 / 3) = 0.957427
    std = (2.75 / 3) ** 0.5
    assert batch["advantages"].tolist() == pytest.approx([d / (std + 1e-4) for d in (1.25, -0.75, -0.75, 0.25)], rel=1e-5)
    assert batch.metrics["dapo/overlong_frac"] == 0.5
    assert batch.metrics["dapo/overlong_penalty_mean"] == pytest.approx(-0.5)


def test_clip_higher_by_hand():
    # one completion, token ratios 1.25 and 1.5, A = +1, token mean: ε_high 0.28 keeps 1.25 and clips 1.5 to 1.28
    logp = torch.tensor([[1.25, 1.5]]).log().requires_grad_(True)
    t = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long),
         "completion_mask": torch.ones(1, 2), "advantages": torch.tensor([1.0])}
    batch, ctx = TrainBatch(t, {"seqs": 1.0, "tokens": 2.0}), StepContext(step=1, old_logprobs=torch.zeros(1, 2))
    loss, m = DAPO(DAPOConfig()).loss(logp, batch, ctx)
    assert loss.item() == pytest.approx(-(1.25 + 1.28) / 2) and m["clip_frac"] == 0.5
    loss, m = GRPO(GRPOConfig(beta=0.0, loss_agg="token_mean")).loss(logp, batch, ctx)
    assert loss.item() == pytest.approx(-(1.2 + 1.2) / 2) and m["clip_frac"] == 1.0


def test_rollouts_select_groups_and_cat():
    ro = _rollouts([1, 2, 3, 4, 5, 6], 2, C=6)
    sub = ro.select_groups([2, 0])
    assert [p.id for p in sub.prompts] == ["p2", "p0"] and sub.group.tolist() == [0, 0, 1, 1]
    assert sub.lengths().tolist() == [5, 6, 1, 2] and sub.texts == ["t4", "t5", "t0", "t1"]
    both = Rollouts.cat([sub, _rollouts([3, 3], 2, C=3)])
    assert both.completion_ids.shape == (6, 6) and both.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.lengths().tolist() == [5, 6, 1, 2, 3, 3] and both.prompt_ids[2] == [5, 6, 7]


# -- a task where half the prompts always give the same reward ------------------------------------------

@dataclass
class HalfUniformConfig:
    pass


class HalfUniform:
    """Prompt i of a draw: odd i always scores 1 (a zero-variance group), even i scores a pseudo-random
    0/1 from the completion text (a random model's samples differ, so those groups usually vary)."""

    Config = HalfUniformConfig

    def __init__(self, config, tokenizer):
        self.tok = tokenizer

    def prompts(self, split, n, seed):
        text = self.tok.apply_chat_template([{"role": "user", "content": "Go."}], tokenize=False,
                                            add_generation_prompt=True)
        return [Prompt(id=f"{seed}-{i}", text=text, answer=i % 2) for i in range(n)]

    def score(self, prompts, texts):
        return {"accuracy": [1.0 if p.answer else float(zlib.crc32(t.encode()) % 2) for p, t in zip(prompts, texts)]}


class HalfUniformPlugin:
    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"half_uniform": HalfUniform}


@pytest.fixture
def half_uniform_task():
    name = manager.register(HalfUniformPlugin(), name="half_uniform_test")
    yield
    manager.unregister(name)


def test_dynamic_sampling_refills_zero_variance_groups(tmp_path, half_uniform_task):
    cfg = tiny_config("train.steps=3", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=3",
                      "eval.kl=false", algorithm={"name": "dapo", "dynamic_sampling": 6}, task={"name": "half_uniform"})
    tr = start(cfg, tmp_path / "dapo")
    tr.run()
    lines = rundir.read_jsonl(tmp_path / "dapo" / "metrics.jsonl")
    for m in lines:
        # about half the groups of each round are uniform: a full batch needs at least two rounds
        assert m["sampling/kept_groups"] == 4 and m["sampling/rounds"] >= 2
        assert m["sampling/dropped_groups"] >= 2 * m["sampling/rounds"]  # at least the odd prompts of every round
        assert m["pg/zero_std_frac"] == 0.0  # only informative groups reached the algorithm
        # reward metrics cover everything sampled: the always-1 half pulls the mean above the kept groups'
        assert m["reward/mean"] > 0.5
    # without dynamic sampling, the same task gives the algorithm half-uniform batches
    cfg = tiny_config("train.steps=2", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=3",
                      "eval.kl=false", algorithm={"name": "dapo", "dynamic_sampling": 0}, task={"name": "half_uniform"})
    start(cfg, tmp_path / "plain").run()
    for m in rundir.read_jsonl(tmp_path / "plain" / "metrics.jsonl"):
        assert m["pg/zero_std_frac"] >= 0.5 and "sampling/rounds" not in m


def test_dapo_learns_a_trivial_reward(tmp_path, first_char_task):
    # overlong shaping off: with a 2-token budget every completion would sit inside the length buffer
    cfg = tiny_config("train.steps=30", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.max_tokens=2",
                      "rollout.prompts_per_step=4", "rollout.group_size=8", "train.min_lr_ratio=1.0", "eval.kl=false",
                      algorithm={"name": "dapo", "overlong_buffer_frac": 0.0, "dynamic_sampling": 2},
                      task={"name": "first_char"})
    start(cfg, tmp_path / "dapo").run()
    lines = rundir.read_jsonl(tmp_path / "dapo" / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in lines]
    assert sum(rewards[:3]) / 3 < 0.7
    assert max(sum(rewards[i:i + 3]) / 3 for i in range(len(rewards) - 2)) >= 0.9, rewards
