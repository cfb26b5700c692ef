"""The numbers the trainer logs are of the policy that sampled: the KL, entropy and drift of a step
are measured before any optimizer step (several mini-batches and epochs included), and every
logprob is of π_T ∝ exp(logits / T), the distribution the rollouts were drawn from."""
import pytest
import torch

from rlbench.modeling import logprobs as lpmod
from rlbench import rundir
from rlbench.modeling import models
from rlbench.training.accumulate import MicroBatching, accumulate_gradients
from rlbench.policy_gradient import GroupRelativeConfig, PolicyGradient
from rlbench.training.trainer import start
from rlbench.types import StepContext, TrainBatch

from conftest import tiny_config

# a large learning rate: one optimizer step moves the policy far enough that a KL measured after it shows
STEP1 = ("train.steps=1", "train.lr=5e-2", "train.min_lr_ratio=1.0", "model.tiny_init_std=0.3",
         "rollout.batch_invariant_sampling=true", "rollout.prompts_per_step=4", "rollout.group_size=4",
         "rollout.temperature=1.0")


def _step1(tmp_path, name, algorithm, *over):
    tr = start(tiny_config(*STEP1, *over, algorithm=algorithm), tmp_path / name)
    tr.run()
    tr.close()
    return rundir.read_jsonl(tmp_path / name / "metrics.jsonl")[0]


def test_kl_at_step_one_is_zero_with_mini_batches_and_epochs(tmp_path):
    # at step 1 the policy is the reference: the sampling policy's KL is exactly 0. PPO's second
    # mini-batch and second epoch run after optimizer steps; before the fix their KL was averaged in.
    ppo = _step1(tmp_path, "ppo", {"name": "ppo", "epochs": 2, "mini_batches": 2, "beta": 0.05})
    grpo = _step1(tmp_path, "grpo", {"name": "grpo", "beta": 0.05})
    assert ppo["kl"] <= 1e-7 and grpo["kl"] <= 1e-7, (ppo["kl"], grpo["kl"])
    # the same rollouts (per-prompt seeds), so the same sampling-policy metrics
    assert ppo["reward/mean"] == grpo["reward/mean"] and ppo["completion_len/mean"] == grpo["completion_len/mean"]
    assert ppo["kl"] == pytest.approx(grpo["kl"], abs=1e-7)
    assert ppo["entropy"] == pytest.approx(grpo["entropy"], rel=1e-5)
    assert ppo["sync/logprob_drift"] < 1e-4  # measured on the sampling weights, not after an update


def test_sampling_metrics_with_mini_batches_equal_the_single_update_on_a_moved_policy(tmp_path):
    # a reference that differs from the policy: the KL is not 0, and the one-update GRPO run and the
    # 2 × 2 run must still log the same KL and entropy (both of the weights that sampled)
    over = ("train.steps=2",)
    runs = {}
    for name, algo in (("one", {"name": "grpo", "beta": 0.05}),
                       ("four", {"name": "grpo", "beta": 0.05, "epochs": 2, "mini_batches": 2})):
        tr = start(tiny_config(*STEP1, *over, algorithm=algo), tmp_path / name)
        with torch.no_grad():  # move the reference away from the policy
            for p in tr.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        m = tr.step(1)
        runs[name] = m
        tr.close()
    assert runs["one"]["kl"] > 1e-3
    assert runs["four"]["kl"] == pytest.approx(runs["one"]["kl"], rel=1e-4)
    assert runs["four"]["entropy"] == pytest.approx(runs["one"]["entropy"], rel=1e-4)


def test_trainer_logprobs_are_of_the_tempered_distribution(tmp_path):
    T = 0.5
    tr = start(tiny_config(*STEP1, f"rollout.temperature={T}", algorithm={"name": "grpo", "beta": 0.05}),
               tmp_path / "t")
    sample = tr.sampler.sample(1)
    ctx = tr.updater.score(sample.rollouts, 1)
    ro = sample.rollouts
    inp = ro.model_inputs()
    C = ro.completion_ids.shape[1]
    with torch.no_grad():  # by hand: log_softmax(logits / T) at the sampled tokens, one row at a time
        hand = torch.zeros(ro.n, C)
        for i in range(ro.n):
            ids = inp["input_ids"][i][inp["attention_mask"][i].bool()]  # prompt + the k real completion tokens
            k, L = int(ro.completion_mask[i].sum()), len(ids)
            logits = tr.reference(ids.unsqueeze(0)).logits[0, L - k - 1:L - 1].float() / T  # [k, V]
            hand[i, :k] = torch.log_softmax(logits, -1).gather(-1, ids[L - k:].unsqueeze(-1)).squeeze(-1)
    mask = ro.completion_mask
    assert torch.allclose(ctx.ref_logprobs * mask, hand * mask, atol=1e-4)
    raw = lpmod.batched_logprobs(tr.reference, inp, C, 16)  # T = 1
    assert ((raw - hand).abs() * mask).max() > 0.1  # the temperature matters at this T
    # the engine reports the same π_T: the trainer's drift check passes at T = 0.5
    m = tr.updater.update(tr.algorithm.prepare(ro, sample.rewards, ctx), ctx, 1, ro, sample.rewards)
    assert m["sync/logprob_drift"] < 1e-4, m["sync/logprob_drift"]
    assert ((ro.sampler_logprobs - hand).abs() * mask).max() < 1e-4
    tr.close()


def test_gradient_of_a_one_token_grpo_loss_is_the_tempered_score(tokenizer):
    T, A = 0.5, 1.7
    model = models.tiny_random(tokenizer, seed=0)
    ids = torch.tensor([[11, 42, 7, 99]])  # prompt of 3, one completion token (99)
    batch = TrainBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones(1, 1),
                        "advantages": torch.tensor([A])}, {"seqs": 1.0, "tokens": 1.0})
    algo = PolicyGradient(GroupRelativeConfig(beta=0.0))
    accumulate_gradients(model, algo, batch, StepContext(step=1, max_tokens=1), MicroBatching(4, temperature=T))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids[:, :3]).logits[0, -1].float()  # [V]
    (-A * torch.log_softmax(logits / T, -1)[99]).backward()  # ∇(−A log π_T(x)) by hand
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n
    model.zero_grad()  # the untempered score differs (the test can tell the two apart)
    (-A * torch.log_softmax(model(ids[:, :3]).logits[0, -1].float(), -1)[99]).backward()
    assert any(not torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-3) for n, p in model.named_parameters()
               if p.grad is not None)
