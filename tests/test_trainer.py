"""The trainer on tiny-random: frozen reference, gradient accumulation, resume, learning."""
import dataclasses

import pytest
import torch

from rlbench import rundir
from rlbench.training.trainer import Trainer, start
from rlbench.training.accumulate import MicroBatching, accumulate_gradients
from rlbench.types import StepContext, TrainBatch

from conftest import tiny_config


def test_reference_is_frozen_and_unchanged_by_training(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=2", "algorithm.beta=0.1", task={"name": "first_char"})
    tr = start(cfg, tmp_path / "run")
    assert all(not p.requires_grad for p in tr.reference.parameters())
    before = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.run()
    for k, v in tr.reference.state_dict().items():
        assert torch.equal(v, before[k]), k
    # ...while the policy did move
    assert any(not torch.equal(v, policy_before[k]) for k, v in tr.policy.state_dict().items())
    lines = rundir.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    for key in ["reward/mean", "reward/accuracy", "kl", "loss", "grad_norm", "completion_len/mean",
                "time/rollout", "time/reward", "time/train", "tokens/generated"]:
        assert key in lines[0], key


def _random_batch(tokenizer, n=6, P=5, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n, P + C), generator=g)
    am = torch.ones(n, P + C, dtype=torch.long)
    am[0, :2] = 0  # left padding on one prompt
    cm = torch.ones(n, C)
    cm[1, 4:] = 0  # a short completion
    cm[3, 2:] = 0
    am[:, P:] = cm.long()
    t = {"input_ids": ids, "attention_mask": am, "completion_mask": cm, "advantages": torch.randn(n, generator=g)}
    ctx = StepContext(step=1, ref_logprobs=-5 + torch.randn(n, C, generator=g),
                      old_logprobs=-10.6 + 0.05 * torch.randn(n, C, generator=g))
    return TrainBatch(t, {"seqs": float(n), "tokens": float(cm.sum())}), ctx


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean"])
def test_gradient_accumulation_matches_one_batch(tokenizer, agg):
    from rlbench.modeling import models
    from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig

    algo = GRPO(GRPOConfig(beta=0.1, loss_agg=agg, epsilon_low=0.01, epsilon_high=0.01))
    batch, ctx = _random_batch(tokenizer)
    results = []
    for micro in (6, 4, 1):
        model = models.tiny_random(tokenizer, seed=0)
        m = accumulate_gradients(model, algo, batch, ctx, MicroBatching(micro))
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((m["loss"], grads, m["clip_frac"]))
    (l1, g1, c1) = results[0]
    assert c1 > 0  # some tokens are clipped, so the check covers the clipped branch too
    for l2, g2, c2 in results[1:]:
        assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-7)
        assert c2 == pytest.approx(c1)
        # float32 summation order differs between splits: compare at the scale of the gradient
        assert (g1 - g2).abs().max().item() <= 1e-5 * g1.abs().max().item()
        assert torch.nn.functional.cosine_similarity(g1, g2, dim=0).item() > 1 - 1e-6


def test_resume_continues_exactly(tmp_path):
    over = ("train.steps=4", "train.checkpoint_every=2", "rollout.temperature=1.0", "algorithm.beta=0.05")
    full = start(tiny_config(*over), tmp_path / "full")
    full.run()
    part = start(tiny_config(*over, "train.steps=4"), tmp_path / "part")
    # run only two steps: stop after the step-2 checkpoint
    part.cfg = dataclasses.replace(part.cfg, train=dataclasses.replace(part.cfg.train, steps=2))
    part.run()
    # a torn last line from a crash must not break the reader
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')
    resumed = Trainer(tiny_config(*over), tmp_path / "part", resume=True)
    assert resumed.step_done == 2
    resumed.run()
    a = rundir.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    b = rundir.read_jsonl(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for k in ["reward/mean", "loss", "kl", "grad_norm", "completion_len/mean", "lr", "entropy"]:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    pa = Trainer(tiny_config(*over), tmp_path / "full", resume=True).policy.state_dict()
    pb = resumed.policy.state_dict()
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


# -- learnability: a reward the tiny model can learn ---------------------------------

def test_grpo_learns_a_trivial_reward(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=20", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.max_tokens=2",
                      "rollout.prompts_per_step=4", "rollout.group_size=8", "algorithm.beta=0.0",
                      "train.warmup_steps=0", "train.min_lr_ratio=1.0", "eval.kl=false", task={"name": "first_char"})
    tr = start(cfg, tmp_path / "learn")
    tr.run()
    rewards = [r["reward/mean"] for r in rundir.read_jsonl(tmp_path / "learn" / "metrics.jsonl")]
    start_value = sum(rewards[:3]) / 3
    assert start_value < 0.7
    best = max(sum(rewards[i:i + 3]) / 3 for i in range(len(rewards) - 2))
    assert best >= 0.9, rewards


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    from rlbench.modeling import models
    from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig

    algo = GRPO(GRPOConfig(beta=0.1))
    batch, ctx = _random_batch(tokenizer)
    grads = []
    for ckpt in (False, True):
        model = models.tiny_random(tokenizer, seed=0)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        accumulate_gradients(model, algo, batch, ctx, MicroBatching(3))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5 * grads[0].abs().max().item()


def test_importance_correction_weights_are_one_when_the_sampler_is_in_sync(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=2", "rollout.is_correction=true", "rollout.is_cap=2.0",
                      "model.tiny_init_std=0.3", engine={"name": "hf"}, task={"name": "first_char"})
    start(cfg, tmp_path / "is").run()
    lines = rundir.read_jsonl(tmp_path / "is" / "metrics.jsonl")
    for r in lines:
        assert r["is/weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["sync/logprob_drift"] < 1e-4


def test_truncated_importance_weights_scale_the_policy_gradient():
    from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig

    algo = GRPO(GRPOConfig(beta=0.0, loss_agg="token_mean"))
    logp = torch.zeros(1, 2, requires_grad=True)
    t = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "completion_mask": torch.ones(1, 2), "advantages": torch.tensor([1.0])}
    ctx = StepContext(step=1, is_weights=torch.tensor([[2.0, 0.5]]))
    loss, _ = algo.loss(logp, TrainBatch(t, {"seqs": 1.0, "tokens": 2.0}), ctx)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)  # ratio 1, A = 1: −w per token, token mean


def test_git_revision_is_the_codes_last_commit_and_records_do_not_change_it(tmp_path):
    import subprocess

    from rlbench import rundir

    def git(*a):
        return subprocess.run(["git", "-C", str(tmp_path), *a], capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "rlbench").mkdir()
    (tmp_path / "rlbench" / "ops.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "code")
    code = git("rev-parse", "HEAD")
    assert rundir.git_revision(tmp_path / "rlbench") == code
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "run.json").write_text("{}")
    assert rundir.git_revision(tmp_path) == code  # an untracked record is not dirty code
    git("add", "-A")
    git("commit", "-qm", "records")
    assert git("rev-parse", "HEAD") != code and rundir.git_revision(tmp_path) == code
    (tmp_path / "rlbench" / "ops.py").write_text("x = 2\n")
    assert rundir.git_revision(tmp_path) == code + "+dirty"
    outside = tmp_path.parent / f"{tmp_path.name}-plain"  # a folder in no git checkout
    outside.mkdir()
    assert rundir.git_revision(outside) is None
